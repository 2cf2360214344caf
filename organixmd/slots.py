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
from typing import Literal

from organixmd.blockio import device_size, round_up
from organixmd.boot import booted_slot_from_cmdline
from organixmd.config import SlotsConfig
from organixmd.errors import SlotError

SlotName = Literal["a", "b"]
SLOTS: tuple[SlotName, SlotName] = ("a", "b")


def other(slot: SlotName) -> SlotName:
    return "b" if slot == "a" else "a"


def booted_slot(cmdline: Path) -> SlotName | None:
    """The slot named by ``organixm.slot=`` in the kernel command line file, if any.

    Parsed by :func:`organixmd.boot.booted_slot_from_cmdline` (first occurrence wins).
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
    return mount_point_of(devices, mountinfo, source=os.path.realpath(path))


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
