"""One writer per host: the exclusive lock every writer of slots, state and grubenv holds.

The daemon and ``organixmd --once`` both write the inactive slot, the state file and the
GRUB environment. Two of them at once would interleave those writes, so each takes an
exclusive ``flock`` on ``<state_dir>/lock`` before it loads the state, and keeps it for its
lifetime (the kernel drops it when the process dies, ``kill -9`` included: no stale lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from organixmd.base.errors import Busy, StateError


class HostLock:
    """Held for the life of the process that took it."""

    def __init__(self, handle: IO[str]) -> None:
        self._handle = handle

    def release(self) -> None:
        self._handle.close()


def acquire(state_dir: Path) -> HostLock:
    """Take the host's writer lock, or raise :class:`Busy` naming the holder's pid."""
    path = state_dir / "lock"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 - held for the process's lifetime
    except OSError as exc:
        raise StateError(f"cannot open the writer lock {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise Busy(
            f"another organixmd (pid {holder}) holds {path}: it is the one writing the slots, "
            "the state and the GRUB environment here",
            hint="talk to the running daemon with organixctl (check, update), or stop it first",
        ) from None
    with contextlib.suppress(OSError):
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    return HostLock(handle)
