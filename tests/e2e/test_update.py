"""A real Debian guest updates itself across real reboots (QEMU TCG, the project's GRUB).

One boot sequence on one disk. Scenario 1: committed slot a finds 2.0 on a USB
stick (a second virtual disk), installs it, flips and reboots; slot b boots on
trial and is committed through boot-complete.target; a service ordered
After=organixm-update.service starts only after READY. Scenario 2: 3.0's success
unit fails, mark-bad reboots, b (2.0) boots again and 3.0 is refused as failed
before. Asserted from inside (report lines on the serial console) and from
outside (grubenv and the persistent journal read from the disk image).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import harness
from tests.e2e.harness import Release

pytestmark = pytest.mark.e2e

R1 = Release("1.0", 1)
R2 = Release("2.0", 2)
R3 = Release("3.0", 3, behaviour="fail")


def _usec(units: dict[str, Any], unit: str, prop: str) -> int:
    return int(units[unit][prop])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


def test_update_trial_commit_bios(work: Path) -> None:
    """Slot a installs 2.0 from the stick, b boots on trial and commits after boot-complete."""
    started = time.monotonic()
    tree = harness.guest_tree(work)
    images = work / "images"
    images.mkdir()
    first = work / "first"
    stick_dir = work / "stick"
    img1 = harness.build_release_image(tree, R1, images / "r1.img")
    meta1 = harness.publish(img1, R1, first)
    img2 = harness.build_release_image(tree, R2, images / "r2.img")
    harness.publish(img2, R2, stick_dir)
    stick = harness.make_stick(stick_dir, work / "stick.img")
    disk = work / "disk.img"
    harness.provision(disk, meta1, "bios")
    shutil.rmtree(images)
    prepared = time.monotonic() - started
    print(f"prepared guest, releases and disk in {prepared:.0f} s")

    # Boot 1: slot a (1.0) installs 2.0 into b before READY, flips and reboots.
    one = harness.boot(disk, stick, work / "boot1.log")
    print(f"boot 1: {one.end} after {one.seconds:.0f} s; {one.grub_line()}")
    assert "organixm: booting slot a (committed)" in one.serial
    assert one.end == "reboot", one.serial[-4000:]
    state = harness.read_boot_state(disk)
    assert state.order == ("b", "a")
    assert state.b.state == "trial"
    assert state.b.tries_left == R1.trial_boots

    # Boot 2: b on trial, the success unit passes, mark-good commits, the report powers off.
    two = harness.boot(disk, stick, work / "boot2.log")
    print(f"boot 2: {two.end} after {two.seconds:.0f} s; {two.grub_line()}")
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
    state = harness.read_boot_state(disk)
    assert state.b.state == "good"
    assert state.order == ("b", "a")
    assert state.booted == "b"
    assert state.reason == "trial"

    journal = harness.read_journal(disk)
    ready_lines = [
        entry
        for entry in journal
        if entry.get("SYSLOG_IDENTIFIER") == "organixmd" and "ready" in entry.get("MESSAGE", "")
    ]
    assert ready_lines, "no 'ready' line of organixmd in the guest's journal"
    print(f"scenario 1 (BIOS) total {time.monotonic() - started:.0f} s")

    # Scenario 2: 3.0's success unit fails: mark-bad, reboot, b (2.0) again, never reinstalled.
    started = time.monotonic()
    images.mkdir()
    img3 = harness.build_release_image(tree, R3, images / "r3.img")
    harness.publish(img3, R3, stick_dir)
    shutil.rmtree(images)
    stick = harness.make_stick(stick_dir, work / "stick.img")
    three = harness.boot(disk, stick, work / "boot3.log")
    print(f"boot 3: {three.end} after {three.seconds:.0f} s; {three.grub_line()}")
    assert "organixm: booting slot b (committed)" in three.serial
    assert three.end == "reboot", three.serial[-4000:]
    assert harness.read_boot_state(disk).a.state == "trial"
    four = harness.boot(disk, stick, work / "boot4.log")
    print(f"boot 4: {four.end} after {four.seconds:.0f} s; {four.grub_line()}")
    assert "organixm: booting slot a (trial)" in four.serial
    assert "E2E-SUCCESS fail" in four.serial
    assert four.end == "reboot", four.serial[-4000:]
    state = harness.read_boot_state(disk)
    assert state.a.state == "bad"
    assert state.order == ("b", "a")
    five = harness.boot(disk, stick, work / "boot5.log")
    print(f"boot 5: {five.end} after {five.seconds:.0f} s; {five.grub_line()}")
    assert "organixm: booting slot b (committed)" in five.serial
    assert five.end == "poweroff", five.serial[-4000:]
    status = five.report["status"]
    assert status["boot"]["booted"] == "b"
    assert status["verdict"]["code"] == "release-failed-before", status["verdict"]
    assert status["failed_releases"] >= 1
    assert harness.read_boot_state(disk).a.state == "bad"
    print(f"scenario 2 (BIOS) total {time.monotonic() - started:.0f} s")
