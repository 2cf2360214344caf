"""The image writer and seek-table reader against real zstd readers."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import subprocess
import threading
from pathlib import Path
from uuid import UUID

import pytest
import pyzstd
import zstandard

from organixctl.publisher.image import (
    SEEKABLE_MAGIC,
    WrittenImage,
    read_seek_table,
    write_image,
)
from organixmd.base.errors import Cancelled, ConfigError, ImageError
from organixmd.release.meta import MetaV1, now_utc
from tests.support.images import DEFAULT_BOOT, make_ext4_image

CHUNK = 64 * 1024


def _mixed_bytes(size: int, seed: int = 7) -> bytes:
    """Half random, half repetitive: some frames compress, some do not."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(5000) if rng.random() < 0.5 else b"organixm " * 600
    return bytes(out[:size])


def _compress(tmp_path: Path, data: bytes, chunk_size: int = CHUNK) -> tuple[Path, WrittenImage]:
    raw = tmp_path / "image.raw"
    raw.write_bytes(data)
    packed = tmp_path / "image.zst"
    with packed.open("wb") as out:
        result = write_image(raw, out, chunk_size=chunk_size, workers=2)
    return packed, result


def test_zstd_cli_decompresses_to_the_input(tmp_path: Path) -> None:
    """The Debian zstd binary decompresses our object back to the exact input bytes."""
    data = _mixed_bytes(10 * CHUNK + 1234)
    packed, result = _compress(tmp_path, data)
    plain = subprocess.run(["zstd", "-dc", str(packed)], check=True, capture_output=True).stdout
    assert plain == data
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.size == len(data)


def test_pyzstd_seekable_reader_reads_at_random_offsets(tmp_path: Path) -> None:
    """pyzstd's SeekableZstdFile accepts our seek table and reads from any offset."""
    data = _mixed_bytes(7 * CHUNK + 99)
    packed, _ = _compress(tmp_path, data)
    rng = random.Random(3)
    with pyzstd.SeekableZstdFile(str(packed), "r") as reader:
        assert reader.read() == data
        for _ in range(20):
            offset = rng.randrange(len(data))
            reader.seek(offset)
            assert reader.read(5000) == data[offset : offset + 5000]


def test_every_frame_decompresses_alone_to_its_chunk(tmp_path: Path) -> None:
    """Each frame, cut out by the table's offset and length, decompresses to its chunk."""
    data = _mixed_bytes(5 * CHUNK + 4097)
    packed, result = _compress(tmp_path, data)
    blob = packed.read_bytes()
    assert len(blob) == result.compressed_size
    assert hashlib.sha256(blob).hexdigest() == result.compressed_sha256
    assert len(result.chunks) == 6
    for index, chunk in enumerate(result.chunks):
        frame = blob[chunk.offset : chunk.offset + chunk.length]
        params = zstandard.get_frame_parameters(frame)
        assert params.has_checksum
        assert params.content_size == chunk.plain_size
        plain = zstandard.ZstdDecompressor().decompress(frame)
        assert plain == data[index * CHUNK : index * CHUNK + chunk.plain_size]
        assert hashlib.sha256(plain).hexdigest() == chunk.sha256
    assert result.chunks[-1].plain_size == 4097


def test_single_chunk_image(tmp_path: Path) -> None:
    """An image smaller than one chunk is one frame plus the seek table."""
    data = b"x" * 1000
    packed, result = _compress(tmp_path, data)
    assert len(result.chunks) == 1
    assert result.chunks[0].offset == 0
    with packed.open("rb") as handle:
        assert read_seek_table(handle) == [(result.chunks[0].length, 1000)]
    assert zstandard.ZstdDecompressor().decompress(packed.read_bytes()[: result.chunks[0].length])


def test_seek_table_reader_matches_writer(tmp_path: Path) -> None:
    """read_seek_table returns exactly the frames the writer recorded."""
    packed, result = _compress(tmp_path, _mixed_bytes(3 * CHUNK))
    with packed.open("rb") as handle:
        table = read_seek_table(handle)
    assert table == [(c.length, c.plain_size) for c in result.chunks]
    assert [size for _, size in table] == [CHUNK] * 3


def test_seek_table_reader_rejects_damage(tmp_path: Path) -> None:
    """A truncated object, a wrong magic or an oversized frame count is an ImageError."""
    packed, _ = _compress(tmp_path, _mixed_bytes(2 * CHUNK))
    blob = packed.read_bytes()
    with pytest.raises(ImageError, match="no zstd seek table"):
        read_seek_table(io.BytesIO(blob[:-1]))
    with pytest.raises(ImageError, match="too short"):
        read_seek_table(io.BytesIO(b"\x00" * 5))
    huge = blob[:-9] + struct.pack("<IBI", 2**31, 0, SEEKABLE_MAGIC)
    with pytest.raises(ImageError, match="larger than"):
        read_seek_table(io.BytesIO(huge))
    # One extra byte between the frames and the table breaks the frames' total.
    padded = blob[:10] + b"\x00" + blob[10:]
    with pytest.raises(ImageError, match="add up to"):
        read_seek_table(io.BytesIO(padded))


def test_result_builds_a_valid_meta_image_entry(tmp_path: Path) -> None:
    """The writer's result yields an ImageV1 that MetaV1 accepts for a real ext4 image."""
    raw = make_ext4_image(tmp_path / "root.img", 8 * 1024 * 1024, payload_bytes=3 * 1024 * 1024)
    with (tmp_path / "root.zst").open("wb") as out:
        result = write_image(raw, out, chunk_size=1024 * 1024)
    image = result.image_v1(f"images/{result.compressed_sha256}.img.zst")
    meta = MetaV1(
        schema_="organixm.meta/1",
        version="1.0",
        serial=1,
        uuid=UUID("6f1c2a2e-2d8f-4b3e-9d6e-0a4c8b1e2f3a"),
        created=now_utc(),
        image=image,
        boot=DEFAULT_BOOT,
    )
    assert len(meta.image.chunks) == 8
    assert meta.image.sha256 == hashlib.sha256(raw.read_bytes()).hexdigest()
    assert result.compressed_size < result.size


def test_bad_chunk_size_and_empty_image_refused(tmp_path: Path) -> None:
    """Chunk sizes the meta would reject and empty images fail before any output."""
    raw = tmp_path / "empty.raw"
    raw.write_bytes(b"")
    out = io.BytesIO()
    with pytest.raises(ConfigError, match="multiple of 4096"):
        write_image(raw, out, chunk_size=100_000)
    with pytest.raises(ConfigError, match="is empty"):
        write_image(raw, out)
    with pytest.raises(ConfigError, match="cannot open"):
        write_image(tmp_path / "missing.raw", out)
    assert out.getvalue() == b""


def test_block_device_input(tmp_path: Path) -> None:
    """A loop block device is read by its real size (st_size is 0 for devices)."""
    data = _mixed_bytes(3 * CHUNK + 512)
    backing = tmp_path / "backing.raw"
    backing.write_bytes(data)
    device = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(backing)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        with (tmp_path / "dev.zst").open("wb") as out:
            result = write_image(Path(device), out, chunk_size=CHUNK)
    finally:
        subprocess.run(["losetup", "-d", device], check=True)
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()


def test_cancel_stops_compression(tmp_path: Path) -> None:
    """A set cancel event stops the writer with Cancelled before it reads the image."""
    raw = tmp_path / "image.raw"
    raw.write_bytes(_mixed_bytes(4 * CHUNK))
    stop = threading.Event()
    stop.set()
    out = io.BytesIO()
    with pytest.raises(Cancelled):
        write_image(raw, out, chunk_size=CHUNK, cancel=stop)
    assert out.getvalue() == b""


def test_progress_reports_every_chunk_up_to_the_size(tmp_path: Path) -> None:
    """The progress callback sees growing byte counts ending at the image size."""
    data = _mixed_bytes(3 * CHUNK + 10)
    raw = tmp_path / "image.raw"
    raw.write_bytes(data)
    seen: list[tuple[int, int]] = []
    write_image(raw, io.BytesIO(), chunk_size=CHUNK, progress=lambda d, t: seen.append((d, t)))
    assert [d for d, _ in seen] == [CHUNK, 2 * CHUNK, 3 * CHUNK, len(data)]
    assert {t for _, t in seen} == {len(data)}


def test_zero_chunks_are_the_frames_and_digests_compressing_them_gives(tmp_path: Path) -> None:
    """Zero chunks (free space) take a remembered frame: the object is the same bytes.

    Zero chunks at the start, between data, in a run, and as the short last chunk;
    a chunk that is zero but for its last byte must not pass for zeros.
    """
    almost = bytearray(CHUNK)
    almost[-1] = 1
    data = (
        bytes(CHUNK)
        + _mixed_bytes(CHUNK, seed=1)
        + bytes(3 * CHUNK)
        + bytes(almost)
        + _mixed_bytes(CHUNK, seed=2)
        + bytes(777)
    )
    packed, result = _compress(tmp_path, data)
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)
    blob = packed.read_bytes()
    for index, chunk in enumerate(result.chunks):
        plain = data[index * CHUNK : index * CHUNK + chunk.plain_size]
        assert blob[chunk.offset : chunk.offset + chunk.length] == compressor.compress(plain)
        assert chunk.sha256 == hashlib.sha256(plain).hexdigest()
    assert zstandard.ZstdDecompressor().decompress(
        blob[result.chunks[5].offset : result.chunks[5].offset + result.chunks[5].length]
    ) == bytes(almost)
    plain = subprocess.run(["zstd", "-dc", str(packed)], check=True, capture_output=True).stdout
    assert plain == data
    assert result.sha256 == hashlib.sha256(data).hexdigest()
