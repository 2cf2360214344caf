"""Crash-safe file replacement, shared by the state file, the GRUB environment and the publisher."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

#: What :func:`tempfile.mkstemp` puts after the prefix: eight of ``[a-z0-9_]``.
_RANDOM = "[a-z0-9_]{8}"


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: temporary file beside it, fsync, rename, fsync dir.

    A power cut leaves the old or the new content, never a torn file. Raises
    OSError (callers convert it into their own error). Blocking.
    """
    fd, temporary = tempfile.mkstemp(prefix=_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_dir(path.parent)


def _prefix(path: Path) -> str:
    return f".{path.name}."


def remove_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files a killed :func:`write_atomic` of ``path`` left beside it.

    Only files named as ``write_atomic`` names them (``.<name>.`` and eight random
    characters) are removed. Call it only while holding the lock of every writer of
    ``path``: a live writer's temporary must not vanish. A missing directory is
    nothing to clean. Returns what was removed; raises OSError. Blocking.
    """
    pattern = re.compile(re.escape(_prefix(path)) + _RANDOM)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return []
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed
