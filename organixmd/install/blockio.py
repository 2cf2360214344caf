"""Block-level I/O on slot devices: aligned buffers, O_DIRECT writes, read-back hashing.

Everything here blocks and is meant to run in worker threads (hashlib, zstandard
and os.pwrite release the GIL for large buffers). Slots may be block devices or
regular files (tests, the demo, file-backed VMs); O_DIRECT is used where the
filesystem supports it, with a buffered fallback that still fsyncs and drops the
page cache before a read-back, so verification always reads what is on the disk.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PAGE = mmap.PAGESIZE
#: Size of the buffers used for read-back (large: few GIL hand-backs, see notes).
READ_BLOCK = 4 * 1024 * 1024

_BLKGETSIZE64 = 0x80081272
_BLKSSZGET = 0x1268


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def aligned_buffer(size: int) -> mmap.mmap:
    """A zeroed, page-aligned anonymous buffer of at least ``size`` bytes."""
    return mmap.mmap(-1, round_up(max(size, 1), PAGE))


def device_size(path: Path) -> int:
    """Capacity in bytes of a block device, or the size of a regular file."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
            size: int = struct.unpack("Q", buf)[0]
            return size
        finally:
            os.close(fd)
    return st.st_size


def sector_size(fd: int) -> int:
    """Logical sector size for a block device fd; 4096 for files (safe for O_DIRECT)."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        buf = fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4)
        size: int = struct.unpack("i", buf)[0]
        return max(size, 512)
    return 4096


def _open(path: Path, flags: int) -> tuple[int, bool]:
    """Open with O_DIRECT if possible; returns (fd, direct)."""
    try:
        return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.open(path, flags | os.O_CLOEXEC), False


class SlotWriter:
    """Writes whole chunks at their offsets. Not thread-safe; one writer thread.

    Lengths are padded with zeros to the sector size (O_DIRECT needs it); the
    caller's buffer must have room for the padding (buffers are page-rounded).
    """

    def __init__(self, path: Path, base: int = 0) -> None:
        self.path = path
        #: Byte offset of the slot inside ``path`` (a partition inside a whole-disk image).
        self.base = base
        self.fd, self.direct = _open(path, os.O_WRONLY)
        self.sector = sector_size(self.fd)

    def write(self, offset: int, buffer: mmap.mmap, length: int) -> None:
        padded = round_up(length, self.sector)
        if padded != length:
            buffer[length:padded] = bytes(padded - length)
        view = memoryview(buffer)[:padded]
        try:
            done = 0
            while done < padded:
                done += os.pwrite(self.fd, view[done:], self.base + offset + done)
        finally:
            view.release()

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DiscardWriter(SlotWriter):
    """A writer that keeps nothing: for verifying a published release end to end."""

    def __init__(self) -> None:
        self.path = Path("/dev/null")
        self.fd = -1
        self.direct = False
        self.sector = 1

    def write(self, offset: int, buffer: mmap.mmap, length: int) -> None:
        return None

    def sync(self) -> None:
        return None

    def close(self) -> None:
        return None


def hash_device(
    path: Path, length: int, hasher: hashlib._Hash | None = None, base: int = 0
) -> hashlib._Hash:
    """SHA-256 of ``length`` bytes at ``base`` as they are on the device, not in the page cache.

    Uses O_DIRECT; where the filesystem lacks it, fsyncs and drops the file's page
    cache first (POSIX_FADV_DONTNEED) so the bytes come from the disk. Blocking; runs
    in a worker thread and uses one more thread of its own: the next block is read
    while the current one is hashed (both release the GIL), so the pass runs at the
    slower of the device and SHA-256 instead of at their sum.
    """
    digest = hasher if hasher is not None else hashlib.sha256()
    fd, direct = _open(path, os.O_RDONLY)
    buffers = [aligned_buffer(READ_BLOCK) for _ in range(2)]
    views = [memoryview(buffer) for buffer in buffers]

    def read_block(position: int, index: int) -> int:
        want = min(READ_BLOCK, round_up(length - position, 4096))
        got = os.preadv(fd, [views[index][:want]], base + position)
        if got <= 0:
            raise OSError(errno.EIO, f"short read at byte {position} of {path}")
        return min(got, length - position)

    try:
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="readback") as reader:
            position, index = 0, 0
            pending = reader.submit(read_block, 0, 0) if length > 0 else None
            while pending is not None:
                useful = pending.result()
                following = position + useful
                # The other buffer is free: its block was hashed in the previous round.
                pending = (
                    reader.submit(read_block, following, 1 - index) if following < length else None
                )
                digest.update(views[index][:useful])
                position, index = following, 1 - index
    finally:
        for view in views:
            view.release()
        for buffer in buffers:
            buffer.close()
        os.close(fd)
    return digest
