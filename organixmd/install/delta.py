"""Delta installs: find the blocks of a new image this host already holds in its two
slots, fetch the frames that hold the rest with Range requests, and install from both,
every chunk checked against the signed chunk table before it is written and the whole
slot read back at the end (docs/format.md, "Delta updates"; the format is
:mod:`organixmd.release.delta`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zstandard

from organixmd.base.errors import ChunkMismatch, ImageError, ImageMismatch, OrganixmError
from organixmd.install.blockio import DeviceReader, SlotWriter, aligned_buffer, hash_device
from organixmd.release.delta import (
    BLOCK_SIZE,
    MERGE_GAP,
    PARALLEL_FETCHES,
    SAMPLE_MIN_SHARE,
    SAMPLE_READ,
    SAMPLE_WINDOWS,
    SCAN_READ,
    WORTH_IT,
    ZERO_KEY,
    DeltaIndex,
    block_key,
    fetch_index,
)
from organixmd.release.meta import Release

if TYPE_CHECKING:
    from organixmd.install.pipeline import CheckpointCallback, InstallResult, ProgressCallback
    from organixmd.release import minisign
    from organixmd.release.sources import Source


# ------------------------------------------------------------------------- the host


@dataclass(frozen=True)
class LocalSlot:
    """A slot this host may copy blocks from."""

    name: str
    path: Path
    #: Bytes of the slot that are read.
    size: int
    #: Byte offset of the slot inside ``path``.
    base: int = 0


class LocalBlocks:
    """Which blocks of the new image this host holds, and where.

    Two slots are read: ``stable`` (the booted slot, never written) and ``target``
    (the slot being written). A block of ``target`` is a source only for a chunk at
    or before its own: the install writes chunks in order, so it is still the old
    block when that chunk is assembled. Memory, by construction: 8 bytes of key and
    12 of locations per block of the new image, plus a lookup table of 8 to 16 bytes
    per block during the scan (28 to 36 MiB for a 4 GiB image).
    """

    def __init__(
        self,
        index: DeltaIndex,
        chunk_size: int,
        *,
        stable: LocalSlot | None,
        target: LocalSlot | None,
    ) -> None:
        self.index = index
        self.per_chunk = chunk_size // BLOCK_SIZE
        self.stable = stable
        self.target = target
        blocks = index.blocks
        #: The first block of the new image with the same key (itself for the first);
        #: -1 for a block of zeros.
        self.head = array("i", [0]) * blocks
        self.stable_at = array("i", [-1]) * blocks
        self.target_at = array("i", [-1]) * blocks
        self.scanned_bytes = 0
        self.sampled_bytes = 0
        self.seconds = 0.0
        self._first: Callable[[int], int] | None = None

    def _lookup(self) -> Callable[[int], int]:
        """``first(key)``: the first block of the new image with ``key``, else -1; fills
        :attr:`head`. The table (open addressing, 8 to 16 bytes per block) lives as
        long as the function."""
        keys, head = self.index.keys, self.head
        size = 1
        while size < 2 * len(keys):
            size <<= 1
        mask = size - 1
        # The first block of each key, stored as number + 1.
        table = array("I", [0]) * size
        for number, key in enumerate(keys):
            if key == ZERO_KEY:
                head[number] = -1
                continue
            position = key & mask
            while entry := table[position]:
                if keys[entry - 1] == key:
                    head[number] = entry - 1
                    break
                position = (position + 1) & mask
            else:
                table[position] = number + 1
                head[number] = number

        def first(key: int) -> int:
            position = key & mask
            while entry := table[position]:
                if keys[entry - 1] == key:
                    return entry - 1
                position = (position + 1) & mask
            return -1

        return first

    def sample(self) -> float:
        """The share of sampled local blocks (zeros left out) that the new image holds.

        Reads :data:`SAMPLE_WINDOWS` evenly spaced pieces of :data:`SAMPLE_READ` bytes
        of each slot (at most 16 MiB a slot), so that a host holding nothing of the
        new image does not read its slots whole for nothing. Blocking.
        """
        first = self._lookup_once()
        sampled = found = 0
        for slot in (self.stable, self.target):
            if slot is None:
                continue
            for key in _sample_keys(slot):
                if key == ZERO_KEY:
                    continue
                sampled += 1
                found += first(key) >= 0
        self.sampled_bytes = sampled * BLOCK_SIZE
        return found / sampled if sampled else 0.0

    def _lookup_once(self) -> Callable[[int], int]:
        if self._first is None:
            self._first = self._lookup()
        return self._first

    def scan(self) -> None:
        """Read both slots once and record where the new image's blocks are. Blocking."""
        started = time.monotonic()
        first = self._lookup_once()

        def read(slot: LocalSlot, at: array[int], keep_first: bool) -> int:
            scanned = 0
            for block, key in _slot_keys(slot):
                scanned += BLOCK_SIZE
                if key == ZERO_KEY:
                    continue
                number = first(key)
                # The stable slot: any copy will do. The target: the last one, which
                # stays valid for the most chunks.
                if number >= 0 and (not keep_first or at[number] < 0):
                    at[number] = block
            return scanned

        # Both slots at once, so their reads overlap (a thread waiting for its device
        # holds no lock); each thread writes only its own array.
        work = [
            (slot, at, keep_first)
            for slot, at, keep_first in (
                (self.stable, self.stable_at, True),
                (self.target, self.target_at, False),
            )
            if slot is not None
        ]
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="delta-scan") as pool:
            self.scanned_bytes = sum(pool.map(lambda job: read(*job), work))
        # The table is no longer needed: the plan uses head and the two arrays.
        self._first = None
        self.seconds = time.monotonic() - started

    def source(self, number: int) -> tuple[LocalSlot, int] | None:
        """Where block ``number`` of the new image can be read here, if anywhere;
        a block of zeros has no source (:meth:`is_zero`)."""
        first = self.head[number]
        if first < 0:
            return None
        block = self.stable_at[first]
        if block >= 0 and self.stable is not None:
            return self.stable, block
        block = self.target_at[first]
        if (
            block >= 0
            and self.target is not None
            and block // self.per_chunk >= number // self.per_chunk
        ):
            return self.target, block
        return None

    def is_zero(self, number: int) -> bool:
        return self.head[number] < 0


def _sample_keys(slot: LocalSlot) -> Iterator[int]:
    """The keys of the blocks in :data:`SAMPLE_WINDOWS` evenly spaced pieces of ``slot``."""
    blocks = slot.size // BLOCK_SIZE
    per_window = SAMPLE_READ // BLOCK_SIZE
    if blocks == 0:
        return
    windows = min(SAMPLE_WINDOWS, max(1, blocks // per_window))
    fd = os.open(slot.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for window in range(windows):
            block = window * blocks // windows
            count = min(per_window, blocks - block)
            data = os.pread(fd, count * BLOCK_SIZE, slot.base + block * BLOCK_SIZE)
            view = memoryview(data)
            for offset in range(0, len(data) - len(data) % BLOCK_SIZE, BLOCK_SIZE):
                yield block_key(view[offset : offset + BLOCK_SIZE])
    finally:
        os.close(fd)


def _slot_keys(slot: LocalSlot) -> Iterator[tuple[int, int]]:
    """``(block number, key)`` of every whole block of ``slot``, read in large pieces."""
    fd = os.open(slot.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        position = 0
        while position + BLOCK_SIZE <= slot.size:
            want = min(SCAN_READ, slot.size - position)
            data = os.pread(fd, want - want % BLOCK_SIZE, slot.base + position)
            usable = len(data) - len(data) % BLOCK_SIZE
            if usable == 0:
                return
            view = memoryview(data)
            first = position // BLOCK_SIZE
            for offset in range(0, usable, BLOCK_SIZE):
                yield first + offset // BLOCK_SIZE, block_key(view[offset : offset + BLOCK_SIZE])
            position += usable
    finally:
        os.close(fd)


# ------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Fetch:
    """One Range request: frames ``first`` to ``last`` of the frames object."""

    first: int
    last: int
    start: int
    length: int


@dataclass
class Plan:
    """What a delta install from ``start_chunk`` fetches, and what it reuses."""

    local: LocalBlocks
    chunk_size: int
    start_chunk: int
    #: Frames needed by each chunk from ``start_chunk`` on, in order.
    frames_of_chunk: list[list[int]]
    fetches: list[Fetch]
    reused_bytes: int
    zero_bytes: int
    fetch_bytes: int

    #: Bytes reused by the chunks before each chunk from ``start_chunk`` on.
    reused_before: list[int] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.fetches)

    def reused_until(self, chunk: int) -> int:
        """Bytes copied from local slots by the chunks from ``start_chunk`` to ``chunk``."""
        index = chunk - self.start_chunk
        if index >= len(self.reused_before):
            return self.reused_bytes
        return self.reused_before[index]


def make_plan(local: LocalBlocks, chunk_size: int, start_chunk: int) -> Plan:
    """Decide, block by block, what comes from where; merge frames into requests."""
    index = local.index
    per_frame = index.blocks_per_frame
    per_chunk = chunk_size // BLOCK_SIZE
    chunks = -(-index.image_size // chunk_size)
    frames_of_chunk: list[list[int]] = []
    needed: list[int] = []
    reused = zeros = 0
    last_frame = -1
    reused_before: list[int] = []
    for chunk in range(start_chunk, chunks):
        reused_before.append(reused)
        frames: list[int] = []
        for number in range(chunk * per_chunk, min((chunk + 1) * per_chunk, index.blocks)):
            length = min(BLOCK_SIZE, index.image_size - number * BLOCK_SIZE)
            if local.is_zero(number):
                zeros += length
            elif local.source(number) is not None:
                reused += length
            else:
                frame = number // per_frame
                if not frames or frames[-1] != frame:
                    frames.append(frame)
                if frame != last_frame:
                    needed.append(frame)
                    last_frame = frame
        frames_of_chunk.append(frames)
    fetches = _merge(index, needed)
    return Plan(
        local=local,
        chunk_size=chunk_size,
        start_chunk=start_chunk,
        frames_of_chunk=frames_of_chunk,
        fetches=fetches,
        reused_bytes=reused,
        zero_bytes=zeros,
        fetch_bytes=sum(fetch.length for fetch in fetches),
        reused_before=reused_before,
    )


#: A request is cut at this many compressed bytes (memory: PARALLEL_FETCHES of them).
MAX_REQUEST = 4 * 1024 * 1024


def _merge(index: DeltaIndex, frames: list[int]) -> list[Fetch]:
    fetches: list[Fetch] = []
    offsets, lengths = index.frame_offsets, index.frame_lengths
    for frame in frames:
        if fetches:
            last = fetches[-1]
            gap_ok = frame - last.last - 1 <= MERGE_GAP
            end = offsets[frame] + lengths[frame]
            if gap_ok and end - last.start <= MAX_REQUEST:
                fetches[-1] = Fetch(last.first, frame, last.start, end - last.start)
                continue
        fetches.append(Fetch(frame, frame, offsets[frame], lengths[frame]))
    return fetches


# ------------------------------------------------------------------------- preparing


@dataclass(frozen=True)
class Prepared:
    """The outcome of :func:`prepare`: a plan worth installing, or why not."""

    plan: Plan | None
    reason: str
    index_bytes: int = 0


async def prepare(
    source: Source,
    release: Release,
    keys: Sequence[minisign.PublicKey],
    *,
    stable: LocalSlot | None,
    target: LocalSlot | None,
    start_chunk: int,
) -> Prepared:
    """Fetch the index, read the local slots, and plan; a plan only when it saves
    enough (:data:`WORTH_IT`). Errors of the index are reasons, not failures: the
    full image is always an option."""
    image = release.image
    try:
        index, index_bytes, reason = await fetch_index(source, release, keys)
    except OrganixmError as exc:
        return Prepared(None, f"delta index refused: {exc.message}")
    if index is None or image is None:
        return Prepared(None, reason, index_bytes)
    local = LocalBlocks(index, image.chunk_size, stable=stable, target=target)
    try:
        share = await asyncio.to_thread(local.sample)
        if share < SAMPLE_MIN_SHARE:
            return Prepared(
                None,
                f"a sample of the local slots ({local.sampled_bytes // 2**20} MiB) found "
                f"{share:.0%} of its blocks in the new image: the full image is streamed "
                "instead",
                index_bytes,
            )
        await asyncio.to_thread(local.scan)
    except OSError as exc:
        return Prepared(None, f"cannot read the local slots: {exc.strerror or exc}", index_bytes)
    plan = make_plan(local, image.chunk_size, start_chunk)
    remaining = sum(chunk.length for chunk in image.chunks[start_chunk:])
    if plan.fetch_bytes > WORTH_IT * remaining:
        return Prepared(
            None,
            f"the delta would download {plan.fetch_bytes} of {remaining} bytes: "
            "the full image is streamed instead",
            index_bytes,
        )
    return Prepared(plan, "", index_bytes)


# ------------------------------------------------------------------------- installing


class _Frames:
    """Fetches the plan's requests in order, :data:`PARALLEL_FETCHES` at a time, and
    hands out the compressed frames they hold."""

    def __init__(self, source: Source, index: DeltaIndex, fetches: list[Fetch]) -> None:
        self.source = source
        self.index = index
        self.fetches = fetches
        self.tasks: dict[int, asyncio.Task[bytes]] = {}
        self.next_fetch = 0
        self.current: tuple[Fetch, bytes] | None = None
        self.downloaded = 0
        self.requests = 0

    def _start(self) -> None:
        while self.next_fetch < len(self.fetches) and len(self.tasks) < PARALLEL_FETCHES:
            fetch = self.fetches[self.next_fetch]
            self.tasks[self.next_fetch] = asyncio.ensure_future(
                self.source.read_range(self.index.frames_object, fetch.start, fetch.length)
            )
            self.next_fetch += 1

    def waits(self, frame: int) -> bool:
        """Whether :meth:`frame` would wait for the network to hand out ``frame``."""
        if self.current is not None and frame <= self.current[0].last:
            return False
        self._start()
        return not self.tasks or not self.tasks[min(self.tasks)].done()

    async def frame(self, frame: int) -> bytes:
        """The compressed bytes of ``frame``; frames are asked for in plan order."""
        while self.current is None or frame > self.current[0].last:
            self._start()
            if not self.tasks:
                raise AssertionError(f"frame {frame} is not in the plan")
            first = min(self.tasks)
            data = await self.tasks.pop(first)
            self.requests += 1
            self.downloaded += len(data)
            self.current = (self.fetches[first], data)
        fetch, data = self.current
        offsets = self.index.frame_offsets
        begin = offsets[frame] - fetch.start
        return data[begin : begin + self.index.frame_lengths[frame]]

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, OrganixmError, OSError):
                await task
        self.tasks.clear()


class DeltaInstaller:
    """Installs a release into a slot from a :class:`Plan`: local blocks and fetched
    frames, every chunk checked against the meta before it is written, the whole slot
    read back from the device at the end. Same interface as
    :class:`organixmd.pipeline.Installer`."""

    def __init__(
        self,
        release: Release,
        source: Source,
        slot_path: Path,
        plan: Plan,
        *,
        index_bytes: int = 0,
        on_progress: ProgressCallback | None = None,
        on_checkpoint: CheckpointCallback | None = None,
        checkpoint_interval: float = 1.0,
        on_verify: Callable[[], None] | None = None,
        slot_offset: int = 0,
    ) -> None:
        if release.image is None:
            raise ImageError("a delta install needs a chunk table")
        self.release = release
        self.image = release.image
        self.source = source
        self.slot_path = slot_path
        self.plan = plan
        self.index_bytes = index_bytes
        self.on_progress = on_progress
        self.on_checkpoint = on_checkpoint
        self.checkpoint_interval = checkpoint_interval
        self.on_verify = on_verify
        self.slot_offset = slot_offset
        self.refetched_chunks = 0
        self.stream_seconds = 0.0

    async def run(self, start_chunk: int = 0, etag: str | None = None) -> InstallResult:
        from organixmd.install.pipeline import InstallResult, Progress, ReadBack, slot_error

        if start_chunk != self.plan.start_chunk:
            raise AssertionError("the plan was made for another start chunk")
        started = time.monotonic()
        image = self.image
        chunk_size = image.chunk_size
        frames = _Frames(self.source, self.plan.local.index, self.plan.fetches)
        extra_downloaded = 0
        try:
            writer = await asyncio.to_thread(SlotWriter, self.slot_path, self.slot_offset)
        except OSError as exc:
            raise slot_error(f"cannot open slot {self.slot_path} for writing", exc) from exc
        # Two buffers: chunk n is assembled while chunk n - 1 is being written.
        buffers = [aligned_buffer(chunk_size) for _ in range(2)]
        writing: asyncio.Future[None] | None = None
        #: Where the write in flight ends in the slot.
        writing_end = 0
        last_checkpoint = time.monotonic()
        checkpointed = start_chunk
        done_bytes = start_chunk * chunk_size
        # The read-back runs inside the stream, as in the whole-image pipeline: what is
        # written is made durable and read back from the device in batches, in order,
        # into the whole-image SHA-256 (a resumed install first reads what it kept).
        try:
            hasher = await asyncio.to_thread(
                hash_device, self.slot_path, start_chunk * chunk_size, None, self.slot_offset
            )
            reader = await asyncio.to_thread(DeviceReader, self.slot_path, self.slot_offset)
        except OSError as exc:
            await asyncio.to_thread(writer.close)
            raise slot_error(f"reading slot {self.slot_path} back failed", exc) from exc
        abort = threading.Event()
        readback = ReadBack(
            reader, hasher, start_chunk * chunk_size, abort, None, lambda upto: None
        )
        reading = asyncio.get_running_loop().run_in_executor(None, readback.run)

        async def written() -> None:
            nonlocal writing
            if writing is not None:
                pending, writing = writing, None
                try:
                    await pending
                except OSError as exc:
                    raise slot_error(f"writing slot {self.slot_path} failed", exc) from exc
                readback.written(writing_end)

        try:
            for position, number in enumerate(range(start_chunk, len(image.chunks))):
                buffer = buffers[position % 2]
                length = min(chunk_size, image.size - number * chunk_size)
                now = time.monotonic()
                frames_needed = self.plan.frames_of_chunk[position]
                # About to wait for the network (or the interval is up): every chunk below
                # ``number`` is written once the write in flight is; make them durable and
                # record them, so a cut here resumes after what was copied.
                due = now - last_checkpoint >= self.checkpoint_interval
                waits = bool(frames_needed) and frames.waits(frames_needed[0])
                if self.on_checkpoint is not None and number > checkpointed and (due or waits):
                    await written()
                    await asyncio.to_thread(writer.sync)
                    await self.on_checkpoint(number, etag)
                    last_checkpoint, checkpointed = now, number
                wanted = {}
                for frame in frames_needed:
                    wanted[frame] = await frames.frame(frame)
                good = await asyncio.to_thread(self._assemble, number, buffer, length, wanted)
                if not good:
                    # Some local block changed since the scan, or its key matched other
                    # bytes: never trusted; the whole chunk comes from the image object.
                    extra_downloaded += await self._refetch_chunk(number, buffer, length, etag)
                    self.refetched_chunks += 1
                await written()
                writing = asyncio.ensure_future(
                    asyncio.to_thread(writer.write, number * chunk_size, buffer, length)
                )
                writing_end = number * chunk_size + length
                done_bytes += length
                if self.on_progress is not None:
                    self.on_progress(
                        Progress(
                            done_bytes,
                            image.size,
                            frames.downloaded + extra_downloaded,
                            started,
                            reused=self.plan.reused_until(number + 1),
                        )
                    )
            await written()
            self.stream_seconds = time.monotonic() - started
            if self.on_verify is not None:
                self.on_verify()
            readback.end()
            try:
                await reading
            except OSError as exc:
                raise slot_error(f"reading back slot {self.slot_path} failed", exc) from exc
        finally:
            if writing is not None:
                # The thread writes into a buffer and a descriptor closed below.
                await asyncio.wait({writing})
            abort.set()
            readback.end()
            await asyncio.wait({reading})
            if not reading.cancelled():
                reading.exception()  # retrieved: a failure is already on its way up
            await frames.close()
            await asyncio.to_thread(writer.close)
            await asyncio.to_thread(reader.close)
            for buffer in buffers:
                buffer.close()
        digest = hasher.hexdigest()
        if digest != image.sha256 or readback.position != image.size:
            raise ImageMismatch(
                f"slot {self.slot_path}: SHA-256 {digest} of {readback.position} bytes read back "
                f"from the device differs from the meta's {image.sha256}",
                hint="the device lost or changed writes: check its health; nothing was flipped",
            )
        downloaded = frames.downloaded + extra_downloaded + self.index_bytes
        return InstallResult(
            sha256=image.sha256,
            etag=etag,
            downloaded=downloaded,
            seconds=time.monotonic() - started,
            resumed_from=start_chunk,
            stream_seconds=self.stream_seconds,
            reused=self.plan.reused_bytes,
            requests=frames.requests + self.refetched_chunks + 1,
        )

    def _assemble(self, number: int, buffer: Any, length: int, wanted: dict[int, bytes]) -> bool:
        """Fill ``buffer`` with chunk ``number`` from local blocks, zeros and ``wanted``
        frames; ``True`` when its SHA-256 is the meta's. Blocking.

        Blocks that follow each other in a slot are read with one ``preadv``."""
        local = self.plan.local
        index = local.index
        per_frame = index.blocks_per_frame
        first = number * (self.image.chunk_size // BLOCK_SIZE)
        count = -(-length // BLOCK_SIZE)
        view = memoryview(buffer)
        decompressor = zstandard.ZstdDecompressor()
        decoded: dict[int, bytes] = {}
        descriptors: dict[Path, int] = {}
        try:
            position = 0
            while position < count:
                block = first + position
                found = None if local.is_zero(block) else local.source(block)
                run = 1
                if local.is_zero(block):
                    while position + run < count and local.is_zero(block + run):
                        run += 1
                    end = min(length, (position + run) * BLOCK_SIZE)
                    view[position * BLOCK_SIZE : end] = bytes(end - position * BLOCK_SIZE)
                elif found is not None:
                    slot, at = found
                    while position + run < count:
                        following = local.source(block + run)
                        if following is None or following != (slot, at + run):
                            break
                        run += 1
                    end = min(length, (position + run) * BLOCK_SIZE)
                    fd = descriptors.get(slot.path)
                    if fd is None:
                        fd = os.open(slot.path, os.O_RDONLY | os.O_CLOEXEC)
                        descriptors[slot.path] = fd
                    target = view[position * BLOCK_SIZE : end]
                    if os.preadv(fd, [target], slot.base + at * BLOCK_SIZE) != len(target):
                        return False
                else:
                    frame = block // per_frame
                    data = decoded.get(frame)
                    if data is None:
                        compressed = wanted.get(frame)
                        if compressed is None:
                            return False
                        start, stop = index.frame_range(frame)
                        data = _decompress(decompressor, compressed, stop - start)
                        decoded[frame] = data
                    offset = position * BLOCK_SIZE
                    end = min(length, offset + BLOCK_SIZE)
                    inside = (block - frame * per_frame) * BLOCK_SIZE
                    view[offset:end] = data[inside : inside + end - offset]
                position += run
        except OSError:
            return False
        finally:
            for fd in descriptors.values():
                os.close(fd)
        digest = hashlib.sha256(view[:length]).hexdigest()
        return digest == self.image.chunks[number].sha256

    async def _refetch_chunk(self, number: int, buffer: Any, length: int, etag: str | None) -> int:
        chunk = self.image.chunks[number]
        data = await self.source.read_range(self.release.image_object, chunk.offset, chunk.length)

        def fill() -> None:
            raw = _decompress(zstandard.ZstdDecompressor(), data, length)
            if hashlib.sha256(raw).hexdigest() != chunk.sha256:
                raise ChunkMismatch(
                    f"chunk {number} of {self.source.image_url(self.release)}: SHA-256 differs "
                    "from the meta's"
                )
            memoryview(buffer)[:length] = raw

        await asyncio.to_thread(fill)
        return len(data)


def _decompress(decompressor: zstandard.ZstdDecompressor, data: bytes, length: int) -> bytes:
    """One frame, refused unless it holds exactly ``length`` bytes."""
    try:
        raw = decompressor.decompress(data, max_output_size=length)
    except zstandard.ZstdError as exc:
        raise ImageError(f"a frame does not decompress: {exc}") from exc
    if len(raw) != length:
        raise ImageError(f"a frame holds {len(raw)} bytes, not {length}")
    return raw
