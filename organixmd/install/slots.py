"""Which slot booted, which one may be written, and whether it is safe to write.

Invariant 1 lives here: the booted slot is never a target. The booted slot comes
from ``organixm.slot=a|b`` on the kernel command line, which GRUB sets for the
slot it chose; without it the daemon does not know what is running and writes
nothing.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from organixmd.base.config import SlotsConfig
from organixmd.base.errors import SlotError
from organixmd.base.slotname import SlotName
from organixmd.boot.machine import booted_slot_from_cmdline
from organixmd.install.blockio import device_size, round_up


def booted_slot(cmdline: Path) -> SlotName | None:
    """The slot named by ``organixm.slot=`` in the kernel command line file, if any.

    Parsed by :func:`organixmd.boot.machine.booted_slot_from_cmdline` (first occurrence wins).
    """
    try:
        text = cmdline.read_text()
    except OSError:
        return None
    return booted_slot_from_cmdline(text)


@dataclass(frozen=True, slots=True)
class Slot:
    name: SlotName
    path: Path

    def capacity(self) -> int:
        try:
            return device_size(self.path)
        except OSError as exc:
            raise SlotError(
                f"slot {self.name} ({self.path}) cannot be opened: {exc.strerror}",
                hint="check [slots] in the configuration and that the partition exists",
            ) from exc


def slot_paths(config: SlotsConfig) -> dict[SlotName, Slot]:
    return {"a": Slot("a", config.a), "b": Slot("b", config.b)}


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _loop_backing_devices(path: Path) -> set[str]:
    """``MAJ:MIN`` of loop devices whose backing file is ``path``."""
    found: set[str] = set()
    target = os.path.realpath(path)
    try:
        entries = list(Path("/sys/block").glob("loop*/loop/backing_file"))
    except OSError:
        return found
    for entry in entries:
        try:
            if os.path.realpath(entry.read_text().strip()) == target:
                found.add((entry.parent.parent / "dev").read_text().strip())
        except OSError:
            continue
    return found


def mounted_at(path: Path, mountinfo: Path) -> str | None:
    """Where ``path`` (a block device, or a file behind a loop device) is mounted, if it is."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    devices: set[str] = set()
    if stat.S_ISBLK(st.st_mode):
        devices.add(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    else:
        devices |= _loop_backing_devices(path)
    found = mount_point_of(devices, mountinfo, source=os.path.realpath(path))
    return found if found is not None else _mounted_overlap(path, mountinfo)


def _mounted_overlap(path: Path, mountinfo: Path) -> str | None:
    """Where a block device that shares bytes with ``path`` is mounted (a loop device
    over part of a disk file, a partition of a disk), if anywhere."""
    try:
        mine = backing_extents(path)
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    seen: dict[str, bool] = {}
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or "-" not in fields or fields[2].startswith("0:"):
            continue
        number = fields[2]
        if number not in seen:
            major, minor = (int(n) for n in number.split(":"))
            try:
                theirs = _device_extents(major, minor, 0)
            except (OSError, ValueError):
                theirs = []
            seen[number] = any(a.overlaps(b) for a in mine for b in theirs)
        if seen[number]:
            return _unescape_mountinfo(fields[4])
    return None


def mount_point_of(devices: set[str], mountinfo: Path, source: str | None = None) -> str | None:
    """The first mount point of a device numbered ``MAJ:MIN`` in ``devices``, or of ``source``.

    ``source`` matches a mount whose source path resolves to it (a file mounted
    through a loop device shows its own path there on some kernels).
    """
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or "-" not in fields:
            continue
        mounted = _unescape_mountinfo(fields[fields.index("-") + 2])
        from_source = (
            source is not None and mounted.startswith("/") and os.path.realpath(mounted) == source
        )
        if fields[2] in devices or from_source:
            return _unescape_mountinfo(fields[4])
    return None


#: /sys/dev/block/MAJ:MIN: what the kernel says backs a block device.
SYS_DEV_BLOCK = Path("/sys/dev/block")
#: Loop devices over loop devices over ... deeper than this are refused as unknown.
_MAX_DEPTH = 16
_END = 1 << 63


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range ``[start, end)`` of one underlying object: a file (by device and
    inode) or a whole block device that nothing further backs (by major and minor)."""

    object: tuple[str, int, int]
    start: int
    end: int

    def overlaps(self, other: Extent) -> bool:
        return self.object == other.object and self.start < other.end and other.start < self.end

    def describe(self) -> str:
        kind, first, second = self.object
        what = f"inode {second} on device {os.major(first)}:{os.minor(first)}"
        if kind == "disk":
            what = f"block device {first}:{second}"
        end = "its end" if self.end >= _END else f"byte {self.end}"
        return f"{what}, bytes {self.start} to {end}"


def _sysfs_int(path: Path) -> int:
    return int(path.read_text().strip() or 0)


def _device_extents(major: int, minor: int, depth: int) -> list[Extent]:
    """What backs block device ``major:minor``, down through loop devices, partitions and
    stacked devices (device-mapper, md: every device below, whole, to stay on the safe
    side). Raises OSError when sysfs cannot say."""
    node = SYS_DEV_BLOCK / f"{major}:{minor}"
    loop = node / "loop"
    if loop.is_dir():
        backing = (loop / "backing_file").read_text().strip()
        offset = _sysfs_int(loop / "offset")
        limit = _sysfs_int(loop / "sizelimit")
        below = backing_extents(Path(backing.removesuffix(" (deleted)")), depth + 1)
        return _window(below, offset, limit)
    if (node / "partition").exists():
        parent = node.resolve().parent
        pmajor, pminor = (int(n) for n in (parent / "dev").read_text().split(":"))
        start = _sysfs_int(node / "start") * 512
        size = _sysfs_int(node / "size") * 512
        return _window(_device_extents(pmajor, pminor, depth + 1), start, size)
    slaves = sorted((node / "slaves").iterdir()) if (node / "slaves").is_dir() else []
    if slaves:
        extents: list[Extent] = []
        for slave in slaves:
            smajor, sminor = (int(n) for n in (slave / "dev").read_text().split(":"))
            extents += [
                Extent(e.object, 0, _END) for e in _device_extents(smajor, sminor, depth + 1)
            ]
        return extents
    return [Extent(("disk", major, minor), 0, _END)]


def _window(extents: list[Extent], offset: int, length: int) -> list[Extent]:
    """``length`` bytes (0: all the rest) from ``offset`` of the concatenation ``extents``."""
    out: list[Extent] = []
    position = 0
    want_end = _END if length == 0 else offset + length
    for extent in extents:
        size = extent.end - extent.start
        lo, hi = max(offset, position), min(want_end, position + size)
        if lo < hi:
            out.append(
                Extent(extent.object, extent.start + lo - position, extent.start + hi - position)
            )
        position += size
        if position >= want_end:
            break
    return out


def backing_extents(path: Path, depth: int = 0) -> list[Extent]:
    """The byte ranges of files and whole disks that ``path`` (a file or a block device,
    symlinks followed) reads and writes in the end. Raises OSError when that cannot be
    told (a missing path, a stack too deep, sysfs unreadable)."""
    if depth > _MAX_DEPTH:
        raise OSError(f"{path}: more than {_MAX_DEPTH} layers of loop devices or partitions")
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return _device_extents(os.major(st.st_rdev), os.minor(st.st_rdev), depth)
    return [Extent(("file", st.st_dev, st.st_ino), 0, max(st.st_size, 1))]


def shared_extent(first: Path, second: Path) -> tuple[Extent, Extent] | None:
    """A pair of overlapping extents of ``first`` and ``second``, if they share bytes."""
    for a in backing_extents(first):
        for b in backing_extents(second):
            if a.overlaps(b):
                return a, b
    return None


def same_device(first: Path, second: Path) -> bool:
    """Whether two slot paths name the same device or file (symlinks resolved)."""
    try:
        a, b = os.stat(first), os.stat(second)
    except OSError:
        return False
    if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode):
        return a.st_rdev == b.st_rdev
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_target(
    slot: Slot, booted: SlotName | None, booted_path: Path, image_size: int, mountinfo: Path
) -> None:
    """Refuse a target that is booted, mounted, too small, or the booted slot's own device."""
    if booted is None:
        raise SlotError(
            "the booted slot is unknown (no organixm.slot= on the kernel command line); "
            "refusing to write either slot",
            hint="boot through organixm's grub.cfg, or set [slots] cmdline for tests",
        )
    if slot.name == booted:
        raise SlotError(f"slot {slot.name} is the booted slot; it is never written")
    if same_device(slot.path, booted_path):
        raise SlotError(
            f"slot {slot.name} ({slot.path}) is the same device as the booted slot "
            f"({booted_path}); refusing to write it",
            hint="[slots] a and b must name two different partitions",
        )
    try:
        # A target that does not exist is reported by the capacity check below.
        shared = shared_extent(slot.path, booted_path) if slot.path.exists() else None
    except OSError as exc:
        raise SlotError(
            f"cannot tell what backs slot {slot.name} ({slot.path}) or the booted slot "
            f"({booted_path}): {exc.strerror or exc}; refusing to write, since it might be "
            "the booted slot",
            hint="check [slots] in the configuration and that both devices exist",
        ) from exc
    if shared is not None:
        raise SlotError(
            f"slot {slot.name} ({slot.path}) shares bytes with the booted slot "
            f"({booted_path}): both reach {shared[0].describe()} (the booted slot: "
            f"{shared[1].describe()}); refusing to write it",
            hint="[slots] a and b must name two different partitions; a loop device, "
            "partition or file under one slot must not overlap the other",
        )
    where = mounted_at(slot.path, mountinfo)
    if where is not None:
        raise SlotError(
            f"slot {slot.name} ({slot.path}) is mounted at {where}; refusing to overwrite it",
            hint=f"unmount {where} first",
        )
    capacity = slot.capacity()
    if round_up(image_size, 4096) > capacity:
        raise SlotError(
            f"the image ({image_size} bytes) is larger than slot {slot.name} ({slot.path}, "
            f"{capacity} bytes)",
            hint="publish a smaller image or re-provision with larger slots",
        )
