"""organixmd.disklayout: partition placement, GPT and the BIOS boot code on an image file."""

from __future__ import annotations

import itertools
import struct
import subprocess
from pathlib import Path

import pytest

from organixctl.provisioner import disklayout
from organixctl.provisioner.disklayout import MIB, SECTOR
from organixmd.base.errors import BootError


def test_layout_is_contiguous_aligned_and_named() -> None:
    """Partitions follow each other MiB-aligned, slots are p4/p5 named organixm-a/b."""
    layout = disklayout.plan_layout(slot_size=64 * MIB, rw_size=32 * MIB)
    parts = layout.partitions
    assert [p.number for p in parts] == [1, 2, 3, 4, 5, 6]
    assert all(p.start % MIB == 0 and p.size % MIB == 0 for p in parts)
    assert all(a.end == b.start for a, b in itertools.pairwise(parts))
    assert (layout.slot("a").name, layout.slot("b").name) == ("organixm-a", "organixm-b")
    assert layout.disk_size == parts[-1].end + MIB


def test_layout_refuses_unaligned_sizes() -> None:
    """A size that is not a whole number of MiB is refused with the partition named."""
    with pytest.raises(BootError, match="slot partition size"):
        disklayout.plan_layout(slot_size=MIB + 1)


def test_gpt_written_matches_layout(tmp_path: Path) -> None:
    """sgdisk reads back the partitions at the planned sectors with the planned names."""
    layout = disklayout.plan_layout(slot_size=4 * MIB, esp_size=2 * MIB, boot_size=2 * MIB)
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(layout.disk_size)
    disklayout.write_partition_table(image, layout)
    printed = subprocess.run(
        ["sgdisk", "--print", str(image)], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()]
    rows = [row for row in rows if len(row) >= 7]
    assert [(int(r[0]), int(r[1]), r[5], r[6]) for r in rows] == [
        (p.number, p.start // SECTOR, p.type_code, p.name) for p in layout.partitions
    ]


def test_bios_boot_code_points_at_embedded_core(tmp_path: Path) -> None:
    """boot.img in the MBR names core.img's sector; core's blocklist names the rest."""
    layout = disklayout.plan_layout(slot_size=4 * MIB, esp_size=2 * MIB, boot_size=2 * MIB)
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(layout.disk_size)
    disklayout.write_partition_table(image, layout)
    table_before = image.read_bytes()[0x1B8:0x200]
    core = disklayout.make_core_image(
        "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", tmp_path / "core.img", platform="i386-pc"
    )
    disklayout.install_bios(image, layout, core)
    data = image.read_bytes()
    core_lba = layout.bios_boot.start // SECTOR
    assert struct.unpack_from("<Q", data, 0x5C)[0] == core_lba
    assert data[0x1B8:0x200] == table_before
    first = layout.bios_boot.start
    start, length = struct.unpack_from("<QH", data, first + SECTOR - 12)
    assert start == core_lba + 1
    assert length == -(-core.stat().st_size // SECTOR) - 1


def test_bios_install_without_partition_table_is_refused(tmp_path: Path) -> None:
    """Installing boot code onto a disk with no protective MBR says what to do first."""
    layout = disklayout.plan_layout(slot_size=4 * MIB, esp_size=2 * MIB, boot_size=2 * MIB)
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(layout.disk_size)
    core = tmp_path / "core.img"
    core.write_bytes(b"\0" * 4096)
    with pytest.raises(BootError, match="write the partition table first"):
        disklayout.install_bios(image, layout, core)
