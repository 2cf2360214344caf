"""sd_notify as systemd sees it: the test binds the NOTIFY_SOCKET datagram socket itself.

The real daemon runs as a subprocess with ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``
set, exactly as systemd starts a ``Type=notify`` unit with ``WatchdogSec=``.
"""

from __future__ import annotations

import itertools
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import (
    DaemonProcess,
    Host,
    make_images,
    organixctl,
    prepare_host,
    ranged_image_requests,
    request,
)
from tests.support.nginx import Nginx, start_nginx
from tests.support.releases import build_release
from tests.support.s3 import free_port


@dataclass
class Message:
    at: float
    fields: dict[str, str]
    #: The daemon's state file when the message arrived (READY=1 only).
    state: dict[str, Any] = field(default_factory=dict)


class NotifyListener:
    """systemd's end of sd_notify: an AF_UNIX datagram socket, read by a thread."""

    def __init__(self, path: Path, host: Host) -> None:
        self.path = path
        self.host = host
        self.messages: list[Message] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            # Snapshot the state at once: it proves what was done when READY came.
            state = self.host.state() if "READY" in fields else {}
            self.messages.append(Message(now, fields, state))

    def wait_for(self, key: str, timeout: float = 60.0) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.messages):
                if key in message.fields:
                    return message
            time.sleep(0.02)
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def with_key(self, key: str) -> list[Message]:
        return [m for m in self.messages if key in m.fields]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("images"), 2)


@pytest.fixture
def slow_host(tmp_path: Path, images: list[Path]) -> Iterator[tuple[Host, Nginx]]:
    """A host on release 1.0 with 2.0 published behind nginx at ``limit_rate 2m``."""
    pub = tmp_path / "pub"
    build_release(images[0], pub, version="1.0", serial=1)
    build_release(images[1], pub, version="2.0", serial=2)
    server = start_nginx(pub, tmp_path / "nginx", limit_rate="2m")
    host = prepare_host(tmp_path / "host", f"{server.url}/host", installed=images[0])
    try:
        yield host, server
    finally:
        server.stop()
        host.cleanup()


def _notify_env(host: Host) -> dict[str, str]:
    return {"NOTIFY_SOCKET": str(host.socket_dir / "notify"), "WATCHDOG_USEC": "400000"}


def test_ready_after_the_boot_time_install_status_and_watchdog(
    slow_host: tuple[Host, Nginx],
) -> None:
    """READY=1 comes only once the boot-time install is staged; STATUS= lines show the
    download before it; WATCHDOG=1 every ~200 ms throughout; STOPPING=1 on SIGTERM."""
    host, _ = slow_host
    listener = NotifyListener(host.socket_dir / "notify", host)
    try:
        daemon = DaemonProcess(host, env=_notify_env(host)).start(ready=False)
        with daemon:
            ready = listener.wait_for("READY")
            assert ready.fields["READY"] == "1"
            assert ready.fields["STATUS"].startswith("staged: 2.0 (serial 2) is verified in slot b")
            assert ready.state["last_verdict"]["code"] == "staged"
            assert host.boot_state().b.state == "trial"
            before = [m for m in listener.messages if m.at < ready.at and "STATUS" in m.fields]
            downloading = [m for m in before if m.fields["STATUS"].startswith("downloading 2.0: ")]
            assert len(downloading) >= 1
            assert " MiB of " in downloading[0].fields["STATUS"]
            assert downloading[0].fields["STATUS"].endswith("/s")
            assert "READY" not in listener.messages[0].fields
            time.sleep(1.0)
            pings = [m.at for m in listener.with_key("WATCHDOG")]
            assert all(m.fields["WATCHDOG"] == "1" for m in listener.with_key("WATCHDOG"))
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert len(gaps) >= 8
            assert 0.15 <= statistics.median(gaps) <= 0.3
            # systemd would kill the service after 400 ms without a ping, install or not.
            assert max(gaps) < 0.4
            assert pings[0] < downloading[0].at
            assert daemon.stop() == 0
        stopping = listener.wait_for("STOPPING", timeout=5)
        assert stopping.fields["STOPPING"] == "1"
        assert stopping.at > ready.at
        assert not host.socket.exists()
    finally:
        listener.close()


def test_ready_after_a_failed_boot_time_check(tmp_path: Path, images: list[Path]) -> None:
    """With the source down, READY=1 still comes after the check, carrying its error."""
    url = f"http://127.0.0.1:{free_port()}/host"
    host = prepare_host(tmp_path / "host", url, installed=images[0])
    listener = NotifyListener(host.socket_dir / "notify", host)
    try:
        with DaemonProcess(host, env=_notify_env(host)).start(ready=False) as daemon:
            ready = listener.wait_for("READY")
            assert ready.fields["STATUS"].startswith("error: ")
            assert ready.state["last_verdict"]["code"] == "source-unreachable"
            assert daemon.stop() == 0
        assert "STOPPING" in listener.messages[-1].fields
    finally:
        listener.close()
        host.cleanup()


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A TCP port that accepts connections and never answers: a source stuck mid-check."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/host"


def test_cancelled_boot_time_check_still_ends_in_ready(
    tmp_path: Path, images: list[Path], black_hole: str
) -> None:
    """organixctl cancel during the boot-time check (source not answering): READY=1 still
    comes and the poll loop lives on; an update --wait cancelled while checking ends with
    the 'cancelled' verdict and exit 2 instead of waiting forever."""
    host = prepare_host(tmp_path / "host", black_hole, installed=images[0])
    listener = NotifyListener(host.socket_dir / "notify", host)
    try:
        with DaemonProcess(host, env=_notify_env(host)).start(ready=False) as daemon:
            deadline = time.monotonic() + 30
            while request(host.socket, "GET", "/v1/status").json()["phase"] != "checking":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert not listener.with_key("READY")
            cancel = organixctl("cancel", socket_path=host.socket)
            assert "cancelled the running operation" in cancel.stdout
            listener.wait_for("READY", timeout=10)
            status = daemon.wait_ready(timeout=10)
            assert status["next_check"] is not None
            command = [sys.executable, "-m", "organixctl", "update", "--wait"]
            waiting = subprocess.Popen(
                [*command, "--socket", str(host.socket)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            while request(host.socket, "GET", "/v1/status").json()["phase"] != "checking":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert organixctl("cancel", socket_path=host.socket).returncode == 0
            out, err = waiting.communicate(timeout=20)
            assert waiting.returncode == 2, err
            lines = out.splitlines()
            assert lines[:2] == ["phase: checking", "phase: error"]
            assert lines[-1].endswith("cancelled by an admin; the next check resumes [cancelled]")
            assert daemon.stop() == 0
    finally:
        listener.close()
        host.cleanup()


def test_sigterm_during_the_install_leaves_a_resumable_state(
    slow_host: tuple[Host, Nginx],
) -> None:
    """SIGTERM mid-download: STOPPING=1, no READY, exit 0, checkpoint kept; the next start
    resumes from it and stages the release."""
    host, server = slow_host
    listener = NotifyListener(host.socket_dir / "notify", host)
    try:
        with DaemonProcess(host, env=_notify_env(host)).start(ready=False) as daemon:
            deadline = time.monotonic() + 60
            while (host.state().get("progress") or {}).get("chunks_done", 0) < 2:
                assert time.monotonic() < deadline, daemon.output()
                time.sleep(0.05)
            started = time.monotonic()
            assert daemon.stop() == 0
            assert time.monotonic() - started < 10
        assert listener.with_key("STOPPING")
        assert not listener.with_key("READY")
        assert not host.socket.exists()
    finally:
        listener.close()
    saved = host.state()["progress"]["chunks_done"]
    assert saved >= 2
    with DaemonProcess(host).start() as daemon:
        status = daemon.wait_ready()
        assert status["verdict"]["code"] == "staged"
        starts = [e for e in host.state()["history"] if e["event"] == "install-started"]
        assert [e["detail"] for e in starts] == ["chunk 0", f"chunk {saved}"]
        ranges = ranged_image_requests(server)
        assert any(r.startswith("bytes=") for r in ranges), server.requests()
        assert daemon.stop() == 0


UNIT = Path(__file__).resolve().parents[1] / "organixmd/data/systemd/organixm-update.service"


def _unit_for_this_host(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this environment's organixmd."""
    organixmd = Path(sys.executable).with_name("organixmd")
    text = UNIT.read_text().replace("/usr/bin/organixmd", str(organixmd))
    path = tmp_path / "organixm-update.service"
    path.write_text(text)
    return path


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """organixm-update.service parses cleanly in systemd (systemd-analyze verify)."""
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(_unit_for_this_host(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""


def test_unit_is_notify_with_watchdog_and_narrow_sandbox(tmp_path: Path) -> None:
    """The unit is Type=notify with a watchdog, may write only /boot and the two slots,
    and systemd rates its exposure 'OK' (below 4.0)."""
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=2min",
        "TimeoutStartSec=1h",
        "ProtectSystem=strict",
        "ReadWritePaths=-/boot",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/disk/by-partlabel/organixm-a rw",
        "DeviceAllow=/dev/disk/by-partlabel/organixm-b rw",
        "RuntimeDirectory=organixm",
        "StateDirectory=organixm",
    ):
        assert f"\n{line}\n" in text, line
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(_unit_for_this_host(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) < 4.0
    assert match.group(2) == "OK"
