"""A real Debian guest updates itself across real reboots (QEMU TCG, BIOS, the project's GRUB).

One disk, one boot sequence; each test continues where the one before left it.
Scenario 1: committed slot a finds 2.0 on a USB stick (a second virtual disk),
installs it, flips and reboots; slot b boots on trial and is committed through
boot-complete.target; a service ordered After=organixm-update.service starts only
after READY. Scenario 2: 3.0's success unit fails, mark-bad reboots, b (2.0) boots
again and 3.0 is refused as failed before. Scenario 4: 4.0's root cannot be mounted
(its superblock is damaged after it was verified): the initrd reboots, the try is
used up, GRUB falls back to b. Scenario 3: 5.0's success unit never returns and the
machine loses power before any commit: GRUB falls back once the tries are used up and
the daemon refuses 5.0 as failed before. Asserted from inside (report lines and the
daemon's journal on the serial console) and from outside (grubenv, the state file
and the persistent journal read from the disk image between boots).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.e2e import harness
from tests.e2e.harness import R1, R2, R3, R4, R5, Machine, Releases

pytestmark = pytest.mark.e2e


def _usec(units: dict[str, Any], unit: str, prop: str) -> int:
    return int(units[unit][prop])


@pytest.fixture(scope="module")
def bios(e2e_work: Any, releases: Releases) -> Machine:
    return Machine("bios", e2e_work, "bios", releases[R1])


def test_update_trial_commit_bios(bios: Machine, releases: Releases) -> None:
    """Scenario 1: slot a installs 2.0 from the stick, b boots on trial and commits."""
    started = time.monotonic()
    stick = releases[R2]

    # Boot 1: slot a (1.0) installs 2.0 into b before READY, flips and reboots.
    one = bios.boot(stick)
    assert "organixm: booting slot a (committed)" in one.serial
    assert one.end == "reboot", one.serial[-4000:]
    assert harness.said(one.serial, "flipped"), "the daemon's flip is not on the serial console"
    state = bios.boot_state()
    assert state.order == ("b", "a")
    assert state.b.state == "trial"
    assert state.b.tries_left == R1.trial_boots

    # Boot 2: b on trial, the success unit passes, mark-good commits, the report powers off.
    two = bios.boot(stick)
    assert "organixm: booting slot b (trial)" in two.serial
    assert two.end == "poweroff", two.serial[-4000:]
    report = two.report
    status = report["status"]
    assert status is not None, report
    assert status["boot"]["booted"] == "b"
    assert status["boot"]["reason"] == "trial"
    units = report["units"]
    assert units["organixm-mark-good.service"]["Result"] == "success"
    ready = _usec(units, "organixm-update.service", "ActiveEnterTimestampMonotonic")
    daemon_start = _usec(units, "organixm-update.service", "ExecMainStartTimestampMonotonic")
    after = _usec(units, "e2e-after.service", "ExecMainStartTimestampMonotonic")
    assert after >= ready > daemon_start
    print(f"organixmd start to READY inside the guest: {(ready - daemon_start) / 1e6:.1f} s")
    state = bios.boot_state()
    assert state.b.state == "good"
    assert state.order == ("b", "a")
    assert state.booted == "b"
    assert state.reason == "trial"

    journal = bios.journal()
    assert harness.events(journal, "ready"), "no 'ready' line of organixmd in the journal"
    assert harness.events(journal, "committed"), "no 'committed' line of organixmd"
    bios.passed.append("1")
    print(f"scenario 1 (BIOS) {time.monotonic() - started:.0f} s")


def test_failed_success_unit_falls_back(bios: Machine, releases: Releases) -> None:
    """Scenario 2: 3.0's success unit fails: mark-bad, reboot, b (2.0), never reinstalled."""
    bios.require("1")
    started = time.monotonic()
    stick = releases[R3]
    three = bios.boot(stick)
    assert "organixm: booting slot b (committed)" in three.serial
    assert three.end == "reboot", three.serial[-4000:]
    assert bios.boot_state().a.state == "trial"
    four = bios.boot(stick)
    assert "organixm: booting slot a (trial)" in four.serial
    assert "E2E-SUCCESS fail" in four.serial
    assert harness.said(four.serial, "marked_bad")
    assert four.end == "reboot", four.serial[-4000:]
    state = bios.boot_state()
    assert state.a.state == "bad"
    assert state.order == ("b", "a")
    five = bios.boot(stick)
    assert "organixm: booting slot b (committed)" in five.serial
    assert five.end == "poweroff", five.serial[-4000:]
    status = five.report["status"]
    assert status["boot"]["booted"] == "b"
    assert status["verdict"]["code"] == "release-failed-before", status["verdict"]
    assert status["failed_releases"] >= 1
    assert bios.boot_state().a.state == "bad"
    assert "3.0" in harness.failed_versions(bios.state())
    bios.passed.append("2")
    print(f"scenario 2 (BIOS) {time.monotonic() - started:.0f} s")


def test_unmountable_root_falls_back(bios: Machine, releases: Releases) -> None:
    """Scenario 4: 4.0 is damaged after it was verified; the initrd reboots, GRUB falls back."""
    bios.require("2")
    started = time.monotonic()
    stick = releases[R4]
    six = bios.boot(stick)
    assert "organixm: booting slot b (committed)" in six.serial
    assert six.end == "reboot", six.serial[-4000:]
    state = bios.boot_state()
    assert (state.a.state, state.a.tries_left, state.order) == ("trial", 1, ("a", "b"))
    # The slot was written and read back by the daemon; now its root cannot be mounted.
    harness.damage_superblock_checksum(bios.disk, "a")

    seven = bios.boot(stick)
    assert "organixm: booting slot a (trial)" in seven.serial
    assert "invalid superblock checksum" in seven.serial, seven.serial[-4000:]
    # The hook's panic=10 (4.0 has no panic= of its own): a reboot, never a shell or a halt.
    assert "Rebooting automatically due to panic= boot argument" in seven.serial
    assert seven.end == "reboot", seven.serial[-4000:]
    state = bios.boot_state()
    assert (state.a.state, state.a.tries_left, state.a.tries_used) == ("trial", 0, 1)

    # The next boot: GRUB finds no try left, falls back to b; its daemon records 4.0
    # as failed and installs 5.0 (the stick's release of scenario 3) into a.
    eight = bios.boot(releases[R5])
    assert "organixm: booting slot b (fallback-tries-exhausted)" in eight.serial
    assert [line for line in harness.said(eight.serial, "fell_back") if "version=4.0" in line]
    assert eight.end == "reboot", eight.serial[-4000:]
    assert harness.failed_versions(bios.state())["4.0"] == "fallback-tries-exhausted"
    fell_back = harness.events(bios.journal(), "fell_back")
    assert any(entry.get("VERSION") == "4.0" for entry in fell_back), fell_back
    bios.passed.append("4")
    print(f"scenario 4 (BIOS) {time.monotonic() - started:.0f} s")


def test_hanging_release_grub_falls_back(bios: Machine, releases: Releases) -> None:
    """Scenario 3: 5.0 hangs before its success unit returns; GRUB falls back by itself."""
    bios.require("4")
    started = time.monotonic()
    stick = releases[R5]
    state = bios.boot_state()
    assert (state.a.state, state.a.tries_left, state.order) == ("trial", 1, ("a", "b"))

    # 5.0's success unit blocks; the machine loses power before any commit.
    nine = bios.boot(stick, kill_when=lambda serial: "E2E-SUCCESS hang" in serial)
    assert "organixm: booting slot a (trial)" in nine.serial
    assert nine.end == "killed", nine.serial[-4000:]
    assert not harness.said(nine.serial, "marked_bad")
    assert not harness.said(nine.serial, "committed")
    state = bios.boot_state()
    assert (state.a.state, state.a.tries_left) == ("trial", 0)

    ten = bios.boot(stick)
    assert "organixm: booting slot b (fallback-tries-exhausted)" in ten.serial
    assert ten.end == "poweroff", ten.serial[-4000:]
    status = ten.report["status"]
    assert status["boot"]["booted"] == "b"
    assert status["boot"]["reason"] == "fallback-tries-exhausted"
    assert status["verdict"]["code"] == "release-failed-before", status["verdict"]
    state = bios.boot_state()
    assert (state.a.state, state.order) == ("bad", ("b", "a"))
    assert harness.failed_versions(bios.state())["5.0"] == "fallback-tries-exhausted"
    marked = harness.events(bios.journal(), "marked_bad")
    assert not [entry for entry in marked if entry.get("VERSION") == "5.0"], marked
    bios.passed.append("3")
    print(f"scenario 3 (BIOS) {time.monotonic() - started:.0f} s")
