"""Reboot policy and the commit deadline, with the real daemon and a reboot command it runs."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from organixmd.base.config import parse_config
from organixmd.boot import grubenv
from organixmd.host.bootmanager import Reboot
from tests.support.daemon import DaemonProcess, Host, make_images, prepare_host, request
from tests.support.releases import build_release


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("images"), 2)


@pytest.fixture
def host(tmp_path: Path, images: list[Path]) -> Iterator[Host]:
    """A host on slot a with 1.0; 2.0 is published; reboots touch a marker file."""
    release = build_release(images[0], tmp_path / "pub", version="1.0", serial=1)
    marker = tmp_path / "rebooted"
    host = prepare_host(
        tmp_path / "host", release.url, installed=images[0], reboot_command=("touch", str(marker))
    )
    build_release(images[1], tmp_path / "pub", version="2.0", serial=2)
    try:
        yield host
    finally:
        host.cleanup()


def set_boot(host: Host, **settings: object) -> None:
    """Add ``[boot]`` settings to the host's configuration."""
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
    host.config.write_text(host.config.read_text().replace("[boot]\n", "[boot]\n" + lines))


def wait_for(path: Path, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def test_reboot_immediately_after_staging(host: Host) -> None:
    """reboot = "immediately": the reboot command runs once the release is staged."""
    set_boot(host, reboot="immediately")
    marker = host.root.parent / "rebooted"
    with DaemonProcess(host).start() as daemon:
        status = daemon.wait_ready()
        assert status["verdict"]["code"] == "staged"
        assert wait_for(marker), daemon.output()
        assert daemon.stop() == 0
    assert host.boot_state().next_slot == "b"


def test_reboot_never_leaves_it_to_the_admin(host: Host) -> None:
    """reboot = "never" (the default): staged, the reboot is pending, nothing runs."""
    marker = host.root.parent / "rebooted"
    with DaemonProcess(host).start() as daemon:
        status = daemon.wait_ready()
        assert status["verdict"]["code"] == "staged"
        assert status["reboot_pending"] == "2.0 staged"
        assert daemon.stop() == 0
    assert not marker.exists()


def test_trial_not_committed_by_the_deadline_is_marked_bad(host: Host) -> None:
    """A trial boot nobody commits is marked bad at the deadline, its release remembered as
    failed, and the machine rebooted into the old slot."""
    with DaemonProcess(host).start() as daemon:
        assert daemon.wait_ready()["verdict"]["code"] == "staged"
        assert daemon.stop() == 0
    assert host.reboot().slot == "b"
    set_boot(host, reboot="immediately", commit_deadline=1)
    marker = host.root.parent / "rebooted"
    with DaemonProcess(host).start() as daemon:
        assert wait_for(marker), daemon.output()
        state = host.boot_state()
        assert state.b.state == "bad"
        assert state.next_slot == "a"
        failed = host.state()["failed"]
        assert [f["release"]["version"] for f in failed] == ["2.0"]
        assert failed[0]["reason"] == "not committed within 1s of boot"
        assert daemon.stop() == 0
    assert host.reboot().slot == "a"


def test_deadline_counts_from_boot_not_from_daemon_start(host: Host) -> None:
    """A daemon (re)started 700 s into a trial boot with a 600 s deadline marks it bad at
    once: restarting the daemon does not buy a stuck trial another deadline."""
    with DaemonProcess(host).start() as daemon:
        assert daemon.wait_ready()["verdict"]["code"] == "staged"
        assert daemon.stop() == 0
    assert host.reboot().slot == "b"
    host.uptime.write_text("700.25 1300.50\n")
    set_boot(host, reboot="immediately", commit_deadline=600)
    marker = host.root.parent / "rebooted"
    with DaemonProcess(host).start() as daemon:
        assert wait_for(marker), daemon.output()
        assert host.boot_state().b.state == "bad"
        failed = host.state()["failed"]
        assert failed[0]["reason"] == "not committed within 600s of boot"
        assert daemon.stop() == 0


def test_committed_trial_is_not_touched_by_the_deadline(host: Host) -> None:
    """A trial committed in time stays good after the deadline passes."""
    with DaemonProcess(host).start() as daemon:
        daemon.wait_ready()
        assert daemon.stop() == 0
    host.reboot()
    host.boot_control().commit("b")
    set_boot(host, reboot="immediately", commit_deadline=1)
    marker = host.root.parent / "rebooted"
    with DaemonProcess(host).start() as daemon:
        daemon.wait_ready()
        time.sleep(2)
        assert host.boot_state().b.state == "good"
        assert not marker.exists()
        assert daemon.stop() == 0


def _window_policy(window: str) -> Reboot:
    config = parse_config(
        f"""
[source]
url = "file:///srv/releases/host"
[boot]
reboot = "window"
maintenance_window = "{window}"
reboot_command = ["true"]
"""
    )
    return Reboot(config.boot)


def test_maintenance_window_bounds() -> None:
    """Inside, outside and across midnight, and the wait until the window opens."""
    night = _window_policy("23:30-02:00")
    assert night.in_window(datetime(2026, 1, 5, 23, 45))
    assert night.in_window(datetime(2026, 1, 6, 1, 59))
    assert not night.in_window(datetime(2026, 1, 6, 2, 0))
    assert not night.in_window(datetime(2026, 1, 6, 12, 0))
    assert night.seconds_until_window(datetime(2026, 1, 6, 12, 0)) == 11.5 * 3600
    day = _window_policy("02:00-04:00")
    assert day.in_window(datetime(2026, 1, 6, 3, 0))
    assert day.seconds_until_window(datetime(2026, 1, 6, 3, 0)) == 0
    assert day.seconds_until_window(datetime(2026, 1, 6, 5, 0)) == 21 * 3600


async def test_window_policy_defers_outside_the_window() -> None:
    """Outside the window a reboot request is remembered, not run."""
    policy = _window_policy("00:00-00:01")
    now = datetime.now()
    if policy.in_window(now):
        policy = _window_policy("12:00-12:01")
    assert await policy.request("2.0 staged") is False
    assert policy.pending == "2.0 staged"


def test_deadline_with_a_failing_reboot_command_keeps_the_daemon_running(
    tmp_path: Path, images: list[Path]
) -> None:
    """A reboot command that fails inside the deadline watcher is logged, not fatal: the
    slot is marked bad, the daemon keeps answering, and the reboot stays pending."""
    release = build_release(images[0], tmp_path / "pub", version="1.0", serial=1)
    host = prepare_host(
        tmp_path / "host", release.url, installed=images[0], reboot_command=("false",)
    )
    build_release(images[1], tmp_path / "pub", version="2.0", serial=2)
    try:
        with DaemonProcess(host).start() as daemon:
            daemon.wait_ready()
            assert daemon.stop() == 0
        assert host.reboot().slot == "b"
        set_boot(host, reboot="immediately", commit_deadline=1)
        with DaemonProcess(host).start() as daemon:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and host.boot_state().b.state != "bad":
                time.sleep(0.05)
            assert host.boot_state().b.state == "bad"
            while time.monotonic() < deadline and "reboot_failed" not in daemon.output():
                time.sleep(0.05)
            status = daemon.wait_ready()
            assert status["reboot_pending"] == "trial deadline passed"
            assert "reboot_failed" in daemon.output()
            assert "Traceback" not in daemon.output()
            assert daemon.stop() == 0
    finally:
        host.cleanup()


def test_missing_boot_partition_is_reported_and_nothing_is_written(
    tmp_path: Path, images: list[Path]
) -> None:
    """With the GRUB environment's directory absent (boot partition not mounted) the daemon
    starts, gets ready, says why in status, and writes no slot and no environment."""
    release = build_release(images[0], tmp_path / "pub", version="1.0", serial=1)
    host = prepare_host(tmp_path / "host", release.url, installed=images[0])
    build_release(images[1], tmp_path / "pub", version="2.0", serial=2)
    boot_dir = host.grubenv.parent
    boot_dir.rename(boot_dir.with_name("boot-unmounted"))
    slot_b = host.slots["b"].read_bytes()
    try:
        with DaemonProcess(host).start() as daemon:
            status = daemon.wait_ready()
            assert "is the boot partition mounted?" in status["boot"]["explanation"]
            assert status["verdict"]["outcome"] == "error", status["verdict"]
            assert status["verdict"]["code"] == "boot-control-error"
            assert "Traceback" not in daemon.output()
            assert daemon.stop() == 0
        assert not boot_dir.exists()
        assert host.slots["b"].read_bytes() == slot_b
    finally:
        host.cleanup()


def test_floor_in_the_grub_env_refuses_a_downgrade_after_the_state_is_lost(
    host: Host, images: list[Path]
) -> None:
    """Committing 2.0 raises organixm_floor to 2 in the GRUB env; with /var (the state file)
    lost and 1.0 published again, the daemon refuses it instead of installing it."""
    with DaemonProcess(host).start() as daemon:
        assert daemon.wait_ready()["verdict"]["code"] == "staged"
        assert daemon.stop() == 0
    assert host.reboot().slot == "b"
    with DaemonProcess(host).start() as daemon:
        daemon.wait_ready()
        answer = request(host.socket, "POST", "/v1/mark-good", b"{}")
        assert answer.status == 200, answer.body
        assert daemon.stop() == 0
    assert host.boot_state().floor == 2
    shutil.rmtree(host.state_dir)
    pub = host.root.parent / "pub"
    build_release(images[0], pub, version="1.0", serial=1)
    before = host.grubenv.read_bytes()
    with DaemonProcess(host).start() as daemon:
        verdict = daemon.wait_ready()["verdict"]
        assert verdict["code"] == "downgrade-refused", verdict
        assert "floor 2" in verdict["message"]
        assert daemon.stop() == 0
    after = host.boot_state()
    assert (after.order, after.a.state, after.b.state) == (("b", "a"), "good", "good")
    assert host.grubenv.read_bytes() == before


def test_floor_is_restored_from_the_committed_release_at_start(host: Host) -> None:
    """A host committed before the floor existed (organixm_floor absent) gets it at start."""
    with DaemonProcess(host).start() as daemon:
        daemon.wait_ready()
        assert daemon.stop() == 0
    assert host.reboot().slot == "b"
    host.boot_control().commit("b")
    for path in (host.grubenv, host.grubenv_backup):
        variables = grubenv.read(path)
        del variables["organixm_floor"]
        grubenv.write_block(path, grubenv.render(variables))
    assert host.boot_state().floor == 0
    with DaemonProcess(host).start() as daemon:
        daemon.wait_ready()
        assert daemon.stop() == 0
    assert host.boot_state().floor == 2


def test_daemon_rewrites_a_block_whose_padding_was_torn(host: Host) -> None:
    """A primary block that parses but lost its # padding (GRUB could not save into it) is
    rewritten whole at start, so GRUB's next save_env works again."""
    block = host.grubenv.read_bytes()
    cut = len(block.rstrip(b"#")) + 16
    torn = block[:cut] + b"\0" * (len(block) - cut)
    host.grubenv.write_bytes(torn)
    assert not host.boot_control().intact()
    with DaemonProcess(host).start() as daemon:
        daemon.wait_ready()
        assert daemon.stop() == 0
        assert "padding is torn" in daemon.output()
    assert grubenv.is_canonical(host.grubenv.read_bytes())
    assert host.boot_control().intact()
