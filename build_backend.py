"""setuptools' own build backend, less one message that cannot apply here.

An editable install of a `package-dir` layout always warns that folders named like the package may shadow
it. Nothing in this checkout is named `headstart` (tests/test_layers.py checks it), so the warning is noise
that would teach users to skip warnings; it alone is silenced, everything else is setuptools unchanged.
"""

import warnings

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403
from setuptools.warnings import InformationOnly


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)
        return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
