"""The install pipeline: network → decompress → hash → write at offset → read back.

Five stages overlap::

    event loop        thread 1          thread 2          thread 3         thread 4
    read frame i  →   decompress    →   check chunk   →   O_DIRECT     →   fsync what is
    from the          into an           i's SHA-256       pwrite at        written, read it
    network           aligned buffer    against the       i * chunk_size   back (O_DIRECT)
    (bounded by       (output bounded   meta                               and feed the
    semaphores)       by the buffer)                                       whole-image SHA-256

Hashing and writing are separate threads so that a chunk's SHA-256 runs while the
previous chunk's write waits for the device.

The read-back runs inside the stream (thread 4, :class:`ReadBack`): each batch of
written chunks is made durable and read back from the device while later chunks
are still downloading and decompressing, instead of a second pass over the slot.
Each byte is hashed once for its chunk (before its write) and once, as the device
returns it, for the whole image; the slot is good only if that whole-image hash of
the device's bytes is the meta's (invariant 2). The read-back trails the writes by
at most ``READBACK_LAG`` bytes; when the last chunk is written only that tail is
left (the engine shows "verifying" then).

Without a read-back, thread 2 feeds the whole-image SHA-256 of the stream instead
and the chunk check moves to thread 1, so the two hashes run in different threads
(and thread 4 does not run).

Memory is bounded by configuration, not by image size (invariant 6): at most
``buffers`` chunks are in flight (fewer when chunks are large: ``INFLIGHT_BYTES``),
each holding one compressed frame and one page-aligned output buffer that is
reused, plus the read-back's two read buffers.
The semaphore that admits a chunk is released only after thread 3 has returned the
chunk's buffer to the pool, so thread 1 never waits for a buffer while a permit is
held; a second one holds the network back while the read-back trails too far.

Decompressed output is bounded by the buffer: a frame that would decompress to
more than its chunk (a decompression bomb) is refused, not swallowed.

The seed's single-stream format has no chunk table; its compressed bytes flow
through a queue into one streaming decompressor in thread 1, and only the
whole-image hash can be checked, by a read-back after the stream. It cannot resume.
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
from organixmd.install.blockio import (
    DeviceReader,
    DiscardWriter,
    SlotWriter,
    aligned_buffer,
    hash_device,
)
from organixmd.release.meta import Release
from organixmd.release.sources import ByteStream, Source, read_exactly

#: Chunk size used to cut the seed's single stream into writes.
LEGACY_BLOCK = 4 * 1024 * 1024
#: Network read size for the seed's single stream.
LEGACY_READ = 1024 * 1024
#: Default seconds between durable progress records (fsync of the slot, then the state file).
CHECKPOINT_INTERVAL = 1.0
#: How far (in bytes) the read-back may trail the writes: it costs no memory (the
#: read-back reads the device into buffers of its own), and a longer lag means fewer,
#: larger fsync-then-read batches.
READBACK_LAG = 64 * 1024 * 1024
#: Output buffers in flight never hold more than this (or two chunks, if larger):
#: ``buffers`` large chunks would otherwise make memory grow with the chunk size.
INFLIGHT_BYTES = 32 * 1024 * 1024

_STOP = object()


@dataclass(frozen=True, slots=True)
class Progress:
    bytes_done: int
    bytes_total: int
    downloaded: int
    started: float
    #: Of ``bytes_done``: bytes copied from this host's own slots (a delta install).
    reused: int = 0

    @property
    def rate(self) -> float:
        """Image bytes per second since the install (or its resume) started."""
        elapsed = time.monotonic() - self.started
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds until the last byte at the current rate; ``None`` when unknown."""
        rate = self.rate
        if rate <= 0 or self.bytes_done >= self.bytes_total:
            return None
        return (self.bytes_total - self.bytes_done) / rate


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
    #: Bytes of the image copied from this host's own slots (a delta install).
    reused: int = 0
    #: Requests made for the image (a delta install makes many ranged ones).
    requests: int = 1


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
    """The hashing and the writing worker-thread stages and the buffer pool they share.

    The decompressing stage (one per format, see :class:`Installer`) feeds
    ``to_hash``; the hashing stage checks and hashes, then hands the buffer to the
    writing stage, so a chunk's SHA-256 runs while the previous chunk's write waits
    for the device.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        writer: SlotWriter,
        buffers: int,
        buffer_size: int,
        on_chunk_done: Callable[[int, int], None],
        on_failure: Callable[[BaseException], None],
        hasher: Any,
        readback: ReadBack | None = None,
    ) -> None:
        self.loop = loop
        self.writer = writer
        self.abort = threading.Event()
        self.to_decompress: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.to_hash: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.to_write: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.pool: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._all_buffers = [aligned_buffer(buffer_size) for _ in range(buffers)]
        for buffer in self._all_buffers:
            self.pool.put(buffer)
        self.on_chunk_done = on_chunk_done
        self.on_failure = on_failure
        self.hasher = hasher
        #: Told of every write, in order; reads each durable chunk back from the device.
        self.readback = readback

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

    def hash_stage(self) -> None:
        """Thread 2: check the chunk's SHA-256 (if asked) and feed the whole-image hash.

        Every chunk is checked before its write, in whichever thread balances the
        CPU work (see ``_run_chunked``). Runs in a worker thread.
        """
        try:
            while True:
                item = self.to_hash.get()
                if item is _STOP or self.abort.is_set():
                    return
                index, _, buffer, length, check = item
                view = memoryview(buffer)
                try:
                    if check is not None:
                        check(index, hashlib.sha256(view[:length]).hexdigest())
                    self.hasher.update(view[:length])
                finally:
                    view.release()
                self.to_write.put(item)
        except BaseException as exc:
            self.fail(exc)
        finally:
            self.to_write.put(_STOP)

    def write_stage(self) -> None:
        """Thread 3: O_DIRECT write of each checked chunk at its offset, in order."""
        try:
            while True:
                item = self.to_write.get()
                if item is _STOP or self.abort.is_set():
                    return
                index, offset, buffer, length, _ = item
                self.writer.write(offset, buffer, length)
                self.pool.put(buffer)
                if self.readback is not None:
                    self.readback.written(offset + length)
                self.loop.call_soon_threadsafe(self.on_chunk_done, index, length)
        except BaseException as exc:
            self.fail(exc)
        finally:
            if self.readback is not None:
                self.readback.end()

    def start(self, decompress_stage: Callable[[], None]) -> list[asyncio.Future[None]]:
        """Run the decompressing, hashing and writing stages in worker threads."""
        return [
            self.loop.run_in_executor(None, decompress_stage),
            self.loop.run_in_executor(None, self.hash_stage),
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


class ReadBack:
    """Thread 4: reads each written chunk back from the device while the stream goes on.

    The writer reports every write (in order, so what is written is a prefix of the
    slot). This stage takes everything written since its last round as one batch,
    makes it durable (fsync), then reads it back with O_DIRECT (:class:`DeviceReader`,
    the same read as a whole-slot read-back) and feeds the bytes, in order, to the
    whole-image SHA-256. Each byte is hashed once for its chunk (before its write)
    and once, as read from the device, for the whole image.
    """

    def __init__(
        self,
        reader: DeviceReader,
        hasher: Any,
        start: int,
        abort: threading.Event,
        on_verify: Callable[[], None] | None,
        on_read: Callable[[int], object],
    ) -> None:
        self.reader = reader
        self.hasher = hasher
        #: Bytes of the slot read back and hashed so far.
        self.position = start
        self._written = start
        self._ended = False
        self._changed = threading.Condition()
        self._abort = abort
        self._on_verify = on_verify
        self._on_read = on_read

    def written(self, upto: int) -> None:
        """The writer has written the slot up to byte ``upto``. Any thread."""
        with self._changed:
            self._written = max(self._written, upto)
            self._changed.notify()

    def end(self) -> None:
        """No more writes will come. Any thread."""
        with self._changed:
            self._ended = True
            self._changed.notify()

    def run(self) -> None:
        """Read back batch after batch until the writer has ended and all is read back."""
        while True:
            with self._changed:
                while self._written <= self.position and not self._ended:
                    self._changed.wait(0.5)
                    if self._abort.is_set():
                        raise _Aborted
                if self._abort.is_set():
                    raise _Aborted
                upto = self._written
            if upto <= self.position:
                return
            # Durable first: what is read back is what a power cut would leave.
            self.reader.sync()
            if self._on_verify is not None:
                self._on_verify()
            self.reader.hash_range(self.position, upto, self.hasher)
            self.position = upto
            self._on_read(upto)


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
        buffers: int = 4,
        readback: bool = True,
        on_progress: ProgressCallback | None = None,
        on_checkpoint: CheckpointCallback | None = None,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        slot_offset: int = 0,
        on_verify: Callable[[], None] | None = None,
        on_stream_end: Callable[[], None] | None = None,
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
        #: Called before each read from the device (in the read-back's worker thread),
        #: once its batch of chunks is written and durable and before it is read back.
        self.on_verify = on_verify
        #: Called on the event loop when the last chunk is written: what remains is the
        #: read-back of the last batches (the engine shows the phase "verifying").
        self.on_stream_end = on_stream_end
        #: Seconds the stream took, up to the last write (not the read-back's tail).
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
        # The whole image is hashed exactly once. With a chunk table and a read-back,
        # by the read-back inside the stream: every chunk is read back from the device
        # once its write is durable, in order, while later chunks are still on their
        # way (it is the check that counts, invariant 2). Otherwise here in the stream,
        # and the seed's format (no chunk table) is read back in a second pass.
        # Chunks are always checked as they arrive, before their write.
        inline = self.readback and self.slot_path is not None and self.release.image is not None
        try:
            hasher = await self._seed_hash(start_chunk)
            if self.release.image is not None:
                etag = await self._run_chunked(writer, hasher, start_chunk, etag, inline)
            else:
                etag = await self._run_stream(writer, hasher)
            await asyncio.to_thread(writer.sync)
        except OSError as exc:
            raise slot_error(f"writing slot {self.slot_path} failed", exc) from exc
        finally:
            await asyncio.to_thread(writer.close)
        digest = hasher.hexdigest()
        if inline:
            self._check_read_back(digest)
        else:
            self._stream_ended()
            if digest != self.release.sha256:
                raise ImageMismatch(
                    f"image {self.source.image_url(self.release)}: SHA-256 {digest} of the "
                    f"streamed image differs from the meta's {self.release.sha256}"
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
        self._check_read_back(digest.hexdigest())
        return digest.hexdigest()

    def _check_read_back(self, digest: str) -> None:
        if digest != self.release.sha256:
            raise ImageMismatch(
                f"slot {self.slot_path}: the data read back has SHA-256 {digest}, "
                f"not the meta's {self.release.sha256}",
                hint="the device may be failing; the slot is not marked bootable",
            )

    def _stream_ended(self) -> None:
        self.stream_seconds = time.monotonic() - self._started
        if self.on_stream_end is not None:
            self.on_stream_end()

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
        self,
        writer: SlotWriter,
        hasher: Any,
        start_chunk: int,
        etag: str | None,
        inline_readback: bool,
    ) -> str | None:
        """The chunked format; with ``inline_readback``, ``hasher`` hashes the device's bytes."""
        image = self.release.image
        assert image is not None  # noqa: S101 - checked by the caller
        loop = asyncio.get_running_loop()
        buffers = max(2, min(self.buffers, INFLIGHT_BYTES // image.chunk_size))
        self._permits = asyncio.Semaphore(buffers)
        self._wake = [(self._permits, buffers)]
        self._last_checkpoint = time.monotonic()
        stages = _Stages(
            loop,
            writer,
            buffers,
            image.chunk_size,
            self._chunk_done,
            self._fail,
            _NoHash() if inline_readback else hasher,
        )
        where = self.source.image_url(self.release)
        lag: asyncio.Semaphore | None = None
        readback_future: asyncio.Future[None] | None = None
        if inline_readback:
            assert self.slot_path is not None  # noqa: S101 - checked by the caller
            try:
                reader = await asyncio.to_thread(DeviceReader, self.slot_path, self.slot_offset)
            except OSError as exc:
                stages.close()
                raise slot_error(f"cannot open slot {self.slot_path} to read it back", exc) from exc
            # The read-back trails the writes by at most this many chunks.
            lag_chunks = max(buffers, READBACK_LAG // image.chunk_size)
            lag = asyncio.Semaphore(lag_chunks)
            self._wake.append((lag, lag_chunks))
            verified = start_chunk

            def read_back(upto: int) -> None:
                nonlocal verified
                now = len(image.chunks) if upto >= image.size else upto // image.chunk_size
                assert lag is not None  # noqa: S101 - set above
                for _ in range(now - verified):
                    lag.release()
                verified = now

            readback = ReadBack(
                reader,
                hasher,
                start_chunk * image.chunk_size,
                stages.abort,
                self.on_verify,
                lambda upto: loop.call_soon_threadsafe(read_back, upto),
            )
            stages.readback = readback
            readback_future = loop.run_in_executor(None, self._readback_stage, stages, readback)

        # Balance the workers: the chunk hash goes to the hashing stage, unless that stage
        # hashes the whole image (no read-back), then beside the decompression.
        check_in_hash_stage = inline_readback

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
                        if not check_in_hash_stage:
                            check_chunk(index, hashlib.sha256(view[:filled]).hexdigest())
                    finally:
                        view.release()
                    stages.to_hash.put(
                        (
                            index,
                            index * image.chunk_size,
                            buffer,
                            filled,
                            check_chunk if check_in_hash_stage else None,
                        )
                    )
            except BaseException as exc:
                stages.fail(exc)
            finally:
                stages.to_hash.put(_STOP)

        futures = stages.start(decompress_stage)
        stream: ByteStream | None = None
        completed = False
        try:
            if start_chunk < len(image.chunks):
                stream = await self.source.open_download(
                    self.release, image.chunks[start_chunk].offset, etag
                )
                etag = stream.etag or etag
                for index in range(start_chunk, len(image.chunks)):
                    if lag is not None:
                        await lag.acquire()
                    await self._permits.acquire()
                    self._raise_failure()
                    chunk = image.chunks[index]
                    frame = await read_exactly(stream, chunk.length, f"image {where} chunk {index}")
                    self._downloaded += len(frame)
                    stages.to_decompress.put((index, frame))
                    await self._maybe_checkpoint(writer, etag, force=False)
            completed = True
        finally:
            if stream is not None:
                await stream.aclose()
            if self._failure is not None:
                stages.abort.set()
            # Frames already queued are finished (bounded by ``buffers``), so a
            # network error or a cancel still leaves every verified chunk recorded.
            await self._finish_stages(stages, futures)
            if readback_future is not None:
                if completed and self._failure is None:
                    self._stream_ended()
                # The writer has ended, so the read-back ends too: at once after a
                # failure, after the last written chunk otherwise.
                (result,) = await asyncio.gather(readback_future, return_exceptions=True)
                if isinstance(result, BaseException) and self._failure is None:
                    self._failure = result
                assert stages.readback is not None  # noqa: S101 - set with the future
                await asyncio.to_thread(stages.readback.reader.close)
            if self._failure is None:
                await self._maybe_checkpoint(writer, etag, force=True)
        self._raise_failure()
        return etag

    def _readback_stage(self, stages: _Stages, readback: ReadBack) -> None:
        """Thread 4 (see :class:`ReadBack`); a failure stops every stage."""
        try:
            readback.run()
        except _Aborted:
            return
        except OSError as exc:
            stages.fail(slot_error(f"reading slot {self.slot_path} back failed", exc))
        except BaseException as exc:
            stages.fail(exc)

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
                        stages.to_hash.put((index, position, buffer, filled, None))
                        position += filled
                        index += 1
                if position != size:
                    raise ImageMismatch(
                        f"image {where}: decompresses to {position} bytes, the meta says {size}"
                    )
            except BaseException as exc:
                stages.fail(exc)
            finally:
                stages.to_hash.put(_STOP)

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
