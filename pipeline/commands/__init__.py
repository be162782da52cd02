"""The `headstart` commands, one module per family; pipeline/cli.py holds the group that runs them."""
