"""One run at a time in an output dir: a run holds its dir from before it writes anything until it ends.

- A local (or shared POSIX) path: an exclusive `flock` on `<dir>/.run.lock`, which the OS lets go when the
  holding process ends, however it ends: a crash or a SIGKILL cannot leave the dir held. The file says
  who holds it.
- An object store, which has no locks: a lease object `<dir>/.run-lease.json` naming its holder, whose
  heartbeat the holder rewrites every LEASE_BEAT_SECONDS. Another run takes the dir over once that
  heartbeat is LEASE_STALE_SECONDS old (its holder died without letting go), or at once where the holder is a
  process of this host that no longer exists (a crashed run, rerun where it ran).
A run that finds its dir held stops at once with one line: who holds it, since when, and what to do.
`ensemble.run`, `ensemble.tune` and `ensemble.revote` hold their dir; `ensemble.predict` only reads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs

from ensemble.config import ConfigError
from ensemble.rundir import LEASE_FILE, LOCK_FILE
from ensemble.storage import Storage

LEASE_BEAT_SECONDS = 10.0
LEASE_STALE_SECONDS = 60.0


def refusal(location: str, holder: dict[str, Any]) -> ConfigError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "unknown"
    return ConfigError(
        f"output dir {location} is held by another run (host {holder.get('host', 'unknown')}, pid "
        f"{holder.get('pid', 'unknown')}, since {since}); wait for it to end, or use another --output-dir"
    )


class OutputDirHold:
    """This process's hold on an output dir, taken when made (a ConfigError if another run holds it) and let go
    at the end of its `with` block; a dir the hold created and nothing else wrote into is removed again."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        self.token = uuid.uuid4().hex
        self.created = storage.filesystem.get_file_info(storage.root).type == pyarrow.fs.FileType.NotFound
        self.taken_over: dict[str, Any] | None = None  # a stale lease's holder, taken over
        if storage.is_local:
            self._lock()
        else:
            self._lease()

    def __enter__(self) -> OutputDirHold:
        return self

    def __exit__(self, *_: object) -> None:
        if self.storage.is_local:
            self._remove_if_unused(LOCK_FILE)
            os.close(self.descriptor)  # lets the lock go
        else:
            self.stopped.set()
            self.beats.join()
            with contextlib.suppress(OSError, ConfigError):  # a storage that went away
                if read_lease(self.storage).get("token") == self.token:
                    self.storage.filesystem.delete_file(self.storage.path(LEASE_FILE))
            self._remove_if_unused()

    def _lock(self) -> None:
        directory = Path(self.storage.root)
        directory.mkdir(parents=True, exist_ok=True)
        self.descriptor = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(self.descriptor, 4096, 0).decode(errors="replace")
            os.close(self.descriptor)
            raise refusal(self.storage.location, _holder(text)) from None
        os.ftruncate(self.descriptor, 0)
        os.pwrite(self.descriptor, json.dumps(self.holder).encode(), 0)

    def _lease(self) -> None:
        lease = read_lease(self.storage)
        if lease and time.time() - lease.get("heartbeat", 0) < LEASE_STALE_SECONDS and not ended_here(lease):
            raise refusal(self.storage.location, lease)
        self.taken_over = lease or None
        self._beat()
        # Two runs that found no lease at once both wrote one: the one whose lease is not read back steps aside.
        lease = read_lease(self.storage)
        if lease.get("token") != self.token:
            raise refusal(self.storage.location, lease)
        self.stopped = threading.Event()
        self.beats = threading.Thread(target=self._beat_until_stopped, name="output-dir-lease", daemon=True)
        self.beats.start()

    def _beat(self) -> None:
        lease = self.holder | {"token": self.token, "heartbeat": time.time()}
        self.storage.write_text(json.dumps(lease), LEASE_FILE)

    def _beat_until_stopped(self) -> None:
        while not self.stopped.wait(LEASE_BEAT_SECONDS):
            with contextlib.suppress(OSError):  # a missed beat; the lease goes stale only after several
                self._beat()

    def _remove_if_unused(self, *left: str) -> None:
        """Remove the dir this hold created if it holds nothing but `left`: a run refused after taking the hold
        (no node can hold its members, say) leaves nothing behind."""
        if not self.created:
            return
        selector = pyarrow.fs.FileSelector(self.storage.root, allow_not_found=True, recursive=True)
        with contextlib.suppress(OSError):
            names = [self.storage.relative(info.path) for info in self.storage.filesystem.get_file_info(selector)]
            if sorted(names) == sorted(left):
                self.storage.filesystem.delete_dir(self.storage.root)


def read_lease(storage: Storage, tries: int = 3) -> dict[str, Any]:
    """The lease in an object-store dir ({} if there is none). A read can be torn while the holder rewrites
    it: the store's reader asks the object's size, then reads that many bytes of what may by then be the next
    heartbeat, a character longer or shorter. So a lease that does not parse, or cannot be read, is read again."""
    for _ in range(tries - 1):
        with contextlib.suppress(OSError, ConfigError):
            text = storage.read_text(LEASE_FILE)
            if text is None or _holder(text):
                return _holder(text or "")
        time.sleep(0.05)
    return _holder(storage.read_text(LEASE_FILE) or "")


def ended_here(holder: dict[str, Any]) -> bool:
    """Whether a lease's holder was a process of this host that has ended (its pid is gone)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user has that pid now
        return False
    return False


def _holder(text: str) -> dict[str, Any]:
    """The holder a lock file or lease names ({} if it names none: empty, or being written)."""
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}
