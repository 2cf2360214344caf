"""Publishing a release: compress, describe, sign and upload, image first and meta last.

Layout next to the meta (docs/format.md, "Publishing"):

    <dir>/<name>.meta                       the release descriptor (written last)
    <dir>/<name>.meta.minisig               its detached minisign signature
    <dir>/images/<sha256>.img.zst           the image, named by the SHA-256 of its bytes
    <dir>/images/<sha256>.img.zst.delta     its delta index (and .minisig), see delta.py
    <dir>/images/<sha256'>.frames.zst       the image in 64 KiB frames, for delta updates

The image object is content-addressed, so publishing never overwrites an image
a host may be downloading, and publishing the same image again uploads nothing
for it. The meta goes last, so a host polling the meta never sees one whose
image or signature is not complete yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol
from uuid import UUID, uuid4

from pydantic import TypeAdapter, ValidationError

from organixctl.publisher.delta import BuiltDelta, build_delta
from organixctl.publisher.image import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_LEVEL,
    WrittenImage,
    check_chunk_size,
    write_image,
)
from organixmd.base.errors import (
    ConfigError,
    MetaError,
    OrganixmError,
    PublishError,
    SourceNotFound,
)
from organixmd.base.fsutil import fsync_dir, write_atomic
from organixmd.base.objectnames import (
    IMAGES_DIR,
    META_SUFFIX,
    delta_index_name,
    delta_signature_name,
    image_object_name,
    meta_name,
    signature_name,
)
from organixmd.release.meta import MAX_META_BYTES, BootEntry, Chunk, MetaV1, now_utc, parse_meta
from organixmd.release.s3client import S3Settings, open_client, parse_s3_url, s3_errors

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

    from organixmd.release.minisign import SecretKey

#: Used when the publisher is given no boot options (see docs/format.md).
DEFAULT_BOOT = BootEntry(kernel="/boot/bzImage", initrd="/boot/initrd", init="/sbin/init")

_BOOT_PATH_WORDS = (
    "must be an absolute path inside the image of letters, digits and ._+/@=- "
    "(no spaces or quotes: GRUB script reads it)"
)
MiB = 1024 * 1024
#: S3 allows at most this many parts in one multipart upload.
_MAX_PARTS = 10_000
_PART_SIZES = (8 * MiB, 16 * MiB, 32 * MiB, 64 * MiB)
#: Parts read and sent at the same time (memory: this many parts).
_PARALLEL_PARTS = 4

#: ``progress(phase, done, total)``; phase is "compress" or "upload". Called from
#: the compressing worker thread and from the event loop: it must be thread-safe.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PublishRequest:
    image: Path
    #: ``s3://bucket/prefix/name``, ``file:///dir/name`` or ``dir/name``.
    target: str
    version: str
    serial: int
    boot: BootEntry = DEFAULT_BOOT
    secret_key: Path | None = None
    password: bytes | None = field(default=None, repr=False)
    allow_unsigned: bool = False
    uuid: UUID | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    level: int = DEFAULT_LEVEL
    rollout_percent: int = 100
    s3: S3Settings = field(default_factory=S3Settings)
    #: Where the compressed image is staged for S3 targets (default: the system's temp dir).
    workdir: Path | None = None
    #: Also publish the delta index and the frames object (docs/format.md).
    delta: bool = True


@dataclass(frozen=True)
class PublishResult:
    meta: MetaV1
    meta_bytes: bytes
    meta_location: str
    signature_location: str | None
    image_location: str
    #: False when the content-addressed image was already there and nothing was sent.
    image_uploaded: bool
    compress_seconds: float
    upload_seconds: float
    total_seconds: float
    written: WrittenImage
    #: The delta index and frames object, when published.
    delta: BuiltDelta | None = None
    delta_index_location: str | None = None

    def summary(self) -> str:
        """One line for the operator: what was published, how big, how fast, where."""
        image = self.meta.image
        ratio = image.size / image.compressed_size
        rate = image.size / self.total_seconds / 1e6 if self.total_seconds > 0 else 0.0
        sent = "uploaded" if self.image_uploaded else "already present, not uploaded"
        signed = "signed" if self.signature_location else "UNSIGNED"
        delta = (
            f"; delta index {self.delta_index_location} "
            f"({self.delta.index.frames_size / MiB:.1f} MiB of 64 KiB frames)"
            if self.delta is not None
            else "; no delta index"
        )
        return (
            f"published {self.meta.version} serial {self.meta.serial} ({signed}): "
            f"{image.size / MiB:.1f} MiB -> {image.compressed_size / MiB:.1f} MiB "
            f"(ratio {ratio:.2f}), {rate:.0f} MB/s in {self.total_seconds:.1f} s; "
            f"image {self.image_location} ({sent}); meta {self.meta_location}{delta}"
        )


def _field_adapter(model: type[Any], name: str) -> TypeAdapter[Any]:
    info = model.model_fields[name]
    # The field's own type and constraints (pattern, ge/le), so the rules live in one place.
    annotated: Any = Annotated[(info.annotation, *info.metadata)]
    return TypeAdapter(annotated)


#: Pattern rules of the meta model in words, by field name.
_PATTERN_WORDS = {
    "version": "must start with a letter or digit and hold only letters, digits and ._+~-",
    "kernel": _BOOT_PATH_WORDS,
    "initrd": _BOOT_PATH_WORDS,
    "init": _BOOT_PATH_WORDS,
    "params": "may hold only letters, digits and ._+/@=:,- (GRUB script reads it)",
}


def _first_error(exc: ValidationError, labels: Mapping[str, str], default: str) -> str:
    error = exc.errors()[0]
    loc = [str(p) for p in error["loc"]]
    field_name = loc[0] if loc else default
    label = labels.get(field_name, field_name)
    value = error.get("input")
    shown = f" {value!r}" if isinstance(value, str | int) else ""
    message = error["msg"]
    if error["type"] == "string_pattern_mismatch" and field_name in _PATTERN_WORDS:
        message = _PATTERN_WORDS[field_name]
    message = message.removeprefix("Value error, ")
    return f"{label}{shown}: {message}"


def check_release_fields(
    *, version: str, serial: int, rollout_percent: int, labels: Mapping[str, str] | None = None
) -> None:
    """Validate the meta fields given by the operator with the meta model's own rules.

    Raises :class:`ConfigError` naming the field by its label in ``labels`` (the
    command line passes its option names).
    """
    names = labels or {}
    for name, value in (
        ("version", version),
        ("serial", serial),
        ("rollout_percent", rollout_percent),
    ):
        try:
            _field_adapter(MetaV1, name).validate_python(value, strict=True)
        except ValidationError as exc:
            raise ConfigError(_first_error(exc, names, name), hint="") from exc


def make_boot_entry(
    *,
    kernel: str | None,
    initrd: str | None,
    init: str | None,
    params: list[str] | None,
    labels: Mapping[str, str] | None = None,
) -> BootEntry:
    """The boot entry from operator options; unset ones take :data:`DEFAULT_BOOT`'s value.

    Raises :class:`ConfigError` naming the option (by ``labels``) that breaks a rule.
    """
    try:
        return BootEntry(
            kernel=kernel if kernel is not None else DEFAULT_BOOT.kernel,
            initrd=initrd if initrd is not None else DEFAULT_BOOT.initrd,
            init=init if init is not None else DEFAULT_BOOT.init,
            params=list(params) if params is not None else list(DEFAULT_BOOT.params),
        )
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, labels or {}, "boot entry"), hint="") from exc


def max_chunks_for_meta() -> int:
    """How many chunks fit in a meta under the 1 MiB limit, at worst-case number widths."""
    entry = Chunk(offset=2**50, length=2**32, sha256="0" * 64)
    # One chunk entry as it appears in the indented JSON, plus a generous fixed part.
    one = len(entry.model_dump_json(indent=1)) + 8 * 3 + 2
    return (MAX_META_BYTES - 16 * 1024) // one


# --------------------------------------------------------------------------- targets


class _Target(Protocol):
    staging_dir: Path | None

    def location(self, name: str) -> str: ...

    async def image_present(self, name: str, size: int) -> bool: ...

    async def put_image(
        self, staged: Path, name: str, size: int, progress: Progress | None
    ) -> None: ...

    async def put_small(self, name: str, data: bytes, content_type: str) -> None: ...

    async def delete(self, name: str) -> None: ...

    async def read_small(self, name: str, limit: int) -> bytes | None: ...


class LocalTarget:
    """A directory (a mirror, a USB stick). Files appear by atomic rename after fsync."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.staging_dir: Path | None = directory / IMAGES_DIR

    def location(self, name: str) -> str:
        return str(self.directory / name)

    def prepare(self) -> None:
        """Check the directory exists and create ``images/``. Blocking."""
        if not self.directory.is_dir():
            raise ConfigError(
                f"target directory {self.directory} does not exist",
                hint="create it first, or check the path given with --to",
            )
        try:
            (self.directory / IMAGES_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise PublishError(
                f"cannot create {self.directory / IMAGES_DIR}: {exc.strerror}"
            ) from exc

    async def image_present(self, name: str, size: int) -> bool:
        try:
            stat = await asyncio.to_thread(os.stat, self.directory / name)
        except FileNotFoundError:
            return False
        return stat.st_size == size

    def _install(self, staged: Path, name: str) -> None:
        final = self.directory / name
        if staged.parent != final.parent:
            # Not staged in place: copy next to the destination so the rename is atomic.
            copy = final.with_name(f".partial-{os.getpid()}-{final.name}")
            with staged.open("rb") as src, copy.open("wb") as dst:
                while block := src.read(8 * MiB):
                    dst.write(block)
            staged = copy
        with staged.open("rb+") as handle:
            os.fsync(handle.fileno())
        # Staged files are private while incomplete; the published image is for everyone.
        os.chmod(staged, 0o644)
        os.replace(staged, final)
        fsync_dir(final.parent)

    async def put_image(
        self, staged: Path, name: str, size: int, progress: Progress | None
    ) -> None:
        try:
            await asyncio.to_thread(self._install, staged, name)
        except OSError as exc:
            raise PublishError(f"cannot write {self.directory / name}: {exc.strerror}") from exc
        if progress is not None:
            progress("upload", size, size)

    def _write_small(self, name: str, data: bytes) -> None:
        write_atomic(self.directory / name, data, 0o644)

    async def put_small(self, name: str, data: bytes, content_type: str) -> None:
        try:
            await asyncio.to_thread(self._write_small, name, data)
        except OSError as exc:
            raise PublishError(f"cannot write {self.directory / name}: {exc.strerror}") from exc

    async def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, self.directory / name)

    def _read_small(self, name: str, limit: int) -> bytes | None:
        try:
            with (self.directory / name).open("rb") as handle:
                return handle.read(limit + 1)
        except FileNotFoundError:
            return None

    async def read_small(self, name: str, limit: int) -> bytes | None:
        """The file's first ``limit + 1`` bytes (so oversize shows), or None if missing."""
        try:
            return await asyncio.to_thread(self._read_small, name, limit)
        except OSError as exc:
            raise PublishError(f"cannot read {self.directory / name}: {exc.strerror}") from exc


def part_size_for(size: int) -> int:
    """The multipart part size: 8 MiB, doubled up to 64 MiB (and beyond only if needed)."""
    for candidate in _PART_SIZES:
        if -(-size // candidate) <= _MAX_PARTS:
            return candidate
    return -(-size // _MAX_PARTS // MiB) * MiB


class S3Target:
    """A bucket prefix. Large objects go up as multipart uploads, a few parts at a time."""

    def __init__(self, client: S3Client, bucket: str, prefix: str, staging_dir: Path | None):
        self._client = client
        self.bucket = bucket
        #: Directory part of the meta key, "" or ending in "/".
        self.prefix = prefix
        self.staging_dir = staging_dir

    def key(self, name: str) -> str:
        return self.prefix + name

    def location(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    async def image_present(self, name: str, size: int) -> bool:
        try:
            with s3_errors(self.bucket, self.key(name), "check for existing image"):
                head = await self._client.head_object(Bucket=self.bucket, Key=self.key(name))
        except SourceNotFound:
            return False
        return head["ContentLength"] == size

    async def put_small(self, name: str, data: bytes, content_type: str) -> None:
        key = self.key(name)
        with s3_errors(self.bucket, key, "upload"):
            await self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                # Hosts and caches in front of the bucket must always fetch a fresh meta.
                CacheControl="no-cache",
            )

    async def delete(self, name: str) -> None:
        with s3_errors(self.bucket, self.key(name), "delete stale signature"):
            await self._client.delete_object(Bucket=self.bucket, Key=self.key(name))

    async def read_small(self, name: str, limit: int) -> bytes | None:
        """The object's first ``limit + 1`` bytes (so oversize shows), or None if missing."""
        key = self.key(name)
        try:
            with s3_errors(self.bucket, key, "read the published meta"):
                answer = await self._client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes=0-{limit}"
                )
                async with answer["Body"] as body:
                    data: bytes = await body.read()
        except SourceNotFound:
            return None
        return data

    async def put_image(
        self, staged: Path, name: str, size: int, progress: Progress | None
    ) -> None:
        key = self.key(name)
        part_size = part_size_for(size)
        with staged.open("rb") as handle:
            fd = handle.fileno()
            if size <= part_size:
                data = await asyncio.to_thread(os.pread, fd, size, 0)
                with s3_errors(self.bucket, key, "upload image"):
                    await self._client.put_object(
                        Bucket=self.bucket, Key=key, Body=data, **_IMAGE_HEADERS
                    )
                if progress is not None:
                    progress("upload", size, size)
                return
            await self._multipart(fd, key, size, part_size, progress)

    async def _multipart(
        self, fd: int, key: str, size: int, part_size: int, progress: Progress | None
    ) -> None:
        with s3_errors(self.bucket, key, "start multipart upload"):
            created = await self._client.create_multipart_upload(
                Bucket=self.bucket, Key=key, **_IMAGE_HEADERS
            )
        upload_id = created["UploadId"]
        gate = asyncio.Semaphore(_PARALLEL_PARTS)
        done = 0

        async def send(number: int) -> dict[str, Any]:
            nonlocal done
            offset = (number - 1) * part_size
            length = min(part_size, size - offset)
            # The semaphore is taken before the part is read: memory is bounded by
            # _PARALLEL_PARTS parts, not by the image size.
            async with gate:
                body = await asyncio.to_thread(os.pread, fd, length, offset)
                with s3_errors(self.bucket, key, f"upload part {number}"):
                    answer = await self._client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                    )
            done += length
            if progress is not None:
                progress("upload", done, size)
            return {"PartNumber": number, "ETag": answer["ETag"]}

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(send(n)) for n in range(1, -(-size // part_size) + 1)]
            parts = [task.result() for task in tasks]
            with s3_errors(self.bucket, key, "complete multipart upload"):
                await self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                )
        except BaseException as exc:
            # Abandoned parts cost storage until aborted; the abort's own failure must
            # not hide why the upload failed.
            try:
                await self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                )
            except Exception as abort_exc:
                print(
                    f"organixctl publish: warning: could not abort the multipart upload "
                    f"{upload_id} of s3://{self.bucket}/{key} ({type(abort_exc).__name__}: "
                    f"{abort_exc}); its parts take storage until a lifecycle rule or "
                    "'aws s3api abort-multipart-upload' removes them",
                    file=sys.stderr,
                )
            if isinstance(exc, BaseExceptionGroup):
                first = exc.exceptions[0]
                if isinstance(first, OrganixmError):
                    raise first from exc
            raise


# Content-addressed objects never change: caches may keep them for good.
_IMAGE_HEADERS: dict[str, Any] = {
    "ContentType": "application/zstd",
    "CacheControl": "public, max-age=31536000, immutable",
}


# --------------------------------------------------------------------------- publishing


def split_target(target: str) -> tuple[str, str, str]:
    """``(kind, place, name)``: kind "s3" (place = bucket/prefix) or "local" (place = dir).

    The name is the meta's file name without ``.meta``.
    """
    if target.endswith((META_SUFFIX, "/")) or not target:
        raise ConfigError(
            f"--to {target!r}: give the release name without '.meta', e.g. "
            "s3://bucket/fleet/web or /srv/releases/web (the publisher appends .meta)"
        )
    if target.startswith("s3://"):
        bucket, key = parse_s3_url(target)
        prefix, _, name = key.rpartition("/")
        return "s3", f"{bucket}/{prefix + '/' if prefix else ''}", name
    path = target.removeprefix("file://") if target.startswith("file://") else target
    if "://" in path:
        raise ConfigError(f"--to {target!r}: only s3:// URLs and local paths are supported")
    local = Path(path)
    return "local", str(local.parent), local.name


def check_signing(secret_key: Path | None, allow_unsigned: bool) -> None:
    """Refuse to publish unsigned unless that was asked for explicitly."""
    if secret_key is None and not allow_unsigned:
        raise ConfigError(
            "no --secret-key given: hosts with trusted keys refuse unsigned releases",
            hint="sign with --secret-key (organixctl keygen or minisign -G makes one), "
            "or pass --allow-unsigned to publish without a signature",
        )


def _load_key(request: PublishRequest) -> SecretKey | None:
    check_signing(request.secret_key, request.allow_unsigned)
    if request.secret_key is None:
        return None
    from organixmd.release.minisign import SecretKey

    return SecretKey.load(request.secret_key, request.password)


def _compress_to(
    request: PublishRequest,
    fd: int,
    staged: Path,
    progress: Progress | None,
    cancel: threading.Event,
) -> WrittenImage:
    """Compress the image into ``fd`` (closed on return). Blocking: runs in a worker thread."""

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress("compress", done, total)

    try:
        with os.fdopen(fd, "wb") as out:
            return write_image(
                request.image,
                out,
                chunk_size=request.chunk_size,
                level=request.level,
                progress=report,
                cancel=cancel,
            )
    except OSError as exc:
        raise PublishError(
            f"compressing {request.image} into {staged} failed: {exc.strerror or exc}"
        ) from exc


async def _check_serial(target: _Target, meta_name: str, request: PublishRequest) -> None:
    """Refuse a serial below the published one: every host that saw it would refuse ours.

    An equal serial is allowed (re-signing or re-publishing the same release); an
    unreadable or foreign meta at the name is replaced without comment.
    """
    current = await target.read_small(meta_name, MAX_META_BYTES)
    if current is None:
        return
    try:
        published = parse_meta(current, source=target.location(meta_name))
    except MetaError:
        return
    if request.serial < published.serial:
        raise ConfigError(
            f"--serial {request.serial} is lower than the serial {published.serial} "
            f"({published.version}) already published at {target.location(meta_name)}; "
            "hosts would refuse it as a downgrade",
            hint=f"publish with --serial {published.serial + 1} or higher (to roll back, "
            "publish the older image under a new serial)",
        )


def build_meta(request: PublishRequest, written: WrittenImage, object_name: str) -> MetaV1:
    try:
        meta = MetaV1(
            schema_="organixm.meta/1",
            version=request.version,
            serial=request.serial,
            uuid=request.uuid or uuid4(),
            created=now_utc(),
            image=written.image_v1(object_name),
            boot=request.boot,
            rollout_percent=request.rollout_percent,
        )
    except ValidationError as exc:
        raise MetaError(f"the release descriptor would be invalid: {exc.errors()[0]}") from exc
    return meta


async def publish(request: PublishRequest, progress: Progress | None = None) -> PublishResult:
    """Publish ``request.image`` as a release. Idempotent for the image object.

    Order: compress into a staging file (disk, never memory) while hashing; upload
    the image to its content-addressed name unless an object of that name and size
    is there already; then the signature; then the meta. Raises
    :class:`OrganixmError` subclasses only; the staging file is always removed.
    """
    started = time.monotonic()
    check_chunk_size(request.chunk_size)
    kind, place, name = split_target(request.target)
    size = await asyncio.to_thread(_image_size, request.image)
    chunks = -(-size // request.chunk_size)
    if chunks > max_chunks_for_meta():
        raise ConfigError(
            f"{size} bytes in {request.chunk_size}-byte chunks is {chunks} chunks; their "
            f"table would not fit the {MAX_META_BYTES}-byte meta limit",
            hint="pass a larger --chunk-size",
        )
    key = await asyncio.to_thread(_load_key, request)
    async with contextlib.AsyncExitStack() as stack:
        target: _Target
        if kind == "s3":
            bucket, _, prefix = place.partition("/")
            client = await stack.enter_async_context(open_client(request.s3))
            # Fail on a missing bucket or refused credentials now, not after
            # compressing for minutes.
            with s3_errors(bucket, "", "check the target bucket"):
                await client.head_bucket(Bucket=bucket)
            target = S3Target(client, bucket, prefix, request.workdir)
        else:
            local = LocalTarget(Path(place))
            await asyncio.to_thread(local.prepare)
            target = local
        await _check_serial(target, meta_name(name), request)
        fd, staged = _staging(target, ".img.zst")
        # Removed on every exit: after an upload it is a redundant copy, after a
        # failure or cancellation an incomplete one.
        stack.callback(staged.unlink, missing_ok=True)
        cancel = threading.Event()
        try:
            written = await asyncio.to_thread(_compress_to, request, fd, staged, progress, cancel)
        except asyncio.CancelledError:
            # The worker thread cannot be interrupted; tell it to stop at the next chunk.
            cancel.set()
            raise
        built: BuiltDelta | None = None
        frames_staged: Path | None = None
        if request.delta:
            frames_staged = _staging_file(target, ".frames.zst")
            stack.callback(frames_staged.unlink, missing_ok=True)
            built = await asyncio.to_thread(_build_delta, request, written, frames_staged)
        compressed_at = time.monotonic()
        object_name = image_object_name(written.compressed_sha256)
        meta = build_meta(request, written, object_name)
        meta_bytes = meta.to_json()
        if len(meta_bytes) > MAX_META_BYTES:
            raise ConfigError(
                f"the meta is {len(meta_bytes)} bytes, over the {MAX_META_BYTES}-byte limit",
                hint="pass a larger --chunk-size",
            )
        signature = None
        if key is not None:
            comment = (
                f"organixm version={meta.version} serial={meta.serial} sha256={meta.image.sha256}"
            )
            signature = key.sign(meta_bytes, comment)
        uploaded = not await target.image_present(object_name, written.compressed_size)
        if uploaded:
            await target.put_image(staged, object_name, written.compressed_size, progress)
        elif progress is not None:
            progress("upload", written.compressed_size, written.compressed_size)
        index_location = None
        if built is not None and frames_staged is not None:
            # The frames object first, then the index that names it, then the
            # index's signature: a host that finds an index finds its frames.
            frames = built.index
            if not await target.image_present(frames.frames_object, frames.frames_size):
                await target.put_image(
                    frames_staged, frames.frames_object, frames.frames_size, None
                )
            index_object = delta_index_name(object_name)
            index_bytes = frames.to_bytes()
            # The same image publishes the same index (and, with the same key, the same
            # signature): republishing then writes nothing here either.
            await _put_if_changed(target, index_object, index_bytes, "application/zstd")
            if key is not None:
                signed = key.sign(index_bytes, f"organixm delta index sha256={meta.image.sha256}")
                await _put_if_changed(
                    target, delta_signature_name(object_name), signed, "text/plain"
                )
            elif await target.read_small(delta_signature_name(object_name), 0) is not None:
                await target.delete(delta_signature_name(object_name))
            index_location = target.location(index_object)
        meta_object = meta_name(name)
        signature_object = signature_name(name)
        if signature is not None:
            await target.put_small(signature_object, signature, "text/plain")
        else:
            # A signature left from an earlier release would not match the new meta.
            await target.delete(signature_object)
        await target.put_small(meta_object, meta_bytes, "application/json")
        finished = time.monotonic()
        return PublishResult(
            meta=meta,
            meta_bytes=meta_bytes,
            meta_location=target.location(meta_object),
            signature_location=target.location(signature_object) if signature else None,
            image_location=target.location(object_name),
            image_uploaded=uploaded,
            compress_seconds=compressed_at - started,
            upload_seconds=finished - compressed_at,
            total_seconds=finished - started,
            written=written,
            delta=built,
            delta_index_location=index_location,
        )
    raise AssertionError("unreachable")  # pragma: no cover - the stack does not swallow


async def _put_if_changed(target: _Target, name: str, data: bytes, content_type: str) -> None:
    if await target.read_small(name, len(data)) != data:
        await target.put_small(name, data, content_type)


def _staging(target: _Target, suffix: str) -> tuple[int, Path]:
    """A private staging file beside the target (or in the temp dir), open for writing."""
    try:
        fd, name = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=target.staging_dir)
    except OSError as exc:
        where = target.staging_dir or tempfile.gettempdir()
        raise PublishError(
            f"cannot create a staging file in {where}: {exc.strerror}",
            hint="pass --workdir with a writable directory that has room for the image",
        ) from exc
    return fd, Path(name)


def _staging_file(target: _Target, suffix: str) -> Path:
    fd, path = _staging(target, suffix)
    os.close(fd)
    return path


def _build_delta(request: PublishRequest, written: WrittenImage, staged: Path) -> BuiltDelta:
    """The frames object into ``staged`` and the delta index. Blocking."""
    try:
        with staged.open("wb") as out:
            return build_delta(
                request.image,
                out,
                size=written.size,
                image_sha256=written.sha256,
                level=request.level,
            )
    except OSError as exc:
        raise PublishError(
            f"building the delta frames of {request.image} into {staged} failed: "
            f"{exc.strerror or exc}"
        ) from exc


def _image_size(path: Path) -> int:
    from organixctl.publisher.image import source_size

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open the image {path}: {exc.strerror}") from exc
    try:
        return source_size(fd)
    finally:
        os.close(fd)
