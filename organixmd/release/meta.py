"""The release descriptor (``<object>.meta``): strict models, parsing and the common view.

Two wire formats are read (docs/format.md is the specification):

* ``organixm.meta/1``: our format, with a chunk table that allows resume and
  per-chunk verification;
* the seed tool's descriptor (``"format": "raw+zstd"`` with an ``internal`` object):
  one zstd stream, no chunk table, no serial.

Both are mapped onto :class:`Release`, the one view the rest of the code uses.
Parsing bounds the input size and its nesting depth before any JSON is decoded
(invariant 5).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from organixmd.base.errors import MetaError
from organixmd.base.jsondepth import too_deep

SCHEMA_V1 = "organixm.meta/1"
FORMAT_SEEKABLE = "zstd-seekable"
FORMAT_LEGACY = "raw+zstd"

#: A meta larger than this is refused without being read further.
MAX_META_BYTES = 1024 * 1024
#: A valid meta nests 4 levels (document, image, chunks, chunk); this leaves room for
#: future fields and stays far below Python's recursion limit.
MAX_META_DEPTH = 32
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
#: 2**50 bytes (1 PiB): far beyond any disk, small enough that arithmetic stays exact.
MAX_IMAGE_SIZE = 2**50
MAX_SERIAL = 2**63 - 1

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Version = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+~-]*$")
]
# Paths inside the slot image that GRUB reads; absolute, no spaces or quotes (GRUB script).
BootPath = Annotated[
    str, StringConstraints(min_length=2, max_length=512, pattern=r"^/[A-Za-z0-9._+/@=-]*$")
]


def _not_organixm_param(value: str) -> str:
    # GRUB appends organixm.slot= and organixm.reason= itself; a release's own copy could
    # make the initrd and the daemon disagree about which slot is running.
    if value.lower().startswith("organixm."):
        raise ValueError(
            "organixm.* kernel parameters are set by GRUB at boot; a release may not carry them"
        )
    return value


KernelParam = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._+/@=:,-]+$"),
    AfterValidator(_not_organixm_param),
]

_OBJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+=-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Chunk(_Strict):
    """One independent zstd frame of the image."""

    offset: int = Field(ge=0, description="byte offset of the frame in the compressed object")
    length: int = Field(gt=0, description="compressed length of the frame in bytes")
    sha256: Sha256Hex = Field(description="SHA-256 of the frame's uncompressed bytes")


class ImageV1(_Strict):
    object: str = Field(min_length=1, max_length=1024)
    format: Literal["zstd-seekable"]
    size: int = Field(gt=0, le=MAX_IMAGE_SIZE)
    sha256: Sha256Hex
    compressed_size: int = Field(gt=0, le=MAX_IMAGE_SIZE)
    chunk_size: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    chunks: list[Chunk] = Field(min_length=1)

    @field_validator("object")
    @classmethod
    def _relative_object(cls, value: str) -> str:
        parts = value.split("/")
        if not _OBJECT_RE.match(value) or ".." in parts or "" in parts:
            raise ValueError(
                "must be a relative object name (letters, digits, ._/+=-), "
                "with no empty or '..' components"
            )
        return value

    @field_validator("chunk_size")
    @classmethod
    def _aligned_chunk(cls, value: int) -> int:
        if value % 4096:
            raise ValueError("must be a multiple of 4096 bytes")
        return value

    @model_validator(mode="after")
    def _consistent_table(self) -> ImageV1:
        expected = -(-self.size // self.chunk_size)
        if len(self.chunks) != expected:
            raise ValueError(
                f"chunks: {len(self.chunks)} entries, but size {self.size} with chunk_size "
                f"{self.chunk_size} needs {expected}"
            )
        position = 0
        for index, chunk in enumerate(self.chunks):
            if chunk.offset != position:
                raise ValueError(
                    f"chunks.{index}.offset: {chunk.offset}, expected {position} "
                    "(frames are contiguous from offset 0)"
                )
            position += chunk.length
        if position > self.compressed_size:
            raise ValueError(
                f"compressed_size: {self.compressed_size} is smaller than the frames' total "
                f"{position}"
            )
        return self

    def chunk_plain_size(self, index: int) -> int:
        """Uncompressed length of chunk ``index`` (the last one may be short)."""
        if index < len(self.chunks) - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (len(self.chunks) - 1)


class BootEntry(_Strict):
    """What GRUB boots from a slot holding this release (also carried inside the image)."""

    kernel: BootPath
    initrd: BootPath
    init: BootPath
    params: list[KernelParam] = Field(default_factory=list, max_length=64)


class MetaV1(_Strict):
    schema_: Literal["organixm.meta/1"] = Field(alias="schema")
    version: Version
    serial: int = Field(ge=0, le=MAX_SERIAL)
    uuid: UUID
    created: datetime
    image: ImageV1
    boot: BootEntry
    rollout_percent: int = Field(default=100, ge=0, le=100)

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, populate_by_name=True)

    @field_validator("created")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("must carry a time zone (e.g. 2026-01-31T12:00:00Z)")
        return value

    def to_json(self) -> bytes:
        """The exact bytes the publisher signs and uploads."""
        return (self.model_dump_json(by_alias=True, indent=1) + "\n").encode()


class LegacyInternal(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uuid: str = Field(min_length=1, max_length=128)
    object_path: str = Field(min_length=1, max_length=1024)
    der_bzimage: str = Field(min_length=1, max_length=512)
    der_init: str = Field(min_length=1, max_length=512)
    der_initrd: str = Field(min_length=1, max_length=512)
    region: str = Field(max_length=64)
    bucket: str = Field(min_length=1, max_length=255)
    # The seed embedded read-only keys in the meta. They are parsed (so the file
    # validates) but never used, logged or shown: the daemon's own credentials apply.
    access_key: SecretStr
    secret_key: SecretStr

    @field_validator("object_path")
    @classmethod
    def _key_in_bucket(cls, value: str) -> str:
        # A key in the bucket root, never a path or URL that climbs out of it (the
        # seed's own keys are plain "dir/name"; S3-compatible servers may normalise "..").
        parts = value.split("/")
        if ".." in parts or "." in parts or "" in parts or any(c < " " or c == "\\" for c in value):
            raise ValueError(
                "must be an object key in the bucket (no leading '/', no URL, no empty, "
                "'.' or '..' components, no control characters or backslashes)"
            )
        return value


class LegacyMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: Sha256Hex
    size: int = Field(gt=0, le=MAX_IMAGE_SIZE)
    format: Literal["raw+zstd"]
    internal: LegacyInternal


@dataclass(frozen=True, slots=True)
class Release:
    """The one view of a release that the daemon, publisher and installer use."""

    version: str
    serial: int
    uuid: str
    image_object: str
    #: ``True`` when :attr:`image_object` is a key in the bucket root (seed format),
    #: ``False`` when it is relative to the meta's own location.
    object_is_absolute: bool
    size: int
    sha256: str
    boot: BootEntry
    rollout_percent: int
    #: Present for ``organixm.meta/1``; ``None`` for the seed's single stream.
    image: ImageV1 | None
    legacy: bool
    created: datetime | None = None

    @property
    def resumable(self) -> bool:
        return self.image is not None

    def describe(self) -> str:
        return f"{self.version} (serial {self.serial})"


def _field_errors(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "(document)"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    more = len(exc.errors()) - 5
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def parse_meta(data: bytes, *, source: str = "meta") -> Release:
    """Validate ``data`` as a release descriptor of either format.

    Raises :class:`MetaError` naming the offending field. The size and nesting bounds
    are checked before the JSON is decoded.
    """
    if len(data) > MAX_META_BYTES:
        raise MetaError(f"{source}: {len(data)} bytes, over the {MAX_META_BYTES}-byte limit")
    deep = too_deep(data, MAX_META_DEPTH)
    if deep is not None:
        raise MetaError(
            f"{source}: the JSON nests deeper than {MAX_META_DEPTH} levels (at byte {deep})"
        )
    try:
        document: Any = json.loads(data)
    except ValueError as exc:
        # JSONDecodeError and UnicodeDecodeError, and the plain ValueError of an integer
        # longer than Python converts (4,300 digits).
        raise MetaError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise MetaError(f"{source}: must be a JSON object, got {type(document).__name__}")
    if "schema" in document:
        schema = document["schema"]
        if schema != SCHEMA_V1:
            raise MetaError(
                f"{source}: schema {schema!r} is not supported (this daemon reads {SCHEMA_V1!r} "
                "and the seed format)",
                hint="upgrade organixm on this host before publishing with a newer schema",
            )
        try:
            meta = MetaV1.model_validate(document)
        except ValidationError as exc:
            raise MetaError(f"{source}: {_field_errors(exc)}") from exc
        return release_from_v1(meta)
    if document.get("format") == FORMAT_LEGACY or "internal" in document:
        try:
            legacy = LegacyMeta.model_validate(document)
        except ValidationError as exc:
            raise MetaError(f"{source} (seed format): {_field_errors(exc)}") from exc
        return release_from_legacy(legacy)
    raise MetaError(
        f"{source}: neither an {SCHEMA_V1!r} document (no 'schema' field) nor a seed "
        "descriptor (no 'internal' field)"
    )


def release_from_v1(meta: MetaV1) -> Release:
    return Release(
        version=meta.version,
        serial=meta.serial,
        uuid=str(meta.uuid),
        image_object=meta.image.object,
        object_is_absolute=False,
        size=meta.image.size,
        sha256=meta.image.sha256,
        boot=meta.boot,
        rollout_percent=meta.rollout_percent,
        image=meta.image,
        legacy=False,
        created=meta.created,
    )


def release_from_legacy(meta: LegacyMeta) -> Release:
    internal = meta.internal
    try:
        boot = BootEntry(
            kernel=internal.der_bzimage,
            initrd=internal.der_initrd,
            init=internal.der_init,
            params=[],
        )
    except ValidationError as exc:
        raise MetaError(
            f"meta (seed format): internal.der_* boot paths: {_field_errors(exc)}"
        ) from exc
    return Release(
        # The seed had no human version; its UUID is what identified a release.
        version=f"seed-{internal.uuid}"[:64],
        serial=0,
        uuid=internal.uuid,
        image_object=internal.object_path,
        object_is_absolute=True,
        size=meta.size,
        sha256=meta.sha256,
        boot=boot,
        rollout_percent=100,
        image=None,
        legacy=True,
        created=None,
    )


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
