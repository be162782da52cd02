"""Where caches and images live: a local folder, or an fsspec URL (s3://, gs://, memory://; file:// is local).

A cache needs little of its folder: whether a file is there, its text, which of some files are present, a
listing, removal, durability before a commit, and one writer at a time. `Folder` is that small interface (as
zarr's `Store` is to its `LocalStore` and `FsspecStore`), with two implementations, chosen once by `open_folder`:
on a disk (`LocalFolder`) these are os calls, fsync and an OS file lock; in an object store (`RemoteFolder`) a PUT
is durable when it returns, and the lock is a lease (pipeline.locks).
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from headstart.export.errors import UsageError

from .locks import FileLock, Lease, Lock

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


def is_url(where: str | Path) -> bool:
    """True for an fsspec URL (s3://, memory://, ...); a file:// URL is a local path."""
    return "://" in str(where) and not str(where).startswith("file://")


def local_path(where: str | Path) -> Path:
    """The path of a local location, a file:// URL's included."""
    return Path(str(where).removeprefix("file://"))


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) of a URL; a missing fsspec implementation is a clear error."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        protocol = url.split("://", 1)[0]
        extra = "; pip install 'headstart[s3]'" if protocol in ("s3", "s3a") else ""
        raise UsageError(f"{url}: {protocol}:// needs a package that is not installed ({e}){extra}") from None
    except ValueError as e:
        raise UsageError(f"{url}: not a usable location ({e})") from None


def store_error(e: BaseException) -> str | None:
    """One line for an object store client's own exception (credentials, endpoint), which is neither an
    OSError nor a ValueError; None for anything else."""
    if type(e).__module__.split(".")[0] not in ("botocore", "aiobotocore", "s3fs", "gcsfs", "google"):
        return None
    return (f"object store: {type(e).__name__}: {e}; check its credentials and endpoint (for S3: the AWS_* "
            "variables or ~/.aws)")


class Folder(ABC):
    """A folder on a disk or in an object store; names inside it are relative, '/'-separated.

    Beside the folder, outside it (so that plain zarr tools see nothing foreign there), live its writer's lock
    (FOLDER.lock) and flags such as FOLDER.replacing.
    """

    def __init__(self, where: str | Path) -> None:
        self.text = str(where)

    def __str__(self) -> str:
        return self.text

    @property
    @abstractmethod
    def zarr_path(self) -> str:
        """What zarr.open_group takes for this folder."""

    @abstractmethod
    def absolute(self) -> str:
        """The folder as other processes (Dask workers) can open it."""

    @abstractmethod
    def is_file(self, name: str) -> bool:
        """Whether file `name` is there."""

    @abstractmethod
    def read_text(self, name: str) -> str:
        """The text of file `name`."""

    @abstractmethod
    def present(self, files: list[str], under: str) -> set[str]:
        """Which of `files`, all below folder `under`, are there (and, in an object store, every other file found
        below `under` by the one listing it takes, for a caller that remembers them not to ask again)."""

    @abstractmethod
    def entries(self) -> list[str]:
        """The names directly inside the folder ([] when it does not exist)."""

    @abstractmethod
    def make(self) -> None:
        """Create the folder where a store needs one."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Remove a file or a whole folder inside; nothing when absent."""

    @abstractmethod
    def sync(self, names: list[str]) -> None:
        """Make files (and the folders holding them) durable."""

    @abstractmethod
    def flag(self, suffix: str) -> bool:
        """Whether the flag FOLDER<suffix> beside the folder is set."""

    @abstractmethod
    def set_flag(self, suffix: str, on: bool) -> None:
        """Set or clear the flag FOLDER<suffix>, durably."""

    @abstractmethod
    def lock(self) -> Lock:
        """Hold the folder's writer lock (FOLDER.lock beside it), or raise BusyError naming the holder."""


def open_folder(where: str | Path) -> Folder:
    """The folder at `where`: a `RemoteFolder` for an fsspec URL, a `LocalFolder` for a path or a file:// URL."""
    return RemoteFolder(str(where)) if is_url(where) else LocalFolder(where)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalFolder(Folder):
    """A folder on a disk: durability is fsync, the lock an OS file lock."""

    def __init__(self, where: str | Path) -> None:
        super().__init__(where)
        self.local = local_path(where)

    @property
    def zarr_path(self) -> str:
        return str(self.local)

    def absolute(self) -> str:
        return str(self.local.resolve())

    def is_file(self, name: str) -> bool:
        return (self.local / name).is_file()

    def read_text(self, name: str) -> str:
        return (self.local / name).read_text()

    def present(self, files: list[str], under: str) -> set[str]:
        return {f for f in files if (self.local / f).is_file()}  # a stat each: cheaper on a disk than a walk

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.local.iterdir()) if self.local.is_dir() else []

    def make(self) -> None:
        self.local.mkdir(parents=True, exist_ok=True)

    def remove(self, name: str) -> None:
        if (self.local / name).is_dir():
            shutil.rmtree(self.local / name)
        else:
            (self.local / name).unlink(missing_ok=True)

    def sync(self, names: list[str]) -> None:
        paths = [self.local / n for n in names]
        folders = {p.parent for p in paths} | {p.parent.parent for p in paths}
        for p in [*paths, *folders, self.local]:
            if p.exists():
                _fsync(p)

    def _beside(self, suffix: str) -> Path:
        return Path(str(self.local) + suffix)

    def flag(self, suffix: str) -> bool:
        return self._beside(suffix).exists()

    def set_flag(self, suffix: str, on: bool) -> None:
        where = self._beside(suffix)
        if on:
            where.touch()
            _fsync(where.parent)
        else:
            where.unlink(missing_ok=True)

    def lock(self) -> FileLock:
        return FileLock(str(self._beside(".lock")))


class RemoteFolder(Folder):
    """A folder in an object store, through fsspec: a PUT is durable when it returns, the lock is a lease."""

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.fs, root = filesystem(self.text)
        self.root = root.rstrip("/")
        # The lock and the flags go beside the folder; beside a bucket is another bucket's name.
        if self.fs.root_marker == "" and "/" not in self.root:
            raise UsageError(f"{self.text}: name a folder inside the bucket, such as "
                             f"{self.text.rstrip('/')}/features.zarr")

    @property
    def zarr_path(self) -> str:
        return self.text

    def absolute(self) -> str:
        if self.text.startswith("memory://"):
            raise UsageError(f"{self.text}: a memory:// store lives in one process; workers cannot reach it")
        return self.text

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def is_file(self, name: str) -> bool:
        return self.fs.isfile(self._key(name))

    def read_text(self, name: str) -> str:
        return self.fs.cat_file(self._key(name)).decode()

    def present(self, files: list[str], under: str) -> set[str]:
        """One listing of `under`, not a request per file."""
        if not files:
            return set()
        self.fs.invalidate_cache()  # other processes write here: never answer from an old listing
        try:
            found = self.fs.find(self._key(under))
        except FileNotFoundError:
            return set()
        return {f[len(self.root) + 1:] for f in found}

    def entries(self) -> list[str]:
        self.fs.invalidate_cache()
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def make(self) -> None:
        """Nothing: an object store has no folders to create."""

    def remove(self, name: str) -> None:
        try:
            self.fs.rm(self._key(name), recursive=True)
        except FileNotFoundError:
            pass

    def sync(self, names: list[str]) -> None:
        """Nothing: a PUT is durable once it returns."""

    def flag(self, suffix: str) -> bool:
        return self.fs.exists(self.root + suffix)

    def set_flag(self, suffix: str, on: bool) -> None:
        if on:
            self.fs.pipe_file(self.root + suffix, b"")
        elif self.fs.exists(self.root + suffix):
            self.fs.rm(self.root + suffix)

    def lock(self) -> Lease:
        return Lease(self.fs, self.root + ".lock", self.text)
