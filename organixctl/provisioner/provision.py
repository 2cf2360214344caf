"""The installer: lay out a disk (or a disk image file), write the first release, install GRUB.

``organixctl provision`` is the command; this module is its logic. The steps,
in order, each refusing loudly rather than guessing:

1. choose the target: a named device or image file, or ``--first-disk`` only
   when exactly one candidate disk exists; never a disk with anything mounted;
2. fetch and check the release like a host would (signature when keys are
   given, strict schema) and size the slots from it, with headroom;
3. print the plan; ``--dry-run`` stops here, and without ``--yes`` a person
   at a terminal must confirm by typing the target's path;
4. write the GPT, GRUB for BIOS and/or UEFI, the boot partition (the static
   grub.cfg and the environment with slot a committed), and the ``rw`` file
   system;
5. stream the release into slot a with the daemon's own verified pipeline
   (every chunk checked, then the whole slot read back from the device).

A regular file as the target yields a ready-to-boot disk image (a cloud
template). Partitions are addressed by byte offset, so nothing needs the
kernel to scan the new partition table.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from organixctl.provisioner import disklayout
from organixctl.provisioner.disklayout import MIB, DiskLayout
from organixmd.base.errors import BootError, ConfigError, SlotError
from organixmd.install.blockio import device_size, round_up
from organixmd.install.pipeline import Installer, InstallResult
from organixmd.install.slots import mount_point_of, mounted_at
from organixmd.release.meta import Release
from organixmd.release.sources import Source

Firmware = Literal["bios", "uefi", "both"]

#: Smallest rw partition worth creating; a disk that leaves less is refused.
MIN_RW = 64 * MIB
#: rw size for a new image file when none is given.
DEFAULT_IMAGE_RW = 256 * MIB
_DISK_PREFIXES = ("sd", "vd", "xvd", "hd", "nvme", "mmcblk")


def default_slot_size(image_size: int) -> int:
    """Room for this release and larger ones: 1.5 times the image plus 64 MiB, MiB-aligned."""
    return round_up(image_size * 3 // 2 + 64 * MIB, MIB)


def parse_size(text: str) -> int:
    """``512M``, ``2G``, ``1048576`` → bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = units.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in units else value
    try:
        result = int(float(number) * factor)
    except ValueError as exc:
        raise ConfigError(f"size {text!r}: use a number with K, M, G or T (e.g. 2G)") from exc
    if result <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return result


@dataclass(frozen=True, slots=True)
class Candidate:
    path: Path
    size: int
    why_not: str | None


def _mounted_partitions(name: str, mountinfo: Path) -> str | None:
    """A mount point of disk ``name`` or any of its partitions, if one is mounted."""
    block = Path("/sys/block") / name
    devices = [block / "dev", *sorted(block.glob(f"{name}*/dev"))]
    numbers: set[str] = set()
    for dev in devices:
        try:
            numbers.add(dev.read_text().strip())
        except OSError:
            continue
    where = mount_point_of(numbers, mountinfo)
    if where is not None:
        return where
    try:
        swaps = Path("/proc/swaps").read_text().splitlines()[1:]
    except OSError:
        swaps = []
    for line in swaps:
        device = line.split()[0] if line.split() else ""
        if device.startswith(f"/dev/{name}"):
            return f"swap on {device}"
    return None


def list_candidates(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Candidate]:
    """Whole disks that ``--first-disk`` could choose, each with why it would not be."""
    found = []
    for block in sorted(Path("/sys/block").iterdir()):
        name = block.name
        if not name.startswith(_DISK_PREFIXES):
            continue
        path = Path("/dev") / name
        try:
            size = int((block / "size").read_text()) * 512
            removable = (block / "removable").read_text().strip() == "1"
        except (OSError, ValueError):
            continue
        why: str | None = None
        where = _mounted_partitions(name, mountinfo)
        if where is not None:
            why = f"in use (mounted at {where})"
        elif removable:
            why = "removable (the installer's own medium?)"
        elif size == 0:
            why = "no medium"
        found.append(Candidate(path, size, why))
    return found


def choose_first_disk(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path:
    candidates = list_candidates(mountinfo)
    usable = [c for c in candidates if c.why_not is None]
    if len(usable) == 1:
        return usable[0].path
    listing = "; ".join(
        f"{c.path} ({c.size // MIB} MiB{', ' + c.why_not if c.why_not else ''})" for c in candidates
    )
    raise SlotError(
        f"--first-disk needs exactly one usable disk, found {len(usable)}: {listing or 'none'}",
        hint="name the disk with --disk /dev/disk/by-id/...",
    )


def check_not_in_use(target: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> None:
    """Refuse a disk with a mounted partition, or an image file a mounted loop device uses."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return
    if stat.S_ISBLK(st.st_mode):
        name = Path(os.path.realpath(target)).name
        if not (Path("/sys/block") / name).exists():
            raise SlotError(
                f"{target} is a partition, not a whole disk",
                hint="give the whole disk, e.g. /dev/disk/by-id/ata-... without -partN",
            )
        where = _mounted_partitions(name, mountinfo)
    else:
        where = mounted_at(target, mountinfo)
    if where is not None:
        raise SlotError(
            f"{target} is in use ({where}); refusing to erase it",
            hint="unmount every file system of that disk first",
        )


@dataclass(frozen=True, slots=True)
class Plan:
    target: Path
    is_file: bool
    create_file: bool
    layout: DiskLayout
    firmware: Firmware
    release: Release
    boot_uuid: str

    def describe(self) -> str:
        kind = (
            "new disk image file"
            if self.create_file
            else ("disk image file" if self.is_file else "block device")
        )
        lines = [
            f"target: {self.target} ({kind}, {self.layout.disk_size // MIB} MiB)",
            f"release: {self.release.describe()}, {self.release.size // MIB} MiB image, "
            f"into slot a",
            f"firmware: {self.firmware}",
            "partitions (GPT):",
        ]
        for part in self.layout.partitions:
            lines.append(
                f"  {part.number}  {part.name:<14} {part.type_code}  "
                f"start {part.start // MIB:>7} MiB  size {part.size // MIB:>7} MiB"
            )
        if not self.create_file:
            lines.append(f"ERASES everything on {self.target}")
        return "\n".join(lines)


def make_plan(
    target: Path,
    release: Release,
    *,
    firmware: Firmware = "both",
    slot_size: int | None = None,
    rw_size: int | None = None,
) -> Plan:
    """Size the layout for ``target`` and ``release``; refuse if it does not fit."""
    slot = round_up(slot_size if slot_size is not None else default_slot_size(release.size), MIB)
    if release.size > slot:
        raise SlotError(
            f"--slot-size {slot // MIB} MiB is smaller than the release image "
            f"({release.size} bytes)"
        )
    base = disklayout.plan_layout(slot_size=slot)
    exists = target.exists()
    is_file = not exists or stat.S_ISREG(os.stat(target).st_mode)
    create = is_file and (not exists or os.stat(target).st_size == 0)
    if create:
        rw = round_up(rw_size if rw_size is not None else DEFAULT_IMAGE_RW, MIB)
    else:
        size = device_size(target)
        room = (size - base.disk_size) // MIB * MIB
        if room < MIN_RW:
            need = (base.disk_size + MIN_RW) // MIB
            raise SlotError(
                f"{target} has {size // MIB} MiB; slots of {slot // MIB} MiB need at least "
                f"{need} MiB",
                hint="use a larger disk or a smaller --slot-size",
            )
        rw = room if rw_size is None else round_up(rw_size, MIB)
        if rw > room:
            raise SlotError(f"--rw-size {rw // MIB} MiB does not fit; {room // MIB} MiB are free")
    layout = disklayout.plan_layout(slot_size=slot, rw_size=rw)
    return Plan(
        target=target,
        is_file=is_file,
        create_file=create,
        layout=layout,
        firmware=firmware,
        release=release,
        boot_uuid=str(uuid.uuid4()),
    )


def write_layout(plan: Plan, grub_bios_dir: Path | None, grub_efi_dir: Path | None) -> None:
    """Partition the target and install GRUB, the boot partition and the rw file system.

    Blocking (runs external tools); the slots are left for the pipeline.
    """
    target, layout = plan.target, plan.layout
    if plan.create_file:
        with open(target, "wb") as handle:
            handle.truncate(layout.disk_size)
    disklayout.write_partition_table(target, layout)
    with tempfile.TemporaryDirectory(prefix="organixm-provision-") as scratch:
        work = Path(scratch)
        if plan.firmware in ("bios", "both"):
            core = disklayout.make_core_image(
                plan.boot_uuid, work / "core.img", platform="i386-pc", directory=grub_bios_dir
            )
            disklayout.install_bios(target, layout, core, directory=grub_bios_dir)
        if plan.firmware in ("uefi", "both"):
            efi = disklayout.make_core_image(
                plan.boot_uuid, work / "BOOTX64.EFI", platform="x86_64-efi", directory=grub_efi_dir
            )
            esp = disklayout.make_esp_image(efi, work / "esp.img", layout.esp.size)
            disklayout.write_at(
                target, layout.esp.start, esp, layout.esp.size, sparse=plan.create_file
            )
    disklayout.write_boot_partition(target, layout, plan.boot_uuid, "a", sparse=plan.create_file)
    if layout.rw is not None:
        _mkfs_rw(target, layout)


def _mkfs_rw(target: Path, layout: DiskLayout) -> None:
    rw = layout.rw
    assert rw is not None  # noqa: S101 - checked by the caller
    try:
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "organixm-rw",
                "-E",
                f"offset={rw.start}",
                str(target),
                f"{rw.size // 1024}k",
            ],
            check=True,
            capture_output=True,
        )
    except FileNotFoundError as exc:
        raise BootError("rw file system: mkfs.ext4 is not installed (e2fsprogs)") from exc
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace").strip()
        raise BootError(f"rw file system on {target}: mkfs.ext4 failed: {detail}") from exc


async def write_release(plan: Plan, source: Source) -> InstallResult:
    """Stream the release into slot a of the target, verified (chunks, whole, read-back)."""
    installer = Installer(
        plan.release,
        source,
        plan.target,
        slot_offset=plan.layout.slot_a.start,
        readback=True,
    )
    return await installer.run()
