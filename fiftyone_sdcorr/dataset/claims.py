"""Per-sample claims for several workers on one feature store (no FiftyOne import).

Claims are exclusive, non-blocking ``flock`` locks on a lock file per sample: a worker
that cannot take a sample's lock skips it (another worker is on it); the kernel releases
the lock when its holder dies, so a killed worker leaves no stale claim. The store must be
on a filesystem with working ``flock`` (local disks, NFSv4, most cluster filesystems).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fs_now(directory: Path) -> float:
    """The store filesystem's current time (mtime of a fresh file), for mtime comparisons."""
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / f".now-{uuid.uuid4().hex}"
    with open(p, "w"):
        pass
    try:
        return p.stat().st_mtime
    finally:
        p.unlink()


@contextmanager
def exclusive(path: Path):
    """Blocking exclusive flock on ``path`` (created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class SampleLock:
    """Non-blocking per-sample claim (flock on a lock file in the store)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: Optional[int] = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
                raise
            # the file may have been unlinked (sample finished) between open and flock:
            # then this lock guards nothing; retry on the current file
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def failed_since(self, t0: float) -> Optional[str]:
        """The failure reason another worker recorded after ``t0``, if any."""
        st = os.fstat(self.fd)
        if st.st_size == 0 or st.st_mtime < t0:
            return None
        os.lseek(self.fd, 0, os.SEEK_SET)
        return os.read(self.fd, st.st_size).decode("utf-8", "replace") or None

    def record_failure(self, reason: str) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, reason.encode("utf-8"))

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        try:
            if remove:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


__all__ = ["worker_id", "fs_now", "exclusive", "SampleLock"]
