"""Boot control proven in real GRUB: QEMU with SeaBIOS and OVMF, and grub-emu.

Each test boots a copy of one disk image built per module, changes the GRUB
environment between boots with the daemon's own BootControl, and reads GRUB's
decision from what a real kernel saw: each slot carries a tiny Linux
(tests/support/tinykernel.py) whose init prints its command line on the serial
console and powers off. What GRUB saved is read back from the environment.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from organixctl.provisioner.disklayout import MIB, write_at
from organixmd.base.slotname import SlotName as Slot
from organixmd.boot import grubenv
from organixmd.boot import machine as boot
from organixmd.boot.machine import BootState, SlotBoot
from organixmd.release.meta import BootEntry
from tests.support.disk import BootDisk, boot_control, build_boot_disk, copy_disk, mounted
from tests.support.images import make_ext4_image
from tests.support.qemu import FIRMWARES, BootResult, boot_emu, boot_qemu
from tests.support.tinykernel import (
    TINY_BOOT,
    TinyKernel,
    install_kernel,
    make_bootable_image,
    tiny_kernel,
)

pytestmark = pytest.mark.slow

#: Room for the kernel (about 14 MiB) and its initramfs in each slot.
SLOT_SIZE = 24 * MIB

#: Slot b's image carries its own boot entry and files, so a test can tell whose entry
#: GRUB used.
SLOT_B_BOOT = BootEntry(
    kernel="/boot/bzImage-b",
    initrd="/boot/initrd-b",
    init="/nix/store/release-b/init",
    params=["console=ttyS0", "entry.test=b", "no_timer_check"],
)

#: Scenarios that differ from others only in the environment GRUB reads run on SeaBIOS
#: alone: each UEFI boot of the real kernel costs about 5 s, and the firmware-specific
#: paths (disk, console, kernel loading, fallback, restart) are covered on both.
BIOS_ONLY = ("bios",)

#: Boot times per scenario, printed at the end of the module (docs/boot.md quotes them).
TIMINGS: list[tuple[str, str, float]] = []


@pytest.fixture(scope="module")
def kernel() -> TinyKernel:
    return tiny_kernel()


@pytest.fixture(scope="module")
def base_disk(tmp_path_factory: pytest.TempPathFactory, kernel: TinyKernel) -> BootDisk:
    work = tmp_path_factory.mktemp("grub-disk")
    slot_a = make_bootable_image(work / "a.img", SLOT_SIZE, kernel, payload_bytes=64 * 1024)
    slot_b = make_bootable_image(
        work / "b.img", SLOT_SIZE, kernel, payload_bytes=64 * 1024, entry=SLOT_B_BOOT
    )
    return build_boot_disk(work / "base.img", slot_a=slot_a, slot_b=slot_b, slot_size=SLOT_SIZE)


@pytest.fixture(scope="module")
def garbage_kernel_slot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slot image whose kernel file exists but is not a kernel."""
    work = tmp_path_factory.mktemp("garbage")
    tree = work / "tree"
    (tree / "boot").mkdir(parents=True)
    (tree / TINY_BOOT.kernel.lstrip("/")).write_bytes(os.urandom(64 * 1024))
    (tree / TINY_BOOT.initrd.lstrip("/")).write_bytes(os.urandom(4096))
    return make_ext4_image(work / "slot.img", 8 * MIB, tree=tree, boot=TINY_BOOT)


@pytest.fixture(scope="module")
def no_kernel_slot(tmp_path_factory: pytest.TempPathFactory, kernel: TinyKernel) -> Path:
    """A slot image whose boot entry names a kernel file that is not there."""
    work = tmp_path_factory.mktemp("no-kernel")
    tree = work / "tree"
    install_kernel(tree, kernel)
    (tree / TINY_BOOT.kernel.lstrip("/")).unlink()
    return make_ext4_image(work / "slot.img", SLOT_SIZE, tree=tree, boot=TINY_BOOT)


@pytest.fixture(scope="module")
def no_initrd_slot(tmp_path_factory: pytest.TempPathFactory, kernel: TinyKernel) -> Path:
    """A slot image with its kernel but without the initrd its boot entry names."""
    work = tmp_path_factory.mktemp("no-initrd")
    tree = work / "tree"
    install_kernel(tree, kernel)
    (tree / TINY_BOOT.initrd.lstrip("/")).unlink()
    return make_ext4_image(work / "slot.img", SLOT_SIZE, tree=tree, boot=TINY_BOOT)


@pytest.fixture
def disk(base_disk: BootDisk, tmp_path: Path) -> BootDisk:
    return copy_disk(base_disk, tmp_path / "disk.img")


@pytest.fixture(scope="module", autouse=True)
def report_timings() -> Iterator[None]:
    yield
    for scenario, firmware, seconds in TIMINGS:
        print(f"boot time {firmware:4} {seconds:5.2f} s  {scenario}")


def boot_and_time(disk: BootDisk, firmware: str, scenario: str) -> BootResult:
    result = boot_qemu(disk.path, firmware)
    TIMINGS.append((scenario, firmware, result.seconds))
    return result


def read_state(disk: BootDisk) -> BootState:
    with boot_control(disk) as control:
        return control.read()


def assert_kernel_from(disk: BootDisk, result: BootResult, slot: Slot, entry: BootEntry) -> None:
    """The kernel that ran came from ``slot``'s partition, at the path its entry names."""
    assert result.boot_image.endswith(f",gpt{disk.layout.slot(slot).number}){entry.kernel}"), (
        result.cmdline
    )


def zero_slot(disk: BootDisk, slot: Slot) -> None:
    """Destroy the slot's file system (as a half-written image would look)."""
    part = disk.layout.slot(slot)
    descriptor = os.open(disk.path, os.O_WRONLY)
    try:
        os.pwrite(descriptor, b"\0" * MIB, part.start)
    finally:
        os.close(descriptor)


def replace_slot(disk: BootDisk, slot: Slot, image: Path) -> None:
    part = disk.layout.slot(slot)
    write_at(disk.path, part.start, image, part.size, sparse=False)


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_fresh_install_boots_committed_slot_a(disk: BootDisk, firmware: str) -> None:
    """A freshly installed disk boots slot a's kernel as committed and records it."""
    result = boot_and_time(disk, firmware, "fresh install")
    assert result.attempts == [("a", "committed")]
    assert result.args == (
        "organixm.slot=a organixm.reason=committed init=/sbin/init console=ttyS0 quiet "
        "no_timer_check"
    )
    assert_kernel_from(disk, result, "a", TINY_BOOT)
    assert result.pauses == 0
    state = read_state(disk)
    assert (state.booted, state.reason, state.trial_try) == ("a", "committed", None)


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_flip_boots_trial_consuming_a_try_then_commit_makes_it_good(
    disk: BootDisk, firmware: str
) -> None:
    """A flip boots the new slot on trial (one try consumed, saved); a commit makes it good."""
    with boot_control(disk) as control:
        control.flip("b", 3)
    result = boot_and_time(disk, firmware, "flip: trial boot")
    assert result.attempts == [("b", "trial")]
    assert result.args == (
        "organixm.slot=b organixm.reason=trial init=/nix/store/release-b/init "
        "console=ttyS0 entry.test=b no_timer_check"
    )
    assert_kernel_from(disk, result, "b", SLOT_B_BOOT)
    with boot_control(disk) as control:
        state = control.read()
        assert state.source == "primary"
        assert state.b == SlotBoot("trial", 2, 1)
        assert (state.booted, state.reason, state.trial_try) == ("b", "trial", 1)
        control.commit("b")
    result = boot_and_time(disk, firmware, "committed after trial")
    assert (result.slot, result.reason) == ("b", "committed")
    state = read_state(disk)
    assert state.order == ("b", "a")
    assert state.b == SlotBoot("good")


@pytest.mark.parametrize("firmware", BIOS_ONLY)
def test_uncommitted_trial_runs_out_of_tries_and_falls_back(disk: BootDisk, firmware: str) -> None:
    """A slot never committed boots its tries, then turns bad and the good slot boots."""
    with boot_control(disk) as control:
        control.initialize("b")
        control.flip("a", 2)
    seen = []
    for n in (1, 2):
        result = boot_and_time(disk, firmware, f"trial try {n}")
        state = read_state(disk)
        seen.append((result.slot, result.reason, state.trial_try, state.a.tries_left))
    assert seen == [("a", "trial", 1, 1), ("a", "trial", 2, 0)]
    result = boot_and_time(disk, firmware, "tries exhausted: fallback")
    assert (result.slot, result.reason) == ("b", "fallback-tries-exhausted")
    state = read_state(disk)
    assert state.a.state == "bad"
    assert state.order == ("b", "a")
    assert (state.booted, state.reason) == ("b", "fallback-tries-exhausted")


@pytest.mark.parametrize("firmware", BIOS_ONLY)
def test_torn_primary_env_boots_from_backup_copy(disk: BootDisk, firmware: str) -> None:
    """A torn primary block boots the slot the backup names, and GRUB records in the backup."""
    with boot_control(disk) as control:
        control.flip("b", 3)
        # Tear the primary in place, as a power cut during GRUB's own save_env would.
        with open(control.primary, "r+b") as handle:
            handle.write(b"\0" * 512)
    result = boot_and_time(disk, firmware, "torn primary env")
    assert (result.slot, result.reason) == ("b", "trial")
    with boot_control(disk) as control:
        state = control.read()
        assert (state.source, state.booted, state.b.tries_left) == ("backup", "b", 2)
        repaired = control.repair("a")
        assert repaired.source == "primary"
        assert grubenv.read(control.primary) == grubenv.read(control.backup)


@pytest.mark.parametrize("firmware", BIOS_ONLY)
def test_missing_env_boots_good_default(disk: BootDisk, firmware: str) -> None:
    """With both environment copies gone the installer's default slot boots, nothing is saved."""
    with boot_control(disk) as control:
        control.primary.unlink()
        control.backup.unlink()
    result = boot_and_time(disk, firmware, "missing env")
    assert (result.slot, result.reason) == ("a", "default-env-unusable")
    with mounted(disk, disk.layout.boot) as root:
        assert sorted(p.name for p in (root / "grub").iterdir()) == ["grub.cfg"]


@pytest.mark.parametrize("firmware", BIOS_ONLY)
def test_unusable_trial_slot_is_skipped_without_consuming_a_try(
    disk: BootDisk, firmware: str
) -> None:
    """A flipped slot whose partition holds no file system is skipped; its tries stay."""
    with boot_control(disk) as control:
        control.flip("b", 3)
    zero_slot(disk, "b")
    result = boot_and_time(disk, firmware, "unusable slot skipped")
    assert result.attempts == [("a", "fallback-unusable")]
    assert result.pauses == 0
    state = read_state(disk)
    assert state.b == SlotBoot("trial", 3, 0)
    assert (state.booted, state.reason) == ("a", "fallback-unusable")


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_slot_whose_kernel_is_missing_is_skipped_without_consuming_a_try(
    disk: BootDisk, no_kernel_slot: Path, firmware: str
) -> None:
    """A trial slot whose boot entry names a missing kernel is skipped at the probe: the
    other slot's kernel boots at once (no menu fallback, no pause) and no try is used."""
    replace_slot(disk, "b", no_kernel_slot)
    with boot_control(disk) as control:
        control.flip("b", 3)
    result = boot_and_time(disk, firmware, "kernel missing: skipped")
    assert result.attempts == [("a", "fallback-unusable")]
    assert_kernel_from(disk, result, "a", TINY_BOOT)
    assert "Falling back to" not in result.output
    assert result.pauses == 0
    state = read_state(disk)
    assert state.b == SlotBoot("trial", 3, 0)
    assert (state.booted, state.reason) == ("a", "fallback-unusable")


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_kernel_that_fails_to_load_falls_back_to_other_slot(
    disk: BootDisk, garbage_kernel_slot: Path, firmware: str
) -> None:
    """A trial slot whose kernel does not load falls back to the other slot via the menu."""
    replace_slot(disk, "b", garbage_kernel_slot)
    with boot_control(disk) as control:
        control.flip("b", 3)
    result = boot_and_time(disk, firmware, "kernel fails to load: fallback")
    assert result.attempts == [("b", "trial"), ("a", "fallback-load-failed")]
    assert_kernel_from(disk, result, "a", TINY_BOOT)
    assert "Falling back to" in result.output
    state = read_state(disk)
    assert (state.booted, state.reason) == ("a", "fallback-load-failed")
    assert state.b == SlotBoot("trial", 2, 1)


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_both_slots_bad_boots_last_resort_never_a_menu(disk: BootDisk, firmware: str) -> None:
    """With both slots bad a usable one still boots as last resort; with none, GRUB says so
    and restarts (QEMU runs with -no-reboot, so the restart ends it)."""
    with boot_control(disk) as control:
        control.mark_bad("a")
        control.mark_bad("b")
    result = boot_and_time(disk, firmware, "both bad: last resort")
    assert (result.slot, result.reason) == ("a", "last-resort")
    zero_slot(disk, "a")
    zero_slot(disk, "b")
    result = boot_and_time(disk, firmware, "no usable slot")
    assert (result.no_slot, result.attempts, result.cmdline) == (True, [], None)
    assert "organixm: restarting in 60 s" in result.output
    assert read_state(disk).reason == "no-usable-slot"


# ---------------------------------------------------------------------------- grub-emu

SLOT_STATES = [
    SlotBoot("good"),
    SlotBoot("trial", 2, 0),
    SlotBoot("trial", 1, 1),
    SlotBoot("trial", 0, 2),
    SlotBoot("bad"),
]


def _env_offset(disk: BootDisk, tmp_path: Path) -> int:
    """Byte offset of the primary grubenv's data block inside the disk image."""
    image = tmp_path / "boot-part.img"
    with open(disk.path, "rb") as source, open(image, "wb") as target:
        source.seek(disk.layout.boot.start)
        target.write(source.read(disk.layout.boot.size))

    def debugfs(request: str) -> str:
        return subprocess.run(
            ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
        ).stdout

    block = int(debugfs("bmap /grub/grubenv 0").split()[0])
    block_size = int(re.search(r"Block size:\s+(\d+)", debugfs("stats")).group(1))  # type: ignore[union-attr]
    return disk.layout.boot.start + block * block_size


def test_grub_emu_matches_predicted_decision_for_every_state(
    disk: BootDisk, tmp_path: Path
) -> None:
    """For every slot state, order and usability GRUB decides and saves what predict_boot says."""
    block_offset = _env_offset(disk, tmp_path)
    slot_a = disk.layout.slot_a
    slot_b = disk.layout.slot_b
    heads = {}
    with open(disk.path, "rb") as handle:
        for part in (slot_a, slot_b):
            handle.seek(part.start)
            heads[part.number] = handle.read(MIB)
    checked = 0
    descriptor = os.open(disk.path, os.O_RDWR)
    try:
        for state_a, state_b, order, usable_a, usable_b in itertools.product(
            SLOT_STATES, SLOT_STATES, [("a", "b"), ("b", "a")], [True, False], [True, False]
        ):
            if not (usable_a or usable_b) and checked % 3:
                continue
            state = BootState(order=order, a=state_a, b=state_b)  # type: ignore[arg-type]
            os.pwrite(descriptor, grubenv.render(boot.env_from_state(state)), block_offset)
            for part, usable in ((slot_a, usable_a), (slot_b, usable_b)):
                os.pwrite(descriptor, heads[part.number] if usable else b"\0" * MIB, part.start)
            expected = boot.predict_boot(state, {"a": usable_a, "b": usable_b})
            result = boot_emu(disk.path, tmp_path, disk.layout.boot.number)
            saved = boot.state_from_env(grubenv.parse(os.pread(descriptor, 1024, block_offset)))
            context = f"{state} usable a={usable_a} b={usable_b}: {result.attempts}"
            if expected.slot is None:
                assert result.slot == "none", context
            else:
                assert (result.slot, result.reason) == (expected.slot, expected.reason), context
            assert saved == expected.after, context
            checked += 1
    finally:
        os.close(descriptor)
    assert checked > 150


def test_grub_emu_malformed_tries_count_as_last_try(disk: BootDisk, tmp_path: Path) -> None:
    """A tries value that is not a string of x allows one more boot, never an endless trial."""
    block_offset = _env_offset(disk, tmp_path)
    variables = boot.env_from_state(boot.flipped(boot.initial("a"), "b", 3, booted="a"))
    variables["organixm_b_tries"] = "3"
    descriptor = os.open(disk.path, os.O_RDWR)
    try:
        os.pwrite(descriptor, grubenv.render(variables), block_offset)
        first = boot_emu(disk.path, tmp_path, disk.layout.boot.number)
        saved = boot.state_from_env(grubenv.parse(os.pread(descriptor, 1024, block_offset)))
        second = boot_emu(disk.path, tmp_path, disk.layout.boot.number)
    finally:
        os.close(descriptor)
    assert (first.slot, first.reason, saved.b.tries_left) == ("b", "trial", 0)
    assert (second.slot, second.reason) == ("a", "fallback-tries-exhausted")


def test_grub_emu_slot_without_its_initrd_is_skipped_without_a_pause(
    disk: BootDisk, no_initrd_slot: Path, tmp_path: Path
) -> None:
    """A slot whose initrd is missing is not booted half-way: the probe skips it, the
    other slot boots, no pause, and no try is used."""
    replace_slot(disk, "b", no_initrd_slot)
    with boot_control(disk) as control:
        control.flip("b", 3)
    result = boot_emu(disk.path, tmp_path, disk.layout.boot.number)
    assert result.attempts == [("a", "fallback-unusable")]
    assert result.pauses == 0
    assert read_state(disk).b == SlotBoot("trial", 3, 0)


def test_grub_emu_trial_whose_try_cannot_be_saved_is_not_started(
    disk: BootDisk, tmp_path: Path
) -> None:
    """A primary block whose padding a power cut zeroed still loads, but GRUB cannot save
    into it: the trial is not started (it could never use up its tries), the committed
    slot boots, and once the daemon repairs the block the trial runs, consuming a try."""
    block_offset = _env_offset(disk, tmp_path)
    block = grubenv.render(boot.env_from_state(boot.flipped(boot.initial("a"), "b", 3, booted="a")))
    cut = len(block.rstrip(b"#")) + 16
    torn = block[:cut] + b"\0" * (len(block) - cut)
    assert grubenv.parse(torn) == grubenv.parse(block)
    descriptor = os.open(disk.path, os.O_RDWR)
    try:
        os.pwrite(descriptor, torn, block_offset)
        first = boot_emu(disk.path, tmp_path, disk.layout.boot.number)
        assert (first.slot, first.reason) == ("a", "trial-unsaved"), first.attempts
        assert os.pread(descriptor, 1024, block_offset) == torn
    finally:
        os.close(descriptor)
    with boot_control(disk) as control:
        assert not control.intact()
        control.repair("a")
        assert control.intact()
    second = boot_emu(disk.path, tmp_path, disk.layout.boot.number)
    assert (second.slot, second.reason) == ("b", "trial")
    assert read_state(disk).b.tries_left == 2
