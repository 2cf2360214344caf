"""The install pipeline: network → decompress → hash → write at offset.

Three stages overlap::

    event loop                 worker thread 1              worker thread 2
    read frame i from the  →   decompress into an aligned →  check chunk i's SHA-256
    network (bounded by        buffer (output bounded by     against the meta, then
    a semaphore)               the buffer)                   O_DIRECT pwrite at
                                                             i * chunk_size

Without a read-back, thread 2 also feeds the whole-image SHA-256 in order and
the chunk check moves to thread 1, so the two hashes run in different threads
(with a read-back, the device's bytes are hashed instead, once).

Memory is bounded by configuration, not by image size (invariant 6): at most
``buffers`` chunks are in flight, each holding one compressed frame and one
page-aligned output buffer that is reused. The semaphore that admits a chunk is
released only after thread 2 has returned the chunk's buffer to the pool, so
thread 1 never waits for a buffer while a permit is held.

Decompressed output is bounded by the buffer: a frame that would decompress to
more than its chunk (a decompression bomb) is refused, not swallowed.

The seed's single-stream format has no chunk table; its compressed bytes flow
through a queue into one streaming decompressor in thread 1, and only the
whole-image hash can be checked. It cannot resume.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import mmap
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from organixmd.base.errors import ChunkMismatch, ImageError, ImageMismatch, OrganixmError, SlotError
from organixmd.install.blockio import DiscardWriter, SlotWriter, aligned_buffer, hash_device
from organixmd.release.meta import Release
from organixmd.release.sources import ByteStream, Source, read_exactly

#: Chunk size used to cut the seed's single stream into writes.
LEGACY_BLOCK = 4 * 1024 * 1024
#: Network read size for the seed's single stream.
LEGACY_READ = 1024 * 1024
#: Default seconds between durable progress records (fsync of the slot, then the state file).
CHECKPOINT_INTERVAL = 1.0

_STOP = object()


@dataclass(frozen=True, slots=True)
class Progress:
    bytes_done: int
    bytes_total: int
    downloaded: int
    started: float

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.bytes_done / elapsed if elapsed > 0 else 0.0


@dataclass(frozen=True, slots=True)
class InstallResult:
    sha256: str
    etag: str | None
    downloaded: int
    #: The whole install, read-back included.
    seconds: float
    resumed_from: int
    #: The stream alone: download, chunk checks and writes, before the read-back.
    stream_seconds: float = 0.0


ProgressCallback = Callable[[Progress], None]
CheckpointCallback = Callable[[int, str | None], Awaitable[None]]


def slot_error(what: str, exc: OSError) -> SlotError:
    """A slot's OSError as a verdict: what failed, the cause, and what to do about it."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = (
            "the file system or device that holds the slot is full: free space there (or "
            "allocate a file-backed slot in full, with fallocate); the next check starts over"
        )
    elif exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        hint = (
            "the slot is not writable: check that it is not immutable (lsattr; chattr -i), "
            "not a read-only device (blockdev --getro; losetup -r) and not on a read-only "
            "mount; nothing was flipped"
        )
    else:
        hint = (
            "the device reported an error: check the kernel log (dmesg) and the disk's "
            "health; nothing was flipped"
        )
    return SlotError(f"{what}: {exc.strerror or exc}", hint=hint)


class _NoHash:
    """Stands in for the whole-image hash when the read-back computes it instead."""

    def update(self, data: memoryview) -> None:
        return None

    def hexdigest(self) -> str:
        return ""


class _Aborted(Exception):
    """A stage stopped because another stage failed or the install was cancelled."""


class _Stages:
    """The two worker-thread stages and the buffer pool they share."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        writer: SlotWriter,
        buffers: int,
        buffer_size: int,
        on_chunk_done: Callable[[int, int], None],
        on_failure: Callable[[BaseException], None],
        hasher: Any,
    ) -> None:
        self.loop = loop
        self.writer = writer
        self.abort = threading.Event()
        self.to_decompress: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.to_write: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.pool: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._all_buffers = [aligned_buffer(buffer_size) for _ in range(buffers)]
        for buffer in self._all_buffers:
            self.pool.put(buffer)
        self.on_chunk_done = on_chunk_done
        self.on_failure = on_failure
        self.hasher = hasher

    def take_buffer(self) -> mmap.mmap:
        while True:
            try:
                return self.pool.get(timeout=0.5)
            except queue.Empty:
                # Only reachable when the writer stage died; normal flow never waits here.
                if self.abort.is_set():
                    raise _Aborted from None

    def fail(self, exc: BaseException) -> None:
        if not self.abort.is_set():
            self.abort.set()
            self.loop.call_soon_threadsafe(self.on_failure, exc)

    def write_stage(self) -> None:
        """Thread 2: check the chunk's SHA-256 (if asked), whole-image hash in order, write.

        Every chunk is checked before its write, in whichever thread balances the
        CPU work (see ``_run_chunked``). Runs in a worker thread.
        """
        try:
            while True:
                item = self.to_write.get()
                if item is _STOP or self.abort.is_set():
                    return
                index, offset, buffer, length, check = item
                view = memoryview(buffer)
                try:
                    if check is not None:
                        check(index, hashlib.sha256(view[:length]).hexdigest())
                    self.hasher.update(view[:length])
                finally:
                    view.release()
                self.writer.write(offset, buffer, length)
                self.pool.put(buffer)
                self.loop.call_soon_threadsafe(self.on_chunk_done, index, length)
        except BaseException as exc:
            self.fail(exc)

    def start(self, decompress_stage: Callable[[], None]) -> list[asyncio.Future[None]]:
        """Run the decompressing stage and the writing stage in worker threads."""
        return [
            self.loop.run_in_executor(None, decompress_stage),
            self.loop.run_in_executor(None, self.write_stage),
        ]

    def close(self) -> None:
        for buffer in self._all_buffers:
            try:
                buffer.close()
            except BufferError:
                # A view of it is still referenced (by a traceback on its way up, say).
                # The mapping is freed with its last view; closing it here must never
                # replace the error that ended the install.
                continue


class _QueueReader:
    """A blocking file-like reader over network pieces, for zstandard's stream_reader."""

    def __init__(self, stages: _Stages, pieces: queue.SimpleQueue[Any], on_consumed: Any) -> None:
        self._stages = stages
        self._pieces = pieces
        self._pending = memoryview(b"")
        self._eof = False
        self._on_consumed = on_consumed

    def read(self, size: int = -1) -> bytes:
        while not self._pending:
            if self._eof:
                return b""
            piece = self._pieces.get()
            if self._stages.abort.is_set():
                raise _Aborted
            if piece is _STOP:
                self._eof = True
                return b""
            self._stages.loop.call_soon_threadsafe(self._on_consumed)
            self._pending = memoryview(piece)
        take = len(self._pending) if size < 0 else min(size, len(self._pending))
        out = bytes(self._pending[:take])
        self._pending = self._pending[take:]
        return out


class Installer:
    """Puts one release into one slot, verified. Create one per install attempt.

    With ``slot_path=None`` nothing is written: the stream is only verified (every
    chunk and the whole image), which is what ``organixctl verify`` does.
    """

    def __init__(
        self,
        release: Release,
        source: Source,
        slot_path: Path | None,
        *,
        buffers: int = 8,
        readback: bool = True,
        on_progress: ProgressCallback | None = None,
        on_checkpoint: CheckpointCallback | None = None,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        slot_offset: int = 0,
        on_verify: Callable[[], None] | None = None,
    ) -> None:
        self.release = release
        self.source = source
        self.slot_path = slot_path
        self.buffers = buffers
        self.readback = readback
        self.on_progress = on_progress
        self.on_checkpoint = on_checkpoint
        self.checkpoint_interval = checkpoint_interval
        #: Where the slot starts inside ``slot_path`` (a partition of a whole-disk image).
        self.slot_offset = slot_offset
        #: Called when the read-back starts (the engine shows the phase "verifying").
        self.on_verify = on_verify
        #: Seconds the stream took (without the read-back), set by :meth:`run`.
        self.stream_seconds = 0.0
        self._failure: BaseException | None = None
        self._chunks_done = 0
        self._bytes_done = 0
        self._downloaded = 0
        self._started = time.monotonic()
        self._permits: asyncio.Semaphore | None = None
        self._last_checkpoint = time.monotonic()
        #: Semaphores the network reader may be waiting on; a stage failure wakes them.
        self._wake: list[tuple[asyncio.Semaphore, int]] = []

    # ------------------------------------------------------------------ public

    async def run(self, start_chunk: int = 0, etag: str | None = None) -> InstallResult:
        """Stream, verify and write the image; with ``readback``, verify it from the device.

        Resumes at ``start_chunk`` (chunks below it are on the device and were
        verified by an earlier run) with a Range request guarded by ``etag``.
        Safe to cancel: the worker threads are stopped and joined before this returns.
        """
        if not self.release.resumable:
            start_chunk = 0
        self._started = time.monotonic()
        if self.release.image is not None and start_chunk:
            # Chunks below start_chunk are on the device: a checkpoint written before the
            # first new chunk arrives (say the resumed request fails) must keep them.
            self._chunks_done = start_chunk
            self._bytes_done = start_chunk * self.release.image.chunk_size
        try:
            writer = (
                DiscardWriter()
                if self.slot_path is None
                else await asyncio.to_thread(SlotWriter, self.slot_path, self.slot_offset)
            )
        except OSError as exc:
            raise slot_error(f"cannot open slot {self.slot_path} for writing", exc) from exc
        # The whole image is hashed exactly once: by the read-back from the device
        # when there is one (it is the check that counts, invariant 2), otherwise
        # here in the stream. Chunks are always checked as they arrive.
        stream_hash = not (
            self.readback and self.slot_path is not None and self.release.image is not None
        )
        try:
            hasher = await self._seed_hash(start_chunk) if stream_hash else _NoHash()
            if self.release.image is not None:
                etag = await self._run_chunked(writer, hasher, start_chunk, etag)
            else:
                etag = await self._run_stream(writer, hasher)
            await asyncio.to_thread(writer.sync)
        except OSError as exc:
            raise slot_error(f"writing slot {self.slot_path} failed", exc) from exc
        finally:
            await asyncio.to_thread(writer.close)
        self.stream_seconds = time.monotonic() - self._started
        digest = hasher.hexdigest() if stream_hash else ""
        if stream_hash and digest != self.release.sha256:
            raise ImageMismatch(
                f"image {self.source.image_url(self.release)}: SHA-256 {digest} of the streamed "
                f"image differs from the meta's {self.release.sha256}"
            )
        if self.readback and self.slot_path is not None:
            if self.on_verify is not None:
                self.on_verify()
            digest = await self.verify_on_device()
        return InstallResult(
            sha256=digest,
            etag=etag,
            downloaded=self._downloaded,
            seconds=time.monotonic() - self._started,
            resumed_from=start_chunk,
            stream_seconds=self.stream_seconds,
        )

    async def verify_on_device(self) -> str:
        """Read the slot back with O_DIRECT and compare with the meta (invariant 2).

        Returns the verified SHA-256; raises ImageMismatch if it differs.
        """
        if self.slot_path is None:
            raise SlotError("verify_on_device needs a slot; this installer only verifies a stream")
        try:
            digest = await asyncio.to_thread(
                hash_device, self.slot_path, self.release.size, None, self.slot_offset
            )
        except OSError as exc:
            raise slot_error(f"reading slot {self.slot_path} back failed", exc) from exc
        if digest.hexdigest() != self.release.sha256:
            raise ImageMismatch(
                f"slot {self.slot_path}: the data read back has SHA-256 {digest.hexdigest()}, "
                f"not the meta's {self.release.sha256}",
                hint="the device may be failing; the slot is not marked bootable",
            )
        return digest.hexdigest()

    # ------------------------------------------------------------------ internals

    async def _seed_hash(self, start_chunk: int) -> Any:
        """The whole-image hash, fed with the already written prefix when resuming."""
        image = self.release.image
        if start_chunk == 0 or image is None or self.slot_path is None:
            return hashlib.sha256()
        prefix = start_chunk * image.chunk_size
        try:
            return await asyncio.to_thread(
                hash_device, self.slot_path, prefix, None, self.slot_offset
            )
        except OSError as exc:
            raise slot_error(f"reading slot {self.slot_path} to resume failed", exc) from exc

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        # Wake the network reader wherever it waits for a permit.
        for semaphore, count in self._wake:
            for _ in range(count + 1):
                semaphore.release()

    def _chunk_done(self, index: int, length: int) -> None:
        self._chunks_done = index + 1
        self._bytes_done += length
        if self._permits is not None:
            self._permits.release()
        if self.on_progress is not None:
            self.on_progress(
                Progress(self._bytes_done, self.release.size, self._downloaded, self._started)
            )

    def _raise_failure(self) -> None:
        failure = self._failure
        if failure is None:
            return
        if isinstance(failure, OrganixmError | OSError):
            raise failure
        if isinstance(failure, zstandard.ZstdError):
            raise ImageError(
                f"image {self.source.image_url(self.release)}: cannot decompress: {failure}"
            ) from failure
        raise failure

    async def _maybe_checkpoint(self, writer: SlotWriter, etag: str | None, force: bool) -> None:
        if self.on_checkpoint is None:
            return
        now = time.monotonic()
        if not force and now - self._last_checkpoint < self.checkpoint_interval:
            return
        self._last_checkpoint = now
        done = self._chunks_done
        # Data first, then the record that says it is there.
        await asyncio.to_thread(writer.sync)
        await self.on_checkpoint(done, etag)

    async def _finish_stages(self, stages: _Stages, futures: list[asyncio.Future[None]]) -> None:
        stages.to_decompress.put(_STOP)
        results = await asyncio.gather(*futures, return_exceptions=True)
        stages.close()
        for result in results:
            if isinstance(result, BaseException) and self._failure is None:
                self._failure = result

    async def _run_chunked(
        self, writer: SlotWriter, hasher: Any, start_chunk: int, etag: str | None
    ) -> str | None:
        image = self.release.image
        assert image is not None  # noqa: S101 - checked by the caller
        loop = asyncio.get_running_loop()
        self._permits = asyncio.Semaphore(self.buffers)
        self._wake = [(self._permits, self.buffers)]
        self._last_checkpoint = time.monotonic()
        stages = _Stages(
            loop, writer, self.buffers, image.chunk_size, self._chunk_done, self._fail, hasher
        )
        where = self.source.image_url(self.release)

        # Balance the two workers: the chunk hash goes to the writer, unless the writer
        # already hashes the whole image (no read-back), then beside the decompression.
        check_in_writer = isinstance(hasher, _NoHash)

        def check_chunk(index: int, digest: str) -> None:
            if digest != image.chunks[index].sha256:
                start = index * image.chunk_size
                raise ChunkMismatch(
                    f"image {where}: chunk {index} (bytes {start}-"
                    f"{start + image.chunk_plain_size(index) - 1}) has SHA-256 {digest}, "
                    f"the meta says {image.chunks[index].sha256}"
                )

        def decompress_stage() -> None:
            """Thread 1: decompress each frame into a buffer (bounded: no bombs)."""
            dctx = zstandard.ZstdDecompressor()
            try:
                while True:
                    item = stages.to_decompress.get()
                    if item is _STOP or stages.abort.is_set():
                        break
                    index, frame = item
                    expected = image.chunk_plain_size(index)
                    buffer = stages.take_buffer()
                    view = memoryview(buffer)
                    try:
                        filled = _decompress_frame(
                            dctx, frame, view, expected, where, index, image.chunks[index].offset
                        )
                        if not check_in_writer:
                            check_chunk(index, hashlib.sha256(view[:filled]).hexdigest())
                    finally:
                        view.release()
                    stages.to_write.put(
                        (
                            index,
                            index * image.chunk_size,
                            buffer,
                            filled,
                            check_chunk if check_in_writer else None,
                        )
                    )
            except BaseException as exc:
                stages.fail(exc)
            finally:
                stages.to_write.put(_STOP)

        futures = stages.start(decompress_stage)
        stream: ByteStream | None = None
        try:
            if start_chunk < len(image.chunks):
                stream = await self.source.open_download(
                    self.release, image.chunks[start_chunk].offset, etag
                )
                etag = stream.etag or etag
                for index in range(start_chunk, len(image.chunks)):
                    await self._permits.acquire()
                    self._raise_failure()
                    chunk = image.chunks[index]
                    frame = await read_exactly(stream, chunk.length, f"image {where} chunk {index}")
                    self._downloaded += len(frame)
                    stages.to_decompress.put((index, frame))
                    await self._maybe_checkpoint(writer, etag, force=False)
        finally:
            if stream is not None:
                await stream.aclose()
            if self._failure is not None:
                stages.abort.set()
            # Frames already queued are finished (bounded by ``buffers``), so a
            # network error or a cancel still leaves every verified chunk recorded.
            await self._finish_stages(stages, futures)
            if self._failure is None:
                await self._maybe_checkpoint(writer, etag, force=True)
        return etag

    async def _run_stream(self, writer: SlotWriter, hasher: Any) -> str | None:
        """The seed's single zstd stream: no chunk table, whole-image hash only."""
        loop = asyncio.get_running_loop()
        self._last_checkpoint = time.monotonic()
        stages = _Stages(
            loop, writer, self.buffers, LEGACY_BLOCK, self._block_done, self._fail, hasher
        )
        pieces: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Network pieces in flight are bounded separately from output buffers.
        piece_permits = asyncio.Semaphore(self.buffers * 4)
        self._wake = [(piece_permits, self.buffers * 4)]
        where = self.source.image_url(self.release)
        size = self.release.size

        def decompress_stage() -> None:
            reader = _QueueReader(stages, pieces, piece_permits.release)
            dctx = zstandard.ZstdDecompressor()
            position = 0
            try:
                with dctx.stream_reader(cast(IO[bytes], reader), read_across_frames=True) as stream:
                    index = 0
                    while True:
                        buffer = stages.take_buffer()
                        view = memoryview(buffer)
                        try:
                            filled = _fill(stream, view[:LEGACY_BLOCK])
                            if filled and position + filled > size:
                                raise ImageError(
                                    f"image {where}: decompresses to more than the meta's "
                                    f"{size} bytes; refused"
                                )
                        finally:
                            view.release()
                        if filled == 0:
                            stages.pool.put(buffer)
                            break
                        stages.to_write.put((index, position, buffer, filled, None))
                        position += filled
                        index += 1
                if position != size:
                    raise ImageMismatch(
                        f"image {where}: decompresses to {position} bytes, the meta says {size}"
                    )
            except BaseException as exc:
                stages.fail(exc)
            finally:
                stages.to_write.put(_STOP)

        futures = stages.start(decompress_stage)
        stream: ByteStream | None = None
        etag: str | None = None
        try:
            stream = await self.source.open_download(self.release, 0, None)
            etag = stream.etag
            while True:
                await piece_permits.acquire()
                self._raise_failure()
                piece = await stream.read(LEGACY_READ)
                if not piece:
                    break
                self._downloaded += len(piece)
                pieces.put(piece)
        except BaseException:
            # The download failed (or was cancelled): the decompressor must not take
            # the end of the pieces for the end of the image.
            stages.abort.set()
            raise
        finally:
            if stream is not None:
                await stream.aclose()
            if self._failure is not None:
                stages.abort.set()
            # Always: the decompressor waits on this queue, whatever ended the download.
            pieces.put(_STOP)
            await self._finish_stages(stages, futures)
        self._raise_failure()
        return etag

    def _block_done(self, index: int, length: int) -> None:
        self._chunks_done = index + 1
        self._bytes_done += length
        if self.on_progress is not None:
            self.on_progress(
                Progress(self._bytes_done, self.release.size, self._downloaded, self._started)
            )


def _fill(stream: Any, view: memoryview) -> int:
    """Read from a zstandard stream reader until ``view`` is full or the stream ends."""
    filled = 0
    while filled < len(view):
        # Each slice is released at once, even when readinto raises: an exported
        # view keeps its buffer from being closed.
        with view[filled:] as rest:
            got: int = stream.readinto(rest)
        if got == 0:
            break
        filled += got
    return filled


def _decompress_frame(
    dctx: zstandard.ZstdDecompressor,
    frame: bytes,
    view: memoryview,
    expected: int,
    where: str,
    index: int,
    offset: int,
) -> int:
    """Decompress one frame into ``view``; exactly ``expected`` bytes or ImageError."""
    try:
        with (
            dctx.stream_reader(frame, read_across_frames=False) as reader,
            view[:expected] as target,
        ):
            filled = _fill(reader, target)
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise ImageError(
            f"image {where}: chunk {index} (compressed bytes {offset}-{offset + len(frame) - 1}) "
            f"is not a valid zstd frame: {exc}"
        ) from None
    if filled < expected:
        raise ImageError(
            f"image {where}: chunk {index} (compressed bytes {offset}-{offset + len(frame) - 1}) "
            f"decompresses to {filled} bytes, expected {expected}"
        )
    if extra:
        raise ImageError(
            f"image {where}: chunk {index} decompresses to more than its {expected} bytes; "
            "refused (a frame larger than its chunk is a decompression bomb)"
        )
    return filled
