"""Real filesystem images for tests: ``mkfs.ext4 -d`` from a directory of files."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

from organixmd.boot.machine import write_boot_env
from organixmd.release.meta import BootEntry

#: Where a slot image carries its boot entry for GRUB (see docs/boot.md).
BOOT_ENV_PATH = "organixm/boot.env"

DEFAULT_BOOT = BootEntry(
    kernel="/boot/bzImage",
    initrd="/boot/initrd",
    init="/sbin/init",
    params=["console=ttyS0", "quiet"],
)


def populate_tree(root: Path, payload_bytes: int, seed: int = 1) -> None:
    """Fill ``root`` with a mix of compressible text and incompressible data.

    Roughly what a root filesystem holds: text, configuration, binaries. The mix
    compresses about 3:1 with zstd, like the real system images measured.
    """
    rng = random.Random(seed)
    written = 0
    index = 0
    words = [rng.randbytes(rng.randint(2, 9)).hex() for _ in range(2000)]
    while written < payload_bytes:
        size = min(rng.choice([4096, 65536, 262144, 1048576]), payload_bytes - written)
        sub = root / f"d{index % 37:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"f{index:06d}"
        if index % 4 == 0:
            data = rng.randbytes(size)
        else:
            text = " ".join(rng.choice(words) for _ in range(size // 8 + 1))
            data = text.encode()[:size]
        path.write_bytes(data)
        written += size
        index += 1


def make_ext4_image(
    path: Path,
    size: int,
    *,
    payload_bytes: int | None = None,
    seed: int = 1,
    tree: Path | None = None,
    label: str = "organixm-root",
    boot: BootEntry | None = DEFAULT_BOOT,
) -> Path:
    """Build a real ext4 image of ``size`` bytes at ``path`` from generated files.

    The image carries ``boot`` at :data:`BOOT_ENV_PATH` for GRUB, as a release does
    (``boot=None`` leaves it out).
    """
    work = tree or path.with_suffix(".tree")
    if tree is None:
        work.mkdir(parents=True, exist_ok=True)
        populate_tree(work, payload_bytes if payload_bytes is not None else size // 2, seed)
    if boot is not None:
        write_boot_env(work / BOOT_ENV_PATH, boot)
    with open(path, "wb") as handle:
        handle.truncate(size)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d", str(work), str(path)],
        check=True,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    return path


def sha256_file(path: Path, length: int | None = None) -> str:
    """SHA-256 of the first ``length`` bytes of ``path`` (all of it by default)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        remaining = length if length is not None else os.fstat(handle.fileno()).st_size
        while remaining > 0:
            block = handle.read(min(remaining, 4 * 1024 * 1024))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()
