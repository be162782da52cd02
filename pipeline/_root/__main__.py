"""``python -m headstart``: the ``headstart`` command line."""

from headstart.pipeline.cli import main

if __name__ == "__main__":
    main(prog_name="headstart")
