"""One `rtl run` per run directory: an exclusive lock on ``<run dir>/run.lock``, which holds the owner's pid.

The lock is an ``fcntl.flock`` on the open file, so the kernel drops it when its process ends, however it ends: a
lock file left by a killed run is stale by construction and never blocks ``--resume``.
"""

from __future__ import annotations

import fcntl
import os
from typing import Optional

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """The run directory is held by another live `rtl run`."""


class RunLock:
    """Hold the run directory ``out_dir`` until :meth:`release` (or the end of the process).

    Raises:
        RunLockedError: another process holds it; the message names its pid.
    """

    def __init__(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, LOCK_NAME)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _read_pid(fd)
            os.close(fd)
            who = f"pid {owner}" if owner else "another process"
            raise RunLockedError(
                f"{out_dir} is in use by another rtl run ({who}); wait for it to finish or stop it, then --resume "
                f"{out_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: Optional[int] = fd

    def release(self) -> None:
        """Drop the lock (the file stays; it is stale once unlocked)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
