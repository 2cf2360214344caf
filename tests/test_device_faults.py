"""Device faults found by the fault suite's device rows (tests/faults/test_devices.py),
each reproduced here against the real daemon first."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.faults.test_devices import fill, tmpfs
from tests.support.daemon import DaemonProcess, make_images, organixctl, prepare_host, request
from tests.support.releases import build_release


def test_full_state_directory_at_a_check_is_a_verdict_and_the_daemon_stays(
    tmp_path: Path,
) -> None:
    """A check whose state file cannot be written (its file system is full) ends in a
    ``state-error`` verdict; the daemon keeps running (it used to exit: the boot-time
    check's StateError escaped the poll loop), and once space is freed it installs."""
    images = make_images(tmp_path / "images", 2)
    r0 = build_release(images[0], tmp_path / "r0", version="1.0", serial=1)
    r1 = build_release(images[1], tmp_path / "r1", version="2.0", serial=2)
    fleet = tmp_path / "fleet"
    (fleet / "images").mkdir(parents=True)
    for release in (r0, r1):
        shutil.copy(release.object_path, fleet / "images" / release.object_path.name)
    shutil.copy(r0.meta_path, fleet / "host.meta")
    with tmpfs(tmp_path / "statefs", "4m") as statefs:
        host = prepare_host(tmp_path / "host", f"file://{fleet}/host", installed=images[0])
        host.state_dir = statefs / "state"
        host.write_config(f"file://{fleet}/host")
        try:
            with DaemonProcess(host).start() as daemon:
                assert host.state()["last_verdict"]["code"] == "up-to-date"
                assert daemon.stop() == 0
            before = (host.state_dir / "state.json").read_bytes()
            shutil.copy(r1.meta_path, fleet / "host.meta")
            fill(statefs)
            with DaemonProcess(host).start() as daemon:
                status = request(host.socket, "GET", "/v1/status").json()
                verdict = status["verdict"]
                assert verdict["code"] == "state-error", verdict
                assert "No space left on device" in verdict["message"]
                assert str(host.state_dir / "state.json") in verdict["message"]
                assert (host.state_dir / "state.json").read_bytes() == before
                (statefs / "filler").unlink()
                result = organixctl("update", "--wait", "--json", socket_path=host.socket)
                assert result.returncode == 1, result.stdout + result.stderr
                assert '"code": "staged"' in result.stdout.splitlines()[-1]
                assert host.state()["slots"]["b"]["status"] == "staged"
                assert daemon.stop() == 0
                assert "Traceback" not in daemon.output(), daemon.output()[-3000:]
        finally:
            host.cleanup()
