"""The organixm image format: independent zstd frames plus the zstd seek table.

A raw image is cut into fixed-size uncompressed chunks; each chunk becomes one
independent zstd frame (content size in the frame header, zstd's content
checksum on), and the zstd *seekable format* seek table is appended as a
skippable frame. ``zstd -d`` therefore still decompresses the whole object, and
any reader can start at a chunk boundary (resume with an HTTP Range request,
per-chunk verification, later delta updates). docs/format.md is the
specification; this module is the writer and the seek-table reader.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from organixmd.base.errors import Cancelled, ConfigError, ImageError
from organixmd.release.meta import (
    MAX_CHUNK_SIZE,
    MAX_IMAGE_SIZE,
    MIN_CHUNK_SIZE,
    Chunk,
    ImageV1,
)

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
DEFAULT_LEVEL = 3

#: Magic of a zstd skippable frame whose payload is the seek table.
SKIPPABLE_MAGIC = 0x184D2A5E
#: Last four bytes of a seekable-format object.
SEEKABLE_MAGIC = 0x8F92EAB1
#: Footer: number of frames (u32), descriptor (u8), seekable magic (u32).
FOOTER = struct.Struct("<IBI")
SKIPPABLE_HEADER = struct.Struct("<II")
ENTRY = struct.Struct("<II")
#: Descriptor bit 7: entries carry an extra XXH64-derived checksum (we never set it).
_CHECKSUM_FLAG = 0x80
#: Descriptor bits 2..6 are reserved and must be zero.
_RESERVED_BITS = 0x7C

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """Where one chunk's frame lies in the compressed object and what it holds."""

    offset: int
    length: int
    plain_size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class WrittenImage:
    """Everything the publisher needs to describe an image it has just written."""

    size: int
    sha256: str
    chunk_size: int
    chunks: tuple[ChunkRecord, ...]
    #: Length of the whole object, seek table included.
    compressed_size: int
    #: SHA-256 of the whole object: the content address it is published under.
    compressed_sha256: str

    def chunk_table(self) -> list[Chunk]:
        return [Chunk(offset=c.offset, length=c.length, sha256=c.sha256) for c in self.chunks]

    def image_v1(self, object_name: str) -> ImageV1:
        """The meta's ``image`` entry for this object published as ``object_name``."""
        return ImageV1(
            object=object_name,
            format="zstd-seekable",
            size=self.size,
            sha256=self.sha256,
            compressed_size=self.compressed_size,
            chunk_size=self.chunk_size,
            chunks=self.chunk_table(),
        )


def check_chunk_size(chunk_size: int) -> None:
    """Raise :class:`ConfigError` unless ``chunk_size`` is one the meta accepts."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size % 4096:
        raise ConfigError(
            f"chunk size {chunk_size} bytes: must be a multiple of 4096 between "
            f"{MIN_CHUNK_SIZE} (64 KiB) and {MAX_CHUNK_SIZE} (64 MiB)"
        )


def source_size(fd: int) -> int:
    """Size of a regular file or a block device open as ``fd``."""
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise ConfigError("the image must be a regular file or a block device")
    # A block device's st_size is 0; seeking to its end gives its length.
    return os.lseek(fd, 0, os.SEEK_END)


def _read_exact(fd: int, offset: int, into: memoryview) -> None:
    """Fill ``into`` from the image at ``offset`` (a reused buffer: no allocation per chunk)."""
    got = 0
    while got < len(into):
        piece = os.preadv(fd, [into[got:]], offset + got)
        if piece == 0:
            raise ImageError(
                f"the image ended at byte {offset + got}, before its size of "
                f"{offset + len(into)} bytes was read",
                hint="do not change the image while it is being published",
            )
        got += piece


class _FrameCompressor:
    """One zstd compression context per worker thread (contexts are not thread-safe).

    A chunk of zeros (a file system's free space: a third of the benchmark's 1 GiB
    image) is recognised by one comparison and given the frame and digest computed
    for the first such chunk of its length: zstd's output is a function of its input
    and parameters, so the object is byte for byte what compressing it again gives.
    """

    def __init__(self, level: int) -> None:
        self._level = level
        self._local = threading.local()
        #: Per chunk length: that many zero bytes, their frame and their SHA-256. A
        #: bytearray, because its comparison with a buffer is one memcmp.
        self._zeros: dict[int, tuple[bytearray, bytes, str]] = {}

    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor: zstandard.ZstdCompressor | None = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(
                level=self._level, write_checksum=True, write_content_size=True
            )
            self._local.compressor = compressor
        return compressor

    def __call__(self, plain: memoryview) -> tuple[bytes, str]:
        """Compress ``plain`` as one frame and hash it. Runs in a worker thread."""
        zeros = self._zeros.get(len(plain))
        if zeros is None:
            empty = bytearray(len(plain))
            zeros = (empty, self._compressor().compress(empty), hashlib.sha256(empty).hexdigest())
            # Two threads may both compute it; either result is the same.
            self._zeros[len(plain)] = zeros
        if zeros[0] == plain:
            return zeros[1], zeros[2]
        return self._compressor().compress(plain), hashlib.sha256(plain).hexdigest()


def seek_table_bytes(entries: list[tuple[int, int]]) -> bytes:
    """The seek table as a skippable frame, for ``(compressed, decompressed)`` sizes."""
    body = b"".join(ENTRY.pack(c, d) for c, d in entries)
    footer = FOOTER.pack(len(entries), 0, SEEKABLE_MAGIC)
    return SKIPPABLE_HEADER.pack(SKIPPABLE_MAGIC, len(body) + len(footer)) + body + footer


def write_image(
    source: Path,
    out: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = DEFAULT_LEVEL,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> WrittenImage:
    """Compress the raw image at ``source`` into ``out`` in the organixm image format.

    Chunks are compressed in parallel on ``workers`` threads (default: every
    core; zstandard and hashlib release the GIL) with at most ``2 * workers``
    chunks in flight, so memory stays bounded whatever the image size. Frames
    are written to ``out`` in order, starting at ``out``'s current position,
    which must be 0. ``progress(done, total)`` is called from this thread after
    each chunk. Blocking: call it from a worker thread in async code, and set
    ``cancel`` to stop it early (it then raises :class:`Cancelled`).

    No library writes the seek table for frames compressed in parallel (pyzstd's
    writer compresses serially), which is why the seek table is assembled here.
    """
    check_chunk_size(chunk_size)
    if not -7 <= level <= 22:
        raise ConfigError(f"compression level {level}: must be between -7 and 22")
    threads = workers if workers is not None else (os.cpu_count() or 1)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open the image {source}: {exc.strerror}") from exc
    try:
        size = source_size(fd)
        if size == 0:
            raise ConfigError(f"the image {source} is empty")
        if size > MAX_IMAGE_SIZE:
            raise ConfigError(f"the image {source} is {size} bytes, over {MAX_IMAGE_SIZE}")
        return _compress(fd, size, out, chunk_size, level, threads, progress, cancel)
    finally:
        os.close(fd)


def _compress(
    fd: int,
    size: int,
    out: BinaryIO,
    chunk_size: int,
    level: int,
    threads: int,
    progress: ProgressCallback | None,
    cancel: threading.Event | None,
) -> WrittenImage:
    whole = hashlib.sha256()
    compressed = hashlib.sha256()
    records: list[ChunkRecord] = []
    position = 0
    compress = _FrameCompressor(level)
    pending: deque[tuple[int, memoryview, Future[tuple[bytes, str]]]] = deque()
    # Each chunk in flight holds one of these until its frame is written, then it is reused.
    in_flight = min(2 * threads, -(-size // chunk_size))
    free = [memoryview(bytearray(chunk_size)) for _ in range(in_flight)]

    def drain_one() -> None:
        nonlocal position
        plain_size, buffer, future = pending.popleft()
        frame, digest = future.result()
        free.append(buffer)
        out.write(frame)
        compressed.update(frame)
        records.append(ChunkRecord(position, len(frame), plain_size, digest))
        position += len(frame)
        if progress is not None:
            progress(min(len(records) * chunk_size, size), size)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zstd") as pool:
        try:
            for offset in range(0, size, chunk_size):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("compression of the image was cancelled")
                buffer = free.pop()
                plain = buffer[: min(chunk_size, size - offset)]
                _read_exact(fd, offset, plain)
                # The whole-image hash needs the chunks in order; this thread sees
                # them in order and hashlib releases the GIL while the pool compresses.
                whole.update(plain)
                pending.append((len(plain), buffer, pool.submit(compress, plain)))
                if len(pending) >= 2 * threads:
                    drain_one()
            while pending:
                drain_one()
        finally:
            for _, _, future in pending:
                future.cancel()
    table = seek_table_bytes([(r.length, r.plain_size) for r in records])
    out.write(table)
    compressed.update(table)
    out.flush()
    return WrittenImage(
        size=size,
        sha256=whole.hexdigest(),
        chunk_size=chunk_size,
        chunks=tuple(records),
        compressed_size=position + len(table),
        compressed_sha256=compressed.hexdigest(),
    )


def read_seek_table(file: BinaryIO) -> list[tuple[int, int]]:
    """Read the seek table at the end of a seekable zstd object.

    Returns one ``(compressed_size, decompressed_size)`` per frame, in order.
    Raises :class:`ImageError` if the footer, the skippable frame around the
    table or the frames' total length does not fit the object. Reads only the
    table (bounded by the object's own size), never the frames.
    """
    end = file.seek(0, os.SEEK_END)
    if end < SKIPPABLE_HEADER.size + FOOTER.size:
        raise ImageError(f"{end} bytes is too short to hold a zstd seek table")
    file.seek(end - FOOTER.size)
    frames, descriptor, magic = FOOTER.unpack(file.read(FOOTER.size))
    if magic != SEEKABLE_MAGIC:
        raise ImageError(f"no zstd seek table: the last 4 bytes are {magic:#010x}")
    if descriptor & _RESERVED_BITS:
        raise ImageError(f"seek table descriptor {descriptor:#04x} sets reserved bits")
    entry_size = ENTRY.size + (4 if descriptor & _CHECKSUM_FLAG else 0)
    table_size = SKIPPABLE_HEADER.size + frames * entry_size + FOOTER.size
    if table_size > end:
        raise ImageError(f"seek table of {frames} frames is larger than the {end}-byte object")
    file.seek(end - table_size)
    raw = file.read(table_size)
    if len(raw) != table_size:
        raise ImageError("the object ended while reading its seek table")
    skippable_magic, frame_size = SKIPPABLE_HEADER.unpack_from(raw)
    if skippable_magic != SKIPPABLE_MAGIC or frame_size != table_size - SKIPPABLE_HEADER.size:
        raise ImageError("the seek table is not enclosed in a matching skippable frame")
    entries: list[tuple[int, int]] = []
    total = 0
    for index in range(frames):
        start = SKIPPABLE_HEADER.size + index * entry_size
        compressed_size, decompressed_size = ENTRY.unpack_from(raw, start)
        entries.append((compressed_size, decompressed_size))
        total += compressed_size
    if total != end - table_size:
        raise ImageError(
            f"the seek table's frames add up to {total} bytes, but {end - table_size} "
            "bytes precede it"
        )
    return entries
