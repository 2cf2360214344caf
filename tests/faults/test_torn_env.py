"""Power cut during a GRUB environment write: real GRUB still boots a good slot.

A 1024-byte environment block torn by a power cut holds the new bytes up to some
offset and, after it, either the old bytes (the sector kept its old contents) or
zeros. Three writers can be cut:

- the daemon writing in place (it writes a temporary file and renames it, but a file
  system may still tear a block; the worst case is tested), primary first, so the
  backup is still the old block;
- the daemon's rename sequence cut between its steps: each copy is whole, old or new;
- GRUB's own ``save_env`` at boot, which rewrites the primary in place while the
  backup holds what the daemon last wrote.

Each torn disk is booted in grub-emu (the same grub.cfg on the same disk image, in
about 0.05 s) and a seeded subset in QEMU with SeaBIOS, where the slot's real kernel
must report the command line. Every boot must pick a slot that was good or on trial
before or after the interrupted write, never "no usable slot".
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from organixctl.provisioner.disklayout import MIB
from organixmd.boot import grubenv
from organixmd.boot import machine as boot
from organixmd.boot.machine import BootState, SlotBoot
from tests.faults.report import FaultReport, Row
from tests.support.disk import BootDisk, build_boot_disk
from tests.support.qemu import BootResult, boot_emu, boot_qemu
from tests.support.tinykernel import make_bootable_image, tiny_kernel

SEED = 9011
OFFSETS = 24
QEMU_BOOTS = 6
SLOT_SIZE = 24 * MIB
BLOCK = grubenv.BLOCK_SIZE


@dataclass(frozen=True)
class Transition:
    name: str
    old: BootState
    new: BootState
    #: The backup copy while the primary is being written.
    backup: BootState


def _transitions() -> list[Transition]:
    start = boot.initial("a")
    flip = boot.flipped(start, "b", 3, booted="a")
    grub_trial = boot.predict_boot(flip, {"a": True, "b": True}).after
    commit = boot.committed(grub_trial, "b")
    bad = boot.marked_bad(grub_trial, "b")
    return [
        Transition("daemon flip", start, flip, backup=start),
        Transition("daemon commit", grub_trial, commit, backup=grub_trial),
        Transition("daemon mark-bad", grub_trial, bad, backup=grub_trial),
        # GRUB consumed a try in place; the daemon had written both copies before.
        Transition("GRUB save_env", flip, grub_trial, backup=flip),
    ]


def _block(state: BootState) -> bytes:
    return grubenv.render(boot.env_from_state(state))


def _bootable(*states: BootState) -> set[str]:
    """Slots good or on trial with tries in any of ``states``."""
    allowed: set[str] = set()
    for state in states:
        for name in ("a", "b"):
            slot: SlotBoot = state.slot(name)
            if slot.state == "good" or (slot.state == "trial" and slot.tries_left > 0):
                allowed.add(name)
    return allowed


def _block_offset(disk: BootDisk, work: Path, path: str) -> int:
    """Byte offset of the data block of ``path`` (a one-block file) in the disk image."""
    image = work / "boot-part.img"
    if not image.exists():
        with open(disk.path, "rb") as source, open(image, "wb") as target:
            source.seek(disk.layout.boot.start)
            target.write(source.read(disk.layout.boot.size))

    def debugfs(request: str) -> str:
        return subprocess.run(
            ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
        ).stdout

    block = int(debugfs(f"bmap {path} 0").split()[0])
    match = re.search(r"Block size:\s+(\d+)", debugfs("stats"))
    assert match is not None
    return disk.layout.boot.start + block * int(match.group(1))


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> BootDisk:
    work = tmp_path_factory.mktemp("torn-env")
    kernel = tiny_kernel()
    slot_a = make_bootable_image(work / "a.img", SLOT_SIZE, kernel, payload_bytes=64 * 1024)
    slot_b = make_bootable_image(work / "b.img", SLOT_SIZE, kernel, payload_bytes=64 * 1024)
    return build_boot_disk(work / "disk.img", slot_a=slot_a, slot_b=slot_b, slot_size=SLOT_SIZE)


def test_torn_env_block_still_boots_a_good_slot(
    disk: BootDisk, tmp_path: Path, faults: FaultReport
) -> None:
    """Torn primary blocks at many offsets (old or zero tails) and every cut of the
    daemon's rename sequence boot a slot that was good or on trial, in real GRUB."""
    row = faults.add(Row(fault="power cut: GRUB env block torn (grub-emu + QEMU BIOS)"))
    started = time.monotonic()
    rng = random.Random(SEED)
    primary_at = _block_offset(disk, tmp_path, "/grub/grubenv")
    backup_at = _block_offset(disk, tmp_path, "/grub/grubenv.bak")
    cases: list[tuple[str, bytes, bytes, set[str], bool]] = []
    for transition in _transitions():
        old, new = _block(transition.old), _block(transition.new)
        allowed = _bootable(transition.old, transition.new)
        backup = _block(transition.backup)
        for k in sorted(rng.sample(range(1, BLOCK), OFFSETS)):
            cases.append(
                (f"{transition.name} torn at {k}", new[:k] + old[k:], backup, allowed, True)
            )
            zeros = new[:k] + b"\0" * (BLOCK - k)
            cases.append((f"{transition.name} zeroed from {k}", zeros, backup, allowed, True))
        if transition.name.startswith("daemon"):
            # Temporary file + rename, primary then backup: each copy whole, old or new.
            for name, primary_block, backup_block in (
                ("cut before the primary's rename", old, old),
                ("cut between the two renames", new, old),
                ("cut after both renames", new, new),
            ):
                cases.append(
                    (f"{transition.name} {name}", primary_block, backup_block, allowed, False)
                )
    in_qemu = set(rng.sample([i for i, case in enumerate(cases) if case[4]], QEMU_BOOTS))
    failures: list[str] = []
    descriptor = os.open(disk.path, os.O_RDWR)
    try:
        for index, (label, primary_block, backup_block, allowed, _torn) in enumerate(cases):
            harnesses = ["emu", "qemu"] if index in in_qemu else ["emu"]
            for harness in harnesses:
                os.pwrite(descriptor, primary_block, primary_at)
                os.pwrite(descriptor, backup_block, backup_at)
                row.tries += 1
                result: BootResult
                if harness == "emu":
                    result = boot_emu(disk.path, tmp_path, disk.layout.boot.number)
                else:
                    result = boot_qemu(disk.path, "bios")
                    assert result.cmdline is not None
                row.reported[f"grub {result.reason}"] += 1
                if result.no_slot:
                    row.stuck += 1
                    failures.append(f"{label} ({harness}): no slot booted")
                elif result.slot not in allowed:
                    row.flips_on_bad_data += 1
                    failures.append(f"{label} ({harness}): booted {result.slot} ({result.reason})")
                else:
                    row.recovered += 1
                # A primary torn with a zero tail still loads in GRUB, but save_env
                # fails on it: a trial started then would never use up its tries, so
                # GRUB must boot the committed slot instead ("trial-unsaved"). A trial
                # boot always changes the tries, so an unsaved one leaves both copies
                # as they were.
                unchanged = (
                    os.pread(descriptor, BLOCK, primary_at) == primary_block
                    and os.pread(descriptor, BLOCK, backup_at) == backup_block
                )
                if unchanged and result.reason == "trial":
                    row.flips_on_bad_data += 1
                    failures.append(f"{label} ({harness}): trial started, its try not saved")
    finally:
        os.close(descriptor)
        row.seconds = time.monotonic() - started
    assert not failures, "\n".join(failures)
    assert row.tries == len(cases) + QEMU_BOOTS
    assert row.recovered == row.tries
    assert (row.flips_on_bad_data, row.stuck, row.tracebacks) == (0, 0, 0)
