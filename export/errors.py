"""What a user can cause, as one family of exceptions (dvc's `DvcException` is the model).

The CLI prints a `HeadstartError` as one line and exits 1; any other exception is a bug in headstart and keeps its
traceback. Library code words these messages without CLI flags where it can: name the file or value and what to
do. Several keep `ValueError` (or `RuntimeError`) as a second base so callers that caught those still do.
"""

from __future__ import annotations


class HeadstartError(Exception):
    """Something the user caused or can fix: bad input, a missing file, a busy cache."""


class UsageError(HeadstartError, ValueError):
    """A value given to a function or command that it cannot use."""


class DataError(HeadstartError, ValueError):
    """Images, folders, manifests or labels that cannot make a dataset."""


class ModelError(HeadstartError, ValueError):
    """An ONNX model that is not a usable headstart body or classifier."""


class WeightsError(HeadstartError):
    """Weights that cannot be used: missing, tampered, malformed or unsafe."""


class DeviceError(HeadstartError):
    """The requested device cannot run the model."""


class IncompatibleError(HeadstartError, ValueError):
    """Features, heads or bodies that do not belong together."""


class HeadFileError(HeadstartError, ValueError):
    """A head file that cannot be used."""


class CacheError(HeadstartError, ValueError):
    """A cache that does not fit the request: another model, damaged, missing, or not a cache."""


class BusyError(HeadstartError, RuntimeError):
    """Another writer holds the lock; the message names it."""
