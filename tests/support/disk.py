"""Bootable GPT disk image files for the GRUB tests (no root, no loop devices to build).

The layout and every install step are :mod:`organixctl.provisioner.disklayout`'s, the same code
the installer runs against a real disk; this module only picks small sizes and
offers a way to edit the boot partition between boots.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from organixctl.provisioner import disklayout
from organixctl.provisioner.disklayout import MIB, DiskLayout, Partition
from organixmd.base.slotname import SlotName as Slot
from organixmd.boot.machine import BootControl

BOOT_UUID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
SLOT_SIZE = 8 * MIB


@dataclass(frozen=True, slots=True)
class BootDisk:
    path: Path
    layout: DiskLayout
    boot_uuid: str


def build_boot_disk(
    path: Path,
    *,
    slot_a: Path | None,
    slot_b: Path | None,
    good_slot: Slot = "a",
    slot_size: int = SLOT_SIZE,
) -> BootDisk:
    """A GPT disk image with GRUB for BIOS and UEFI, a boot partition and two slots.

    ``slot_a``/``slot_b`` are file system images copied into the slots (``None``
    leaves a slot zeroed). The environment starts with ``good_slot`` committed.
    """
    layout = disklayout.plan_layout(slot_size=slot_size, esp_size=8 * MIB, boot_size=8 * MIB)
    with open(path, "wb") as handle:
        handle.truncate(layout.disk_size)
    disklayout.prepare_disk(path, layout, BOOT_UUID, good_slot, sparse=True)
    for slot_image, part in ((slot_a, layout.slot_a), (slot_b, layout.slot_b)):
        if slot_image is not None:
            disklayout.write_at(path, part.start, slot_image, part.size, sparse=True)
    return BootDisk(path, layout, BOOT_UUID)


def copy_disk(disk: BootDisk, path: Path) -> BootDisk:
    """A copy-on-write (where possible) sparse copy of ``disk`` at ``path``."""
    subprocess.run(
        ["cp", "--reflink=auto", "--sparse=always", str(disk.path), str(path)], check=True
    )
    return BootDisk(path, disk.layout, disk.boot_uuid)


@contextmanager
def mounted(disk: BootDisk, part: Partition) -> Iterator[Path]:
    """Mount one ext4 partition of the image file through a loop device at an offset."""
    with tempfile.TemporaryDirectory(prefix="organixm-mnt-") as mountpoint:
        subprocess.run(
            [
                "mount",
                "-t",
                "ext4",
                "-o",
                f"loop,offset={part.start},sizelimit={part.size}",
                str(disk.path),
                mountpoint,
            ],
            check=True,
        )
        try:
            yield Path(mountpoint)
        finally:
            subprocess.run(["umount", mountpoint], check=True)


@contextmanager
def boot_control(disk: BootDisk) -> Iterator[BootControl]:
    """The daemon's :class:`BootControl` on the image's boot partition, mounted meanwhile."""
    with mounted(disk, disk.layout.boot) as root:
        yield disklayout.boot_control(root)
