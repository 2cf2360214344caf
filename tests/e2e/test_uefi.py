"""Power cuts, and the update cycle under UEFI (OVMF): one disk provisioned for UEFI.

Scenario 5: the machine loses power (QEMU killed) in the middle of the install of
2.0; the next boot resumes the download from its checkpoint and flips. Scenario 6:
power is cut again during b's first trial boot; the try is used up (grubenv), and
the second try commits. Scenario 7: the whole install -> trial -> commit cycle of
scenario 1 under UEFI, with the service ordered after READY.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from tests.e2e import harness
from tests.e2e.harness import R1, R2, Machine, Releases

pytestmark = pytest.mark.e2e

#: systemd's console line as it starts organixm-update.service (colour codes between).
STARTING_DAEMON = re.compile(r"Starting \S*organixm-update\.s")


@pytest.fixture(scope="module")
def uefi(e2e_work: Any, releases: Releases) -> Machine:
    return Machine("uefi", e2e_work, "uefi", releases[R1])


def test_power_cut_during_download_resumes_uefi(uefi: Machine, releases: Releases) -> None:
    """Scenario 5: killed half-way through the download, the next boot resumes and flips."""
    started = time.monotonic()
    stick = releases[R2]
    # Power is cut once the guest has written half of 2.0 into slot b (seen on the disk).
    one = uefi.boot(stick, kill_when=harness.SlotFilled(uefi.disk, "b", stick.probe))
    assert "organixm: booting slot a (committed)" in one.serial
    assert one.end == "killed", one.serial[-4000:]
    progress = uefi.state()["progress"]
    assert progress is not None, "no checkpoint in the state file after the power cut"
    assert progress["slot"] == "b", progress
    assert progress["release"]["version"] == "2.0", progress
    checkpoint = progress["chunks_done"]
    assert checkpoint > 0, progress
    state = uefi.boot_state()
    assert (state.order, state.b.state) == (("a", "b"), "bad"), state

    two = uefi.boot(stick)
    assert "organixm: booting slot a (committed)" in two.serial
    assert two.end == "reboot", two.serial[-4000:]
    done = harness.said(two.serial, "install_done")
    assert done, two.serial[-4000:]
    resumed = int(re.search(r"resumed_from=(\d+)", done[0])[1])  # type: ignore[index]
    assert resumed == checkpoint, done
    history = [(item["event"], item["detail"]) for item in uefi.state()["history"]]
    assert ("install-started", "chunk 0") in history, history
    assert ("install-started", f"chunk {checkpoint}") in history, history
    assert any(
        e == "installed" and re.search(rf"resumed at chunk {checkpoint}(;|$)", d)
        for e, d in history
    ), history
    state = uefi.boot_state()
    assert (state.order, state.b.state, state.b.tries_left) == (("b", "a"), "trial", 2)
    uefi.passed.append("5")
    print(f"scenario 5 (UEFI, resumed at chunk {checkpoint}) {time.monotonic() - started:.0f} s")


def test_power_cut_during_trial_then_commit_uefi(uefi: Machine, releases: Releases) -> None:
    """Scenarios 6 and 7: power cut during b's first trial; the second try commits."""
    uefi.require("5")
    started = time.monotonic()
    stick = releases[R2]
    # Power is cut once b's systemd starts the update daemon, before anything commits.
    three = uefi.boot(stick, kill_when=lambda serial: STARTING_DAEMON.search(serial) is not None)
    assert "organixm: booting slot b (trial)" in three.serial
    assert "organixm.slot=b organixm.reason=trial" in three.serial
    assert three.end == "killed", three.serial[-4000:]
    assert not harness.said(three.serial, "committed")
    state = uefi.boot_state()
    assert (state.b.state, state.b.tries_left, state.b.tries_used) == ("trial", 1, 1), state
    assert (state.booted, state.reason) == ("b", "trial")

    four = uefi.boot(stick)
    assert "organixm: booting slot b (trial)" in four.serial
    assert four.end == "poweroff", four.serial[-4000:]
    report = four.report
    status = report["status"]
    assert status is not None, report
    assert (status["boot"]["booted"], status["boot"]["reason"]) == ("b", "trial")
    units = report["units"]
    assert units["organixm-mark-good.service"]["Result"] == "success"
    ready = int(units["organixm-update.service"]["ActiveEnterTimestampMonotonic"])
    start = int(units["organixm-update.service"]["ExecMainStartTimestampMonotonic"])
    after = int(units["e2e-after.service"]["ExecMainStartTimestampMonotonic"])
    assert after >= ready > start
    print(f"organixmd start to READY inside the guest (UEFI): {(ready - start) / 1e6:.1f} s")
    state = uefi.boot_state()
    assert (state.b.state, state.order, state.booted, state.trial_try) == (
        "good",
        ("b", "a"),
        "b",
        2,
    )
    assert harness.said(four.serial, "committed")
    uefi.passed.append("6")
    print(f"scenarios 6 and 7 (UEFI) {time.monotonic() - started:.0f} s")
