"""The organixm disk layout and the steps that make a disk bootable.

Shared by the installer (onto a real disk) and the tests (onto an image file).
Every step writes through a path with byte offsets, so it works the same on a
block device and on a regular file, and none needs partition device nodes or a
mounted FAT file system::

    LBA 0      protective MBR with GRUB's boot.img (BIOS)
    1 MiB      p1  bios-boot     EF02  GRUB core.img, embedded (BIOS)
    ...        p2  organixm-esp  EF00  FAT, \\EFI\\BOOT\\BOOTX64.EFI (UEFI)
    ...        p3  organixm-boot 8300  ext4: grub/grub.cfg, grub/grubenv(.bak)
    ...        p4  organixm-a    8300  slot a (a raw root file system image)
    ...        p5  organixm-b    8300  slot b
    ...        p6  organixm-rw   8300  optional: /var, /home, /root

GRUB locates the boot partition by its file system UUID and the slots by their
partition numbers on the same disk (the two slot images are identical, so a
label inside them cannot tell them apart). All GRUB modules the configuration
uses are embedded in both core images, so the boot partition holds no modules
and nothing is loaded from a slot except the kernel and initrd.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from organixmd.base.errors import BootError
from organixmd.base.slotname import SlotName, other
from organixmd.boot.machine import BootControl, render_grub_cfg

MIB = 1024 * 1024
SECTOR = 512
GRUB_I386_PC = Path("/usr/lib/grub/i386-pc")
GRUB_X86_64_EFI = Path("/usr/lib/grub/x86_64-efi")

#: GRUB modules embedded in the core images: everything grub.cfg runs.
GRUB_MODULES_COMMON: tuple[str, ...] = (
    "part_gpt",
    "part_msdos",
    "ext2",
    "search",
    "search_fs_uuid",
    "normal",
    "configfile",
    "echo",
    "test",
    "regexp",
    "loadenv",
    "linux",
    "halt",
    "reboot",
    "sleep",
    "serial",
    "terminfo",
    "terminal",
    "boot",
    "gzio",
)
GRUB_MODULES_BIOS: tuple[str, ...] = (*GRUB_MODULES_COMMON, "biosdisk")
GRUB_MODULES_EFI: tuple[str, ...] = (*GRUB_MODULES_COMMON, "fat", "efi_gop")

#: Where the boot files live inside the boot partition (GRUB paths; the host mounts it at /boot).
GRUB_DIR = "/grub"
GRUB_CFG = f"{GRUB_DIR}/grub.cfg"
GRUBENV = f"{GRUB_DIR}/grubenv"
GRUBENV_BACKUP = f"{GRUB_DIR}/grubenv.bak"


@dataclass(frozen=True, slots=True)
class Partition:
    number: int
    name: str
    type_code: str
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True, slots=True)
class DiskLayout:
    """Byte offsets of every partition; ``disk_size`` includes the backup GPT."""

    bios_boot: Partition
    esp: Partition
    boot: Partition
    slot_a: Partition
    slot_b: Partition
    rw: Partition | None
    disk_size: int

    @property
    def partitions(self) -> tuple[Partition, ...]:
        parts = (self.bios_boot, self.esp, self.boot, self.slot_a, self.slot_b)
        return (*parts, self.rw) if self.rw is not None else parts

    def slot(self, name: str) -> Partition:
        if name == "a":
            return self.slot_a
        if name == "b":
            return self.slot_b
        raise BootError(f"no slot {name!r}: slots are 'a' and 'b'")


def plan_layout(
    *,
    slot_size: int,
    esp_size: int = 64 * MIB,
    boot_size: int = 128 * MIB,
    rw_size: int = 0,
    bios_boot_size: int = 1 * MIB,
) -> DiskLayout:
    """Place the partitions MiB-aligned in order; ``rw_size=0`` leaves out the rw partition."""
    sizes = {"slot": slot_size, "esp": esp_size, "boot": boot_size, "bios": bios_boot_size}
    for what, size in sizes.items():
        if size <= 0 or size % MIB:
            raise BootError(f"{what} partition size {size} must be a positive multiple of 1 MiB")
    position = MIB

    def take(number: int, name: str, type_code: str, size: int) -> Partition:
        nonlocal position
        part = Partition(number, name, type_code, position, size)
        position += size
        return part

    bios_boot = take(1, "bios-boot", "EF02", bios_boot_size)
    esp = take(2, "organixm-esp", "EF00", esp_size)
    boot = take(3, "organixm-boot", "8300", boot_size)
    slot_a = take(4, "organixm-a", "8300", slot_size)
    slot_b = take(5, "organixm-b", "8300", slot_size)
    rw = take(6, "organixm-rw", "8300", rw_size) if rw_size else None
    # One MiB at the end holds the backup GPT (33 sectors) with room to spare.
    return DiskLayout(bios_boot, esp, boot, slot_a, slot_b, rw, position + MIB)


def _run(argv: list[str], what: str, hint: str = "") -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(argv, check=True, capture_output=True)
    except FileNotFoundError as exc:
        raise BootError(
            f"{what}: {argv[0]} is not installed",
            hint="install grub-common, grub-pc-bin, grub-efi-amd64-bin, gdisk, "
            "dosfstools, mtools and e2fsprogs",
        ) from exc
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace").strip().splitlines()
        raise BootError(
            f"{what}: {argv[0]} failed with status {exc.returncode}: "
            f"{detail[-1] if detail else 'no message'}",
            hint=hint
            or f"{argv[0]}'s own message is quoted; check the target is writable and large enough",
        ) from exc


def write_partition_table(target: Path, layout: DiskLayout) -> None:
    """Write a fresh GPT (and protective MBR) describing ``layout`` onto ``target``."""
    argv = ["sgdisk", "--clear"]
    for part in layout.partitions:
        first = part.start // SECTOR
        last = part.end // SECTOR - 1
        argv += [
            f"--new={part.number}:{first}:{last}",
            f"--typecode={part.number}:{part.type_code}",
            f"--change-name={part.number}:{part.name}",
        ]
    _run([*argv, str(target)], f"partition table on {target}")


def _chunks(source: Path, size: int) -> Iterator[tuple[int, bytes]]:
    with open(source, "rb") as handle:
        offset = 0
        while offset < size:
            data = handle.read(min(4 * MIB, size - offset))
            if not data:
                return
            yield offset, data
            offset += len(data)


def write_at(target: Path, offset: int, source: Path, limit: int, *, sparse: bool) -> None:
    """Copy ``source`` into ``target`` at byte ``offset``; never past ``limit`` bytes.

    ``sparse=True`` skips all-zero chunks, which is correct only when ``target`` is a
    fresh (zero) image file; a real disk needs every byte written.
    """
    size = source.stat().st_size
    if size > limit:
        raise BootError(f"{source}: {size} bytes do not fit in a {limit}-byte partition")
    descriptor = os.open(target, os.O_WRONLY)
    try:
        for position, data in _chunks(source, size):
            if sparse and not data.strip(b"\0"):
                continue
            os.pwrite(descriptor, data, offset + position)
        os.fsync(descriptor)
    except OSError as exc:
        raise BootError(f"{target}: cannot write at offset {offset}: {exc}") from exc
    finally:
        os.close(descriptor)


def early_config(boot_uuid: str) -> str:
    """The configuration embedded in the core images: find the boot partition by UUID."""
    return f"search --no-floppy --fs-uuid --set=root {boot_uuid}\nset prefix=($root){GRUB_DIR}\n"


def make_core_image(
    boot_uuid: str, output: Path, *, platform: str, directory: Path | None = None
) -> Path:
    """Build GRUB's core image for ``platform`` (``i386-pc`` or ``x86_64-efi``).

    ``directory`` holds GRUB's modules for the platform (default: Debian's
    ``/usr/lib/grub/<platform>``; on NixOS ``${grub2}/lib/grub/<platform>``).
    """
    if platform == "i386-pc":
        default, modules = GRUB_I386_PC, GRUB_MODULES_BIOS
    elif platform == "x86_64-efi":
        default, modules = GRUB_X86_64_EFI, GRUB_MODULES_EFI
    else:
        raise BootError(f"unsupported GRUB platform {platform!r}: use i386-pc or x86_64-efi")
    directory = directory or default
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "early.cfg"
        config.write_text(early_config(boot_uuid))
        _run(
            [
                "grub-mkimage",
                "--directory",
                str(directory),
                "--format",
                platform,
                "--config",
                str(config),
                "--prefix",
                GRUB_DIR,
                "--output",
                str(output),
                *modules,
            ],
            f"GRUB {platform} image",
            hint=f"check that {directory} holds GRUB's {platform} modules "
            "(--grub-bios-dir / --grub-efi-dir)",
        )
    return output


def install_bios(
    target: Path, layout: DiskLayout, core_image: Path, *, directory: Path | None = None
) -> None:
    """Embed ``core_image`` in the BIOS boot partition and point boot.img at it.

    Does what ``grub-bios-setup`` does for an embedded core (it cannot run on an
    image file): boot.img's code goes into the MBR, keeping the partition table;
    its kernel-sector field names core.img's first sector, and the blocklist at the
    end of that sector names the remaining sectors.
    """
    core = bytearray(core_image.read_bytes())
    if len(core) > layout.bios_boot.size:
        raise BootError(
            f"GRUB core image ({len(core)} bytes) does not fit the "
            f"{layout.bios_boot.size}-byte BIOS boot partition"
        )
    core_lba = layout.bios_boot.start // SECTOR
    sectors = -(-len(core) // SECTOR)
    core += b"\0" * (sectors * SECTOR - len(core))
    # struct grub_pc_bios_boot_blocklist { u64 start; u16 len; u16 segment; } ends sector 0.
    struct.pack_into("<QH", core, SECTOR - 12, core_lba + 1, sectors - 1)
    boot_img = ((directory or GRUB_I386_PC) / "boot.img").read_bytes()
    descriptor = os.open(target, os.O_RDWR)
    try:
        mbr = bytearray(os.pread(descriptor, SECTOR, 0))
        if mbr[510:512] != b"\x55\xaa":
            raise BootError(f"{target}: no protective MBR; write the partition table first")
        # Code before the BPB and after it up to the disk signature; keep the table.
        mbr[0:3] = boot_img[0:3]
        mbr[0x5A:0x1B8] = boot_img[0x5A:0x1B8]
        struct.pack_into("<Q", mbr, 0x5C, core_lba)
        mbr[0x64] = 0xFF  # use the drive the BIOS booted from
        mbr[0x66:0x68] = b"\x90\x90"  # hard disk: enable the buggy-BIOS drive check
        os.pwrite(descriptor, bytes(core), layout.bios_boot.start)
        os.pwrite(descriptor, bytes(mbr), 0)
        os.fsync(descriptor)
    except OSError as exc:
        raise BootError(f"{target}: cannot install the BIOS boot code: {exc}") from exc
    finally:
        os.close(descriptor)


def make_esp_image(efi_image: Path, output: Path, size: int) -> Path:
    """A FAT file system of ``size`` bytes holding ``efi_image`` as \\EFI\\BOOT\\BOOTX64.EFI."""
    output.unlink(missing_ok=True)
    _run(["mkfs.vfat", "-C", "-n", "ORGANIXM", str(output), str(size // 1024)], "ESP")
    _run(["mmd", "-i", str(output), "::/EFI", "::/EFI/BOOT"], "ESP directories")
    _run(["mcopy", "-i", str(output), str(efi_image), "::/EFI/BOOT/BOOTX64.EFI"], "ESP loader")
    return output


def make_ext4(output: Path, size: int, tree: Path, *, uuid: str, label: str) -> Path:
    """An ext4 file system image of ``size`` bytes filled from ``tree``."""
    with open(output, "wb") as handle:
        handle.truncate(size)
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-U",
            uuid,
            "-L",
            label,
            "-E",
            "root_owner=0:0",
            "-d",
            str(tree),
            str(output),
        ],
        f"ext4 file system {label}",
    )
    return output


def install_boot_loaders(
    target: Path, layout: DiskLayout, boot_uuid: str, *, sparse: bool = False
) -> None:
    """Put GRUB for BIOS (MBR + BIOS boot partition) and UEFI (ESP) onto ``target``."""
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        core = make_core_image(boot_uuid, work / "core.img", platform="i386-pc")
        install_bios(target, layout, core)
        efi = make_core_image(boot_uuid, work / "BOOTX64.EFI", platform="x86_64-efi")
        esp = make_esp_image(efi, work / "esp.img", layout.esp.size)
        write_at(target, layout.esp.start, esp, layout.esp.size, sparse=sparse)


def populate_boot_tree(tree: Path, layout: DiskLayout, boot_uuid: str, good_slot: SlotName) -> None:
    """Fill ``tree`` (the boot partition's root) with grub.cfg and both environment copies.

    The environment starts with ``good_slot`` committed, the other slot bad.
    """
    grub = tree / GRUB_DIR.lstrip("/")
    grub.mkdir(parents=True, exist_ok=True)
    (grub / "grub.cfg").write_text(
        render_grub_cfg(
            boot_uuid=boot_uuid,
            slot_a_part=layout.slot_a.number,
            slot_b_part=layout.slot_b.number,
            default_order=(good_slot, other(good_slot)),
            grubenv_path=GRUBENV,
            grubenv_backup_path=GRUBENV_BACKUP,
        )
    )
    boot_control(tree).initialize(good_slot)


def write_boot_partition(
    target: Path, layout: DiskLayout, boot_uuid: str, good_slot: SlotName, *, sparse: bool = False
) -> None:
    """Make the boot partition's ext4 file system (grub.cfg, both environments) on ``target``."""
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "boot"
        populate_boot_tree(tree, layout, boot_uuid, good_slot)
        image = make_ext4(
            Path(scratch) / "boot.img",
            layout.boot.size,
            tree,
            uuid=boot_uuid,
            label="organixm-boot",
        )
        write_at(target, layout.boot.start, image, layout.boot.size, sparse=sparse)


def prepare_disk(
    target: Path, layout: DiskLayout, boot_uuid: str, good_slot: SlotName, *, sparse: bool = False
) -> None:
    """Partition ``target`` and install GRUB (BIOS and UEFI) and the boot partition.

    The slots are left as they are: the caller writes the release image into
    ``good_slot`` (and nothing into the other, which the environment marks bad).
    ``sparse=True`` only for a fresh image file (zero chunks are skipped).
    """
    write_partition_table(target, layout)
    install_boot_loaders(target, layout, boot_uuid, sparse=sparse)
    write_boot_partition(target, layout, boot_uuid, good_slot, sparse=sparse)


def boot_control(boot_root: Path, *, booted: SlotName | None = None) -> BootControl:
    """The :class:`BootControl` of a boot partition mounted (or staged) at ``boot_root``."""
    return BootControl(
        boot_root / GRUBENV.lstrip("/"), boot_root / GRUBENV_BACKUP.lstrip("/"), booted=booted
    )
