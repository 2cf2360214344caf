"""Delta updates, the format: the delta index, its keys and object names.

The host side is :mod:`organixmd.install.delta`, the publisher's
:mod:`organixctl.publisher.delta`. What follows describes the whole.

docs/format.md ("Delta updates") is the specification. Next to a release's image
object ``images/<C>.img.zst`` the publisher puts:

    images/<C>.img.zst.delta           the delta index (one zstd frame)
    images/<C>.img.zst.delta.minisig   its minisign signature (signed releases)
    images/<D>.frames.zst              the image again, cut into 64 KiB zstd frames

The index holds the *key* of every 4 KiB block of the image (its 64-bit XXH3 hash:
a key finds candidates, the signed SHA-256 of each chunk decides) and the compressed
length of every frame of the frames object. A host
reads its two slots block by block (:class:`LocalBlocks`), finds which blocks of the
new image it already holds at any 4 KiB-aligned offset, and fetches the frames that
hold the rest with HTTP Range requests (:class:`Plan`). :class:`DeltaInstaller`
assembles each chunk of the meta's chunk table from local blocks (each re-read and
re-keyed just before use) and fetched frames, checks the chunk's signed SHA-256,
refetches the whole chunk from the image object if it does not match (a local block
is never trusted on its key alone), writes it, and finally reads the whole slot back
from the device against the signed whole-image SHA-256 before anything is flipped
(invariant 2, unchanged).

Old hosts never read the index: the meta is ``organixm.meta/1`` as before, and a
host without the index, or with too little data of its own, installs the full image.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import xxhash
import zstandard

from organixmd.base.errors import ImageError
from organixmd.base.objectnames import delta_index_name, delta_signature_name
from organixmd.release.meta import ImageV1, Release

if TYPE_CHECKING:
    from organixmd.release import minisign
    from organixmd.release.sources import Source

SCHEMA = "organixm.delta/1"
MAGIC = b"organixm.delta/1\n"
BLOCK_SIZE = 4096
#: Uncompressed bytes per frame of the frames object (chosen in bench/delta.py).
FRAME_SIZE = 64 * 1024
KEY_BYTES = 8
HASH_NAME = "xxh3-64"
#: The header line's limit; its fields are a few hundred bytes.
MAX_HEADER = 4096
#: Frames whose gap is at most this many frames are fetched in one request.
MERGE_GAP = 1
#: Fetch requests in flight at once.
PARALLEL_FETCHES = 4
#: A delta whose downloads come to more than this share of the full image object is
#: not worth its many requests: the full image is streamed instead.
WORTH_IT = 0.9
#: What a slot is read in while it is scanned.
SCAN_READ = 4 * 1024 * 1024
#: Before a slot is scanned whole, this many evenly spaced pieces of this many bytes
#: are keyed; when fewer than this share of their blocks (zeros left out) are in the
#: new image, nothing worth the scan is there and the full image is streamed.
SAMPLE_WINDOWS = 256
SAMPLE_READ = 64 * 1024
SAMPLE_MIN_SHARE = 0.05

_FIELDS = {
    "image_sha256",
    "image_size",
    "block_size",
    "frame_size",
    "hash",
    "frames_object",
    "frames_size",
}


def block_key(data: bytes | memoryview) -> int:
    """The key of one block: XXH3 64-bit (seed 0) of its bytes. Not a cryptographic
    hash, and it need not be: a key only says where a block may be found; what is
    written is checked against the chunk's signed SHA-256 first. It is fast enough
    (about 7 GB/s here, SHA-256 1.2) that reading the slots bounds the scan."""
    return xxhash.xxh3_64_intdigest(data)


ZERO_KEY = block_key(bytes(BLOCK_SIZE))


# ------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class DeltaIndex:
    image_sha256: str
    image_size: int
    frame_size: int
    #: Relative to the meta's directory, like ``image.object``.
    frames_object: str
    frames_size: int
    frame_lengths: array[int]
    keys: array[int]
    block_size: int = BLOCK_SIZE
    frame_offsets: array[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        offsets = array("Q", [0]) * (len(self.frame_lengths) + 1)
        position = 0
        for index, length in enumerate(self.frame_lengths):
            offsets[index] = position
            position += length
        offsets[len(self.frame_lengths)] = position
        object.__setattr__(self, "frame_offsets", offsets)

    @property
    def blocks(self) -> int:
        return len(self.keys)

    @property
    def blocks_per_frame(self) -> int:
        return self.frame_size // self.block_size

    def frame_range(self, frame: int) -> tuple[int, int]:
        """Uncompressed ``[start, end)`` of ``frame`` in the image."""
        start = frame * self.frame_size
        return start, min(start + self.frame_size, self.image_size)

    def to_bytes(self) -> bytes:
        """The index object: one zstd frame of magic, header line, lengths and keys."""
        header = {
            "image_sha256": self.image_sha256,
            "image_size": self.image_size,
            "block_size": self.block_size,
            "frame_size": self.frame_size,
            "hash": HASH_NAME,
            "frames_object": self.frames_object,
            "frames_size": self.frames_size,
        }
        lengths = array("I", self.frame_lengths)
        keys = array("Q", self.keys)
        if _BIG_ENDIAN:
            lengths.byteswap()
            keys.byteswap()
        payload = b"".join(
            [MAGIC, json.dumps(header).encode() + b"\n", lengths.tobytes(), keys.tobytes()]
        )
        return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(payload)


_BIG_ENDIAN = array("H", [1]).tobytes() == b"\0\1"


def max_index_bytes(image: ImageV1) -> int:
    """The largest decompressed index a release of this size can have."""
    frames = -(-image.size // BLOCK_SIZE)  # frames are at least one block
    blocks = -(-image.size // BLOCK_SIZE)
    return len(MAGIC) + MAX_HEADER + 4 * frames + KEY_BYTES * blocks


def parse_index(data: bytes, image: ImageV1, *, source: str) -> DeltaIndex:
    """Read and check an index object against the (verified) meta's image entry.

    Raises :class:`ImageError` naming what is wrong; a host then installs the full
    image.
    """

    def bad(why: str) -> ImageError:
        return ImageError(
            f"delta index {source}: {why}",
            hint="republish the release (organixctl publish writes the index); this host "
            "installs the full image meanwhile",
        )

    try:
        payload = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=max_index_bytes(image)
        )
    except zstandard.ZstdError as exc:
        raise bad(f"not a zstd frame within {max_index_bytes(image)} bytes: {exc}") from exc
    if not payload.startswith(MAGIC):
        raise bad(f"does not start with {MAGIC!r}")
    end = payload.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if end < 0:
        raise bad(f"no header line within {MAX_HEADER} bytes")
    try:
        header = json.loads(payload[len(MAGIC) : end])
    except ValueError as exc:
        raise bad(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict) or set(header) != _FIELDS:
        found = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise bad(f"header fields {found}, expected {sorted(_FIELDS)}")
    for name in ("image_size", "block_size", "frame_size", "frames_size"):
        if type(header[name]) is not int or header[name] <= 0:
            raise bad(f"{name} must be a positive integer, not {header[name]!r}")
    if header["hash"] != HASH_NAME:
        raise bad(f"hash {header['hash']!r} is not {HASH_NAME!r}")
    if header["block_size"] != BLOCK_SIZE:
        raise bad(f"block_size {header['block_size']} is not {BLOCK_SIZE}")
    frame_size = header["frame_size"]
    if frame_size % BLOCK_SIZE or frame_size > 64 * 1024 * 1024:
        raise bad(f"frame_size {frame_size} is not a multiple of 4096 up to 64 MiB")
    if header["image_sha256"] != image.sha256 or header["image_size"] != image.size:
        raise bad(
            f"describes image {header['image_sha256']} ({header['image_size']} bytes), "
            f"not the meta's {image.sha256} ({image.size} bytes)"
        )
    name = header["frames_object"]
    parts = name.split("/") if isinstance(name, str) else [""]
    if not isinstance(name, str) or not name or ".." in parts or "" in parts or len(name) > 1024:
        raise bad(f"frames_object {name!r} is not a relative object name")
    frames = -(-image.size // frame_size)
    blocks = -(-image.size // BLOCK_SIZE)
    body = payload[end + 1 :]
    if len(body) != 4 * frames + KEY_BYTES * blocks:
        raise bad(
            f"{len(body)} bytes of tables, expected {4 * frames} of frame lengths and "
            f"{KEY_BYTES * blocks} of block keys"
        )
    lengths = array("I")
    lengths.frombytes(body[: 4 * frames])
    keys = array("Q")
    keys.frombytes(body[4 * frames :])
    if _BIG_ENDIAN:
        lengths.byteswap()
        keys.byteswap()
    if 0 in lengths:
        raise bad("a frame of length 0")
    if sum(lengths) != header["frames_size"]:
        raise bad(
            f"frame lengths add up to {sum(lengths)}, not frames_size {header['frames_size']}"
        )
    return DeltaIndex(
        image_sha256=image.sha256,
        image_size=image.size,
        frame_size=frame_size,
        frames_object=name,
        frames_size=header["frames_size"],
        frame_lengths=lengths,
        keys=keys,
    )


# ------------------------------------------------------------------------- fetching


async def fetch_index(
    source: Source, release: Release, keys: Sequence[minisign.PublicKey]
) -> tuple[DeltaIndex | None, int, str]:
    """The release's delta index, checked (signature with ``keys``, then against the
    meta), its size, and a reason when there is none to use."""
    from organixmd.release import minisign

    image = release.image
    if image is None:
        return None, 0, "the seed format has no chunk table"
    name = delta_index_name(release.image_object)
    compressed_limit = max_index_bytes(image) + 1024 * 1024
    data = await source.fetch_object(name, compressed_limit)
    if data is None:
        return None, 0, f"no delta index at {source.object_url(name)}"
    if keys:
        signature = await source.fetch_object(delta_signature_name(release.image_object), 64 * 1024)
        if signature is None:
            return None, len(data), f"the delta index {source.object_url(name)} is not signed"
        minisign.verify(data, signature, list(keys))
    return parse_index(data, image, source=source.object_url(name)), len(data), ""
