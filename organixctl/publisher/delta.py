"""The publisher's side of delta updates: the frames object and the delta index of an
image (docs/format.md, "Delta updates"; the format is :mod:`organixmd.release.delta`)."""

from __future__ import annotations

import hashlib
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import zstandard

from organixmd.base.errors import ImageError
from organixmd.base.objectnames import frames_object_name
from organixmd.release.delta import BLOCK_SIZE, FRAME_SIZE, DeltaIndex, block_key


@dataclass(frozen=True)
class BuiltDelta:
    index: DeltaIndex
    frames_sha256: str
    seconds: float


def build_delta(
    image: Path,
    out: IO[bytes],
    *,
    size: int,
    image_sha256: str,
    level: int = 3,
    frame_size: int = FRAME_SIZE,
    threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> BuiltDelta:
    """Write the frames object of ``image`` to ``out`` and return its index.

    Frames are compressed in parallel (``threads``: 0 = one per CPU) a batch at a
    time, so memory is bounded by the batch. Blocking.
    """
    started = time.monotonic()
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
    workers = threads or os.cpu_count() or 1
    # 2 MiB of input per worker per batch: the input, the compressed output and the
    # read buffer stay a few MiB per worker.
    batch = max(1, (2 * 1024 * 1024) // frame_size) * workers
    lengths = array("I")
    keys = array("Q")
    digest = hashlib.sha256()
    done = 0
    with open(image, "rb") as handle:
        while done < size:
            data = handle.read(min(batch * frame_size, size - done))
            if not data:
                raise ImageError(f"{image}: ended at byte {done} of {size}")
            view = memoryview(data)
            pieces: list[bytes | bytearray | memoryview] = [
                view[o : o + frame_size] for o in range(0, len(data), frame_size)
            ]
            compressed = compressor.multi_compress_to_buffer(pieces, threads=workers)
            for i in range(len(compressed)):
                frame = compressed[i].tobytes()
                out.write(frame)
                digest.update(frame)
                lengths.append(len(frame))
            keys.extend(
                block_key(view[o : o + BLOCK_SIZE]) for o in range(0, len(data), BLOCK_SIZE)
            )
            done += len(data)
            if progress is not None:
                progress(done, size)
    out.flush()
    frames_sha256 = digest.hexdigest()
    index = DeltaIndex(
        image_sha256=image_sha256,
        image_size=size,
        frame_size=frame_size,
        frames_object=frames_object_name(frames_sha256),
        frames_size=sum(lengths),
        frame_lengths=lengths,
        keys=keys,
    )
    return BuiltDelta(index, frames_sha256, time.monotonic() - started)
