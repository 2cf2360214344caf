"""One writer per host: ``organixmd --once`` beside the running daemon is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.daemon import REPO, DaemonProcess, make_images, prepare_host
from tests.support.releases import build_release


def _once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "organixmd.cli", "--config", str(config), "--once"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def test_once_beside_the_daemon_is_refused_then_runs_alone(tmp_path: Path) -> None:
    """While the daemon runs, --once exits 12 naming the lock and the daemon's pid, writes
    nothing; with the daemon stopped, the same --once runs (and installs)."""
    images = make_images(tmp_path / "images", 2)
    release = build_release(images[0], tmp_path / "pub", version="1.0", serial=1)
    host = prepare_host(tmp_path / "host", release.url, installed=images[0])
    try:
        with DaemonProcess(host).start() as daemon:
            daemon.wait_ready()
            build_release(images[1], tmp_path / "pub", version="2.0", serial=2)
            env_before = host.grubenv.read_bytes()
            state_before = (host.state_dir / "state.json").read_bytes()
            result = _once(host.config)
            assert result.returncode == 12, result.stderr
            assert f"another organixmd (pid {daemon.pid}) holds" in result.stderr
            assert "Traceback" not in result.stderr
            assert host.grubenv.read_bytes() == env_before
            assert (host.state_dir / "state.json").read_bytes() == state_before
            assert daemon.stop() == 0
        result = _once(host.config)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("staged:")
    finally:
        host.cleanup()
