"""Where caches and images live: a local folder, or an fsspec URL (s3://, gs://, memory://; file:// is local).

A cache needs little of its folder: whether a file is there, its text, a listing, removal, durability before a
commit, and one writer at a time. On a disk these are os calls, fsync and an OS file lock (filelock: flock on
POSIX, LockFileEx on Windows). In an object store a PUT is
durable when it returns and there is no flock, so the lock is a lease: an object created only if absent
(S3's conditional write), renewed while its holder lives, and taken over once it expires.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from headstart.export.errors import BusyError

LEASE_SECONDS = 60.0  # a killed remote writer's lease lapses after this; its holder renews it 4 times as often


def is_url(where: str | Path) -> bool:
    return "://" in str(where) and not str(where).startswith("file://")


def local_path(where: str | Path) -> Path:
    return Path(str(where).removeprefix("file://"))


def filesystem(url: str):  # noqa: ANN201 - an fsspec filesystem
    """(fsspec filesystem, path inside it) of a URL; a missing fsspec implementation is a clear error."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        protocol = url.split("://", 1)[0]
        extra = "; pip install 'headstart[s3]'" if protocol in ("s3", "s3a") else ""
        raise ValueError(f"{url}: {protocol}:// needs a package that is not installed ({e}){extra}") from None
    except ValueError as e:
        raise ValueError(f"{url}: not a usable location ({e})") from None


def store_error(e: BaseException) -> str | None:
    """One line for an object store client's own exception (credentials, endpoint), which is neither an
    OSError nor a ValueError; None for anything else."""
    if type(e).__module__.split(".")[0] not in ("botocore", "aiobotocore", "s3fs", "gcsfs", "google"):
        return None
    return (f"object store: {type(e).__name__}: {e}; check its credentials and endpoint (for S3: the AWS_* "
            "variables or ~/.aws)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Folder:
    """A folder on a disk or in an object store; names inside it are relative, '/'-separated."""

    def __init__(self, where: str | Path) -> None:
        self.text = str(where)
        self.remote = is_url(where)
        if self.remote:
            self.fs, self.root = filesystem(self.text)
            self.root = self.root.rstrip("/")
            # The lock and the marker go beside the cache; beside a bucket is another bucket's name.
            if self.fs.root_marker == "" and "/" not in self.root:
                raise ValueError(f"{self.text}: name a folder inside the bucket, such as "
                                 f"{self.text.rstrip('/')}/features.zarr")
        else:
            self.local = local_path(where)

    def __str__(self) -> str:
        return self.text

    @property
    def zarr_path(self) -> str:
        """What zarr.open_group takes for this folder."""
        return self.text if self.remote else str(self.local)

    def absolute(self) -> str:
        """The folder as other processes (Dask workers) can open it."""
        if self.remote and self.text.startswith("memory://"):
            raise ValueError(f"{self.text}: a memory:// store lives in one process; workers cannot reach it")
        return self.text if self.remote else str(self.local.resolve())

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def is_file(self, name: str) -> bool:
        return self.fs.isfile(self._key(name)) if self.remote else (self.local / name).is_file()

    def read_text(self, name: str) -> str:
        return self.fs.cat_file(self._key(name)).decode() if self.remote else (self.local / name).read_text()

    def names(self, under: str = "") -> set[str]:
        """In an object store: every file below `under`, as names relative to this folder, in one listing (on a
        disk a stat per file is cheaper than a walk, so the cache asks `is_file`)."""
        self.fs.invalidate_cache()  # other processes write here: never answer from an old listing
        try:
            found = self.fs.find(self._key(under))
        except FileNotFoundError:
            return set()
        return {f[len(self.root) + 1:] for f in found}

    def entries(self) -> list[str]:
        """The names directly inside the folder ([] when it does not exist)."""
        if not self.remote:
            return sorted(p.name for p in self.local.iterdir()) if self.local.is_dir() else []
        self.fs.invalidate_cache()
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def make(self) -> None:
        if not self.remote:
            self.local.mkdir(parents=True, exist_ok=True)

    def remove(self, name: str) -> None:
        """Remove a file or a whole folder inside; nothing when absent."""
        if self.remote:
            try:
                self.fs.rm(self._key(name), recursive=True)
            except FileNotFoundError:
                pass
        elif (self.local / name).is_dir():
            shutil.rmtree(self.local / name)
        else:
            (self.local / name).unlink(missing_ok=True)

    def sync(self, names: list[str]) -> None:
        """Make files (and the folders holding them) durable. A PUT to an object store already is."""
        if self.remote:
            return
        paths = [self.local / n for n in names]
        folders = {p.parent for p in paths} | {p.parent.parent for p in paths}
        for p in [*paths, *folders, self.local]:
            if p.exists():
                _fsync(p)

    # Beside the folder, outside the Zarr hierarchy: the lock and the replace marker.
    def _beside(self, suffix: str) -> str:
        return self.root + suffix if self.remote else str(self.local) + suffix

    def flag(self, suffix: str) -> bool:
        where = self._beside(suffix)
        return self.fs.exists(where) if self.remote else Path(where).exists()

    def set_flag(self, suffix: str, on: bool) -> None:
        where = self._beside(suffix)
        if self.remote:
            if on:
                self.fs.pipe_file(where, b"")
            elif self.fs.exists(where):
                self.fs.rm(where)
        elif on:
            Path(where).touch()
            _fsync(Path(where).parent)
        else:
            Path(where).unlink(missing_ok=True)

    def lock(self) -> FileLock | Lease:
        """Hold the folder's writer lock (CACHE.lock beside it), or raise BusyError naming the holder."""
        return Lease(self.fs, self._beside(".lock"), self.text) if self.remote else FileLock(self._beside(".lock"))


def _me() -> dict:
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "started": _started(os.getpid())}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _started(pid: int) -> str:
    """A process's start time in clock ticks since boot: with the pid, it names one process even after pid reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _dead(holder: dict) -> bool:
    """True only when the holder certainly ran on this machine (same host, same boot) and is gone."""
    if holder.get("host") != socket.gethostname() or not holder.get("boot") or holder.get("boot") != _boot_id():
        return False
    return _started(int(holder.get("pid", -1))) != holder.get("started")


def _holder_text(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


class FileLock:
    """The writer's lock on a local file, through `filelock` (flock on POSIX, LockFileEx on Windows): the system
    releases it when its holder dies, however it dies. Who holds it is noted in a file beside (LOCK.holder),
    since a locked file cannot be read on Windows; the note is only ever shown, never trusted."""

    def __init__(self, path: str) -> None:
        from filelock import FileLock as OSLock
        from filelock import Timeout

        self._note = Path(path + ".holder")
        # Not thread-local: a writer may be closed by another thread than the one that opened it.
        self._lock = OSLock(path, timeout=0, thread_local=False)
        try:
            self._lock.acquire()
        except Timeout:
            try:
                holder = self._note.read_text().strip()
            except OSError:
                holder = ""
            raise BusyError(holder or "another process") from None
        partial = self._note.with_name(f"{self._note.name}.{os.getpid()}")
        try:
            partial.write_text(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            os.replace(partial, self._note)  # readers see the whole note or the previous one
        except OSError:  # the note is only shown (Windows refuses to replace a file open for reading)
            partial.unlink(missing_ok=True)

    def check(self) -> None:
        """Still held (an OS lock cannot be lost while its file is open)."""

    def release(self) -> None:
        if self._lock.is_locked:
            self._note.unlink(missing_ok=True)
            self._lock.release()


class Lease:
    """A writer's lease in an object store: numbered objects LOCK/<n>, each created only if absent.

    The holder of the highest number holds the lock while its lease has not expired; it renews the lease every
    quarter of LEASE_SECONDS. A newcomer refuses a live lease, naming its holder, and takes over an expired one
    (or one whose process is known dead on this machine) by creating the next number: of two newcomers racing,
    one creation fails. A holder that finds a higher number, or cannot renew in time, has lost the lock and
    stops before its next commit. Releasing marks the lease released and removes the older ones.
    """

    def __init__(self, fs, where: str, shown: str) -> None:  # noqa: ANN001 - an fsspec filesystem
        self.fs, self.where, self.shown = fs, where.rstrip("/"), shown
        self.ttl = LEASE_SECONDS
        self.token = uuid.uuid4().hex
        self._lost = ""
        self._stop = threading.Event()
        self.number = self._take()
        self._renewed = time.time()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True)
        self._thread.start()

    def _numbers(self) -> list[int]:
        self.fs.invalidate_cache()
        try:
            names = self.fs.ls(self.where, detail=False)
        except FileNotFoundError:
            return []
        return sorted(int(n.rsplit("/", 1)[-1]) for n in names if n.rsplit("/", 1)[-1].isdigit())

    def _name(self, n: int) -> str:
        return f"{self.where}/{n:010d}"

    def _read(self, n: int) -> dict:
        try:
            return json.loads(self.fs.cat_file(self._name(n)))
        except (FileNotFoundError, ValueError):
            return {}

    def _body(self, released: bool = False) -> bytes:
        return json.dumps({**_me(), "token": self.token, "since": self._since, "expires": time.time() + self.ttl,
                           "released": released}).encode()

    def _take(self) -> int:
        self._since = time.strftime("%Y-%m-%d %H:%M:%S")
        numbers = self._numbers()
        nxt = numbers[-1] + 1 if numbers else 0
        if numbers:
            holder = self._read(numbers[-1])
            if holder and not holder.get("released") and holder.get("expires", 0) > time.time() \
                    and not _dead(holder):
                raise BusyError(f"{_holder_text(holder)} (its lease on {self.shown} lapses in "
                                f"{holder['expires'] - time.time():.0f} s unless renewed)")
        try:
            self.fs.pipe_file(self._name(nxt), self._body(), mode="create")
        except FileExistsError:
            raise BusyError(f"{_holder_text(self._read(nxt))}, which took the lease on {self.shown} just now") \
                from None
        return nxt

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if self._numbers()[-1:] != [self.number]:
                    self._lost = "another writer took the lease over"
                    return
                self.fs.pipe_file(self._name(self.number), self._body())
                self._renewed = time.time()
            except Exception as e:  # noqa: BLE001 - a network fault: retried at the next beat, or the lease lapses
                if time.time() - self._renewed > self.ttl / 2:
                    self._lost = f"the lease could not be renewed ({type(e).__name__}: {e})"

    def check(self) -> None:
        """Raise BusyError unless this writer still holds the lease with time to spare for one commit."""
        if not self._lost and time.time() - self._renewed > self.ttl / 2:
            self._lost = f"the lease was last renewed {time.time() - self._renewed:.0f} s ago"
        if not self._lost and self._numbers()[-1:] != [self.number]:
            self._lost = "another writer took the lease over"
        if self._lost:
            raise BusyError(f"lost the write lease on {self.shown}: {self._lost}; nothing more is committed, "
                            "rerun to resume")

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        try:
            if not self._lost:
                self.fs.pipe_file(self._name(self.number), self._body(released=True))
                for n in self._numbers():
                    if n < self.number:
                        self.fs.rm(self._name(n))
        except OSError:
            pass  # an unreleased lease lapses by itself
