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
from concurrent.futures import Future, ThreadPoolExecutor
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


class DeviceReader:
    """Reads ranges of a slot as they are on the device, not in the page cache, and hashes them.

    Uses O_DIRECT; where the filesystem lacks it, drops the range's page cache first
    (POSIX_FADV_DONTNEED; the caller fsyncs what it wrote before) so the bytes come
    from the disk. Blocking; runs in a worker thread and uses one more thread of its
    own: the next block is read while the current one is hashed (both release the
    GIL), so a range is read at the slower of the device and SHA-256 instead of at
    their sum. Two ``READ_BLOCK`` buffers, whatever the range.
    """

    def __init__(self, path: Path, base: int = 0) -> None:
        self.path = path
        #: Byte offset of the slot inside ``path`` (a partition inside a whole-disk image).
        self.base = base
        self.fd, self.direct = _open(path, os.O_RDONLY)
        self._buffers = [aligned_buffer(READ_BLOCK) for _ in range(2)]
        self._views = [memoryview(buffer) for buffer in self._buffers]
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readback")

    def sync(self) -> None:
        """Make every write to the slot so far durable (the device's volatile cache too)."""
        os.fsync(self.fd)

    def hash_range(self, start: int, end: int, hasher: hashlib._Hash) -> None:
        """Feed bytes ``start`` to ``end`` of the slot, as the device holds them, to ``hasher``.

        ``start`` must be a multiple of 4096 (O_DIRECT); the last read is rounded up
        to 4096 bytes and only ``end - start`` bytes are hashed.
        """
        if end <= start:
            return
        if not self.direct:
            os.posix_fadvise(
                self.fd, self.base + start, round_up(end - start, 4096), os.POSIX_FADV_DONTNEED
            )
        views = self._views

        def read_block(position: int, index: int) -> int:
            want = min(READ_BLOCK, round_up(end - position, 4096))
            got = os.preadv(self.fd, [views[index][:want]], self.base + position)
            if got <= 0:
                raise OSError(errno.EIO, f"short read at byte {position} of {self.path}")
            return min(got, end - position)

        position, index = start, 0
        pending: Future[int] | None = self._reader.submit(read_block, start, 0)
        while pending is not None:
            useful = pending.result()
            following = position + useful
            # The other buffer is free: its block was hashed in the previous round.
            pending = (
                self._reader.submit(read_block, following, 1 - index) if following < end else None
            )
            hasher.update(views[index][:useful])
            position, index = following, 1 - index

    def close(self) -> None:
        if self.fd < 0:
            return
        self._reader.shutdown(wait=True)
        for view in self._views:
            view.release()
        for buffer in self._buffers:
            buffer.close()
        os.close(self.fd)
        self.fd = -1


def hash_device(
    path: Path, length: int, hasher: hashlib._Hash | None = None, base: int = 0
) -> hashlib._Hash:
    """SHA-256 of ``length`` bytes at ``base`` as they are on the device, not in the page cache.

    See :class:`DeviceReader`. Blocking; runs in a worker thread.
    """
    digest = hasher if hasher is not None else hashlib.sha256()
    reader = DeviceReader(path, base)
    try:
        reader.hash_range(0, length, digest)
    finally:
        reader.close()
    return digest
