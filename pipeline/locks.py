"""One writer at a time: the `Lock` a folder hands its writer (as dvc's `LockBase` with its implementations).

On a disk it is an OS file lock (`FileLock`: flock on POSIX, LockFileEx on Windows), which the system releases
when its holder dies. In an object store there is no flock, so the lock is a lease (`Lease`): an object created
only if absent (S3's conditional write), renewed while its holder lives, and taken over once it expires.
`storage.Folder.lock()` picks the one its folder needs.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from headstart.export.errors import BusyError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

LEASE_SECONDS = 60.0  # a killed remote writer's lease lapses after this; its holder renews it 4 times as often


class Lock(ABC):
    """A held writer's lock: taken when made (BusyError naming the holder otherwise), released once."""

    @abstractmethod
    def check(self) -> None:
        """Raise BusyError unless this writer still holds the lock, with time to spare for one commit."""

    @abstractmethod
    def release(self) -> None:
        """Let the lock go; a second call does nothing."""

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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


class FileLock(Lock):
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
        """Nothing to check: an OS lock cannot be lost while its file is open."""

    def release(self) -> None:
        if self._lock.is_locked:
            self._note.unlink(missing_ok=True)
            self._lock.release()


class Lease(Lock):
    """A writer's lease in an object store: numbered objects LOCK/<n>, each created only if absent.

    The holder of the highest number holds the lock while its lease has not expired; it renews the lease every
    quarter of LEASE_SECONDS. A newcomer refuses a live lease, naming its holder, and takes over an expired one
    (or one whose process is known dead on this machine) by creating the next number: of two newcomers racing,
    one creation fails. A holder that finds a higher number, or cannot renew in time, has lost the lock and
    stops before its next commit. Releasing marks the lease released and removes the older ones.
    """

    def __init__(self, fs: AbstractFileSystem, where: str, shown: str) -> None:
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
            except Exception as e:  # any network fault: retried at the next beat, or the lease lapses
                if time.time() - self._renewed > self.ttl / 2:
                    self._lost = f"the lease could not be renewed ({type(e).__name__}: {e})"

    def check(self) -> None:
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
