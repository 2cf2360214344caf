"""Build releases for tests: an image in the organixm format, its meta and signature.

Uses the format modules directly (not the publisher) so that the install engine's
tests do not depend on the publisher being right.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zstandard

from organixctl.publisher.image import write_image
from organixmd.release.meta import BootEntry, MetaV1
from organixmd.release.minisign import SecretKey
from tests.support.images import DEFAULT_BOOT


@dataclass
class BuiltRelease:
    directory: Path
    name: str
    meta: MetaV1
    image_path: Path
    object_path: Path

    @property
    def base(self) -> Path:
        return self.directory / self.name

    @property
    def meta_path(self) -> Path:
        return self.directory / f"{self.name}.meta"

    @property
    def url(self) -> str:
        return f"file://{self.base}"


def build_release(
    image: Path,
    directory: Path,
    *,
    name: str = "host",
    version: str = "1.0",
    serial: int = 1,
    chunk_size: int = 1024 * 1024,
    key: SecretKey | None = None,
    boot: BootEntry = DEFAULT_BOOT,
    rollout_percent: int = 100,
    release_uuid: str | None = None,
) -> BuiltRelease:
    """Compress ``image`` into ``directory`` and write ``NAME.meta`` (and ``.minisig``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    partial = directory / "images" / ".partial"
    with open(partial, "wb") as out:
        written = write_image(image, out, chunk_size=chunk_size)
    object_name = f"images/{written.compressed_sha256}.img.zst"
    object_path = directory / object_name
    partial.rename(object_path)
    meta = MetaV1(
        schema_="organixm.meta/1",
        version=version,
        serial=serial,
        uuid=uuid.UUID(release_uuid) if release_uuid else uuid.uuid4(),
        created=datetime(2026, 1, 1, tzinfo=UTC),
        image=written.image_v1(object_name),
        boot=boot,
        rollout_percent=rollout_percent,
    )
    data = meta.to_json()
    (directory / f"{name}.meta").write_bytes(data)
    if key is not None:
        signature = key.sign(data, f"organixm version={version} serial={serial}")
        (directory / f"{name}.meta.minisig").write_bytes(signature)
    return BuiltRelease(directory, name, meta, image, object_path)


def build_legacy_release(image: Path, directory: Path, *, name: str = "host") -> Path:
    """The seed tool's layout: one zstd stream at NAME, its descriptor at NAME.meta."""
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    data = image.read_bytes()
    (directory / name).write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    meta = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "format": "raw+zstd",
        "internal": {
            "uuid": "ABCD-EFGH-IJKL-MNOPQR-SOMETHING",
            "object_path": f"kiosk/{name}",
            "der_bzimage": "/nix/store/aaaa-linux/bzImage",
            "der_init": "/nix/store/bbbb-nixos-system/init",
            "der_initrd": "/nix/store/cccc-initrd/initrd",
            "region": "us-east-1",
            "bucket": "myorganixms",
            "access_key": "AKIASEEDEMBEDDEDKEY",
            "secret_key": "seed-embedded-secret-never-logged",
        },
    }
    path = directory / f"{name}.meta"
    path.write_text(json.dumps(meta))
    return path


@dataclass
class ReleaseSet:
    """R0 (installed), R1 and R2, built once; their images live side by side. Cases
    alternate R1 and R2, so every case has something newer to install."""

    r0: BuiltRelease
    r1: BuiltRelease
    r2: BuiltRelease
    images: list[Path]

    def target(self, index: int) -> BuiltRelease:
        return self.r1 if index % 2 == 0 else self.r2


def build_release_set(root: Path) -> ReleaseSet:
    """Three real ext4 images as releases 0.0, 1.0 and 2.0 (serials 1, 2, 3) under ``root``."""
    from tests.support.daemon import make_images

    images = make_images(root / "images", 3)
    built = [
        build_release(image, root / f"r{n}", version=f"{n}.0", serial=n + 1)
        for n, image in enumerate(images)
    ]
    return ReleaseSet(r0=built[0], r1=built[1], r2=built[2], images=images)
