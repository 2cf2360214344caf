"""organixctl against the real daemon: the human views, exit codes, update --wait, boot commands.

Each host is a directory with file-backed slots and a GRUB environment; the daemon
is the real ``organixmd`` subprocess and organixctl the real command (a subprocess,
or :func:`organixctl.cli.main` in-process where output capture is all we need).
Slow installs download through a real nginx with ``limit_rate``.
"""

from __future__ import annotations

import json
import os
import pty
import queue
import re
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from organixctl.cli import main as organixctl_main
from tests.support.daemon import (
    REPO,
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


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three different real ext4 root images (releases 1.0, 2.0, 3.0)."""
    return make_images(tmp_path_factory.mktemp("images"), 3)


@pytest.fixture
def host(tmp_path: Path, images: list[Path]) -> Iterator[Host]:
    """A host on slot a holding release 1.0, published in a directory (file:// source)."""
    release = build_release(images[0], tmp_path / "pub", version="1.0", serial=1)
    host = prepare_host(tmp_path / "host", release.url, installed=images[0])
    try:
        yield host
    finally:
        host.cleanup()


@pytest.fixture
def daemon(host: Host) -> Iterator[DaemonProcess]:
    with DaemonProcess(host).start() as process:
        yield process
        process.stop()


def publish(host: Host, image: Path, version: str, serial: int) -> None:
    """Publish a newer release where the host looks (replaces the meta last)."""
    meta = host.root.parent / "pub" / "host.meta"
    before = meta.stat().st_mtime
    build_release(image, meta.parent, version=version, serial=serial)
    # nginx's ETag is the mtime in seconds and the size: a meta of the same size
    # replaced within the same second would look unchanged to a conditional GET.
    if int(meta.stat().st_mtime) <= int(before):
        os.utime(meta, (before + 2, before + 2))


def wait_for(host: Host, predicate: str, timeout: float = 30.0) -> dict[str, object]:
    """Poll GET /v1/status until ``predicate`` (a phase name or ``progress>N``) holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = request(host.socket, "GET", "/v1/status").json()
        if predicate.startswith("progress>"):
            progress = status["progress"]
            if progress and progress["bytes_done"] > int(predicate.split(">")[1]):
                return dict(status)
        elif status["phase"] == predicate:
            return dict(status)
        time.sleep(0.05)
    raise AssertionError(f"status never reached {predicate!r} within {timeout}s")


# ---------------------------------------------------------------------------- reads


def test_status_human_view(daemon: DaemonProcess, host: Host) -> None:
    """status: booted slot and why, slots with GRUB state and release, verdict; exit 0."""
    result = organixctl("status", socket_path=host.socket)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Booted:      slot a - slot a is the committed slot" in out
    assert "Next boot:   slot a" in out
    assert "slot a [booted, boots next]: GRUB good; holds 1.0 (serial 1)" in out
    assert "slot b: GRUB bad; holds unknown release" in out
    assert "Phase:       idle" in out
    assert "Verdict:     up-to-date [up-to-date]" in out
    assert "slot a runs 1.0 (serial 1), the published release" in out
    assert "Next check:  " in out
    assert " (in " in out
    assert "Last error:  none" in out
    assert "Reboot:      not needed" in out
    assert f"pid {daemon.pid}" in out


def test_status_json_is_the_api_json_unchanged(daemon: DaemonProcess, host: Host) -> None:
    """status --json prints exactly what GET /v1/status answers."""
    raw = request(host.socket, "GET", "/v1/status").body
    result = organixctl("status", "--json", socket_path=host.socket)
    assert result.returncode == 0
    assert result.stdout.encode().rstrip(b"\n") == raw.rstrip(b"\n")


def test_socket_from_environment_and_option(daemon: DaemonProcess, host: Host) -> None:
    """ORGANIXM_SOCKET selects the socket; --socket overrides it."""
    via_env = organixctl("status", env={"ORGANIXM_SOCKET": str(host.socket)})
    assert via_env.returncode == 0, via_env.stderr
    assert "slot a is the committed slot" in via_env.stdout
    overridden = organixctl(
        "status", socket_path=host.socket, env={"ORGANIXM_SOCKET": "/nonexistent/x.sock"}
    )
    assert overridden.returncode == 0, overridden.stderr


def test_unreachable_daemon_exit_3_with_hint(tmp_path: Path) -> None:
    """No daemon at the socket path: exit 3 and a hint naming the service and the override."""
    result = organixctl("status", socket_path=tmp_path / "missing.sock")
    assert result.returncode == 3
    assert "cannot connect to" in result.stderr
    assert "is organixm-update.service running?" in result.stderr
    assert "(--socket or ORGANIXM_SOCKET)" in result.stderr
    # The default path is used without option and environment.
    env = {k: v for k, v in os.environ.items() if k != "ORGANIXM_SOCKET"}
    default = subprocess.run(
        [sys.executable, "-m", "organixctl", "history"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if Path("/run/organixm/control.sock").exists():
        raise AssertionError("a system daemon socket exists; this test needs it absent")
    assert default.returncode == 3
    assert "/run/organixm/control.sock" in default.stderr


def test_usage_errors_exit_64(capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown options, missing values and bad choices exit 64."""
    assert organixctl_main(["status", "--bogus"]) == 64
    assert organixctl_main(["mark-bad", "--reason"]) == 64
    assert organixctl_main(["completion", "fish"]) == 64
    assert organixctl_main(["history", "-n", "many"]) == 64
    assert "usage:" in capsys.readouterr().err


def test_help_lists_every_daemon_command(capsys: pytest.CaptureFixture[str]) -> None:
    """--help names each daemon command with its one-line description."""
    assert organixctl_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("status", "check", "update", "cancel", "mark-good", "mark-bad", "rollback"):
        assert name in out
    for name in ("history", "watch", "completion"):
        assert name in out
    assert organixctl_main(["update", "--help"]) == 0
    update_help = capsys.readouterr().out
    assert "--wait" in update_help
    assert "--reboot" in update_help
    assert "--force" in update_help
    assert "ORGANIXM_SOCKET" in update_help
    assert "exit status:\n   0  started (without --wait), or up to date\n" in update_help
    assert "   4  permission denied: changes need root or the admin group\n" in update_help


def test_check_exit_codes_follow_the_verdict(
    daemon: DaemonProcess, host: Host, images: list[Path]
) -> None:
    """check: 0 when up to date, 1 once a newer release is published (nothing is installed)."""
    result = organixctl("check", socket_path=host.socket)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("up-to-date: ")
    assert "slot a runs 1.0 (serial 1), the published release" in result.stdout
    assert result.stdout.rstrip().endswith("[up-to-date]")
    publish(host, images[1], "2.0", 2)
    result = organixctl("check", socket_path=host.socket)
    assert result.returncode == 1, result.stderr
    assert "available: 2.0 (serial 2) is available" in result.stdout
    assert "[update-available]" in result.stdout
    as_json = organixctl("check", "--json", socket_path=host.socket)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["verdict"]["code"] == "update-available"
    assert host.boot_state().b.state == "bad"  # a check installs nothing


def test_update_wait_when_up_to_date_exits_0(daemon: DaemonProcess, host: Host) -> None:
    """update --wait with nothing new: the check's phases, the verdict, exit 0; --json
    prints the events as NDJSON ending with the verdict."""
    result = organixctl("update", "--wait", socket_path=host.socket)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "phase: checking"
    assert lines[-1].startswith("up-to-date: ")
    assert lines[-1].endswith("[up-to-date]")
    as_json = organixctl("update", "--wait", "--json", socket_path=host.socket)
    assert as_json.returncode == 0
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert events[0] == {"event": "phase", "at": events[0]["at"], "phase": "checking"}
    assert events[-1]["event"] == "verdict"
    assert events[-1]["outcome"] == "up-to-date"


def test_history_human_and_json(daemon: DaemonProcess, host: Host) -> None:
    """history: one line per event; --json is the API's answer; -n limits the lines."""
    result = organixctl("history", socket_path=host.socket)
    assert result.returncode == 0
    assert "identified" in result.stdout
    assert "slot a  1.0 (serial 1)" in result.stdout
    data = json.loads(organixctl("history", "--json", socket_path=host.socket).stdout)
    assert [e["event"] for e in data["history"]] == ["identified"]
    assert organixctl("history", "-n", "1", socket_path=host.socket).stdout.count("\n") == 1


# ---------------------------------------------------------------------------- installs


@pytest.fixture
def slow_host(
    request: pytest.FixtureRequest, tmp_path: Path, images: list[Path]
) -> Iterator[tuple[Host, Nginx]]:
    """A host on release 1.0 whose release directory is served by nginx at 2 MiB/s
    (or the ``limit_rate`` given by indirect parametrization)."""
    pub = tmp_path / "pub"
    build_release(images[0], pub, version="1.0", serial=1)
    rate = getattr(request, "param", "2m")
    server = start_nginx(pub, tmp_path / "nginx", limit_rate=rate)
    host = prepare_host(tmp_path / "host", f"{server.url}/host", installed=images[0])
    try:
        yield host, server
    finally:
        server.stop()
        host.cleanup()


def test_update_wait_shows_progress_and_a_second_update_gets_409(
    slow_host: tuple[Host, Nginx], images: list[Path]
) -> None:
    """update --wait shows phases and progress with rate and ETA, exits 1 (staged);
    meanwhile a second update is refused with 409 (organixctl: exit 2, code busy)."""
    host, _ = slow_host
    with DaemonProcess(host).start() as daemon:
        publish(host, images[1], "2.0", 2)
        waiting = subprocess.Popen(
            [sys.executable, "-m", "organixctl", "update", "--wait", "--socket", str(host.socket)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        wait_for(host, "downloading")
        second = request(
            host.socket, "POST", "/v1/update", b"{}", {"Content-Type": "application/json"}
        )
        assert second.status == 409
        assert second.json()["code"] == "busy"
        busy = organixctl("update", socket_path=host.socket)
        assert busy.returncode == 2
        assert "a check or install is already running" in busy.stderr
        assert busy.stderr.rstrip().endswith("[busy]")
        check = request(host.socket, "POST", "/v1/check", b"{}")
        assert check.status == 409
        out, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 1, (out, err)
        lines = out.splitlines()
        assert "phase: downloading" in lines
        progress = [line for line in lines if line.startswith("downloading: ")]
        assert len(progress) >= 3
        assert any("/s, ETA " in line for line in progress)
        assert any("(100%)" in line for line in progress)
        assert "phase: verifying" in lines
        assert lines[-2].startswith("staged: 2.0 (serial 2) is verified in slot b")
        assert lines[-1] == "2.0 (serial 2) boots on trial at the next reboot"
        state = host.boot_state()
        assert state.b.state == "trial"
        assert state.next_slot == "b"
        status = organixctl("status", socket_path=host.socket)
        assert status.returncode == 1
        assert "Reboot:      pending (update staged)" in status.stdout
        assert "slot b [boots next]: GRUB trial, 3 tries left; holds 2.0 (serial 2), staged" in (
            status.stdout
        )
        daemon.stop()


def test_update_wait_draws_a_progress_bar_on_a_terminal(
    slow_host: tuple[Host, Nginx], images: list[Path]
) -> None:
    """On a terminal update --wait redraws one bar line (\\r) with percent, rate and ETA."""
    host, _ = slow_host
    with DaemonProcess(host).start() as daemon:
        publish(host, images[1], "2.0", 2)
        leader, follower = pty.openpty()
        process = subprocess.Popen(
            [sys.executable, "-m", "organixctl", "update", "--wait", "--socket", str(host.socket)],
            stdout=follower,
            stderr=follower,
            cwd=REPO,
        )
        os.close(follower)
        output = b""
        deadline = time.monotonic() + 120
        while process.poll() is None or select.select([leader], [], [], 0)[0]:
            assert time.monotonic() < deadline
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    output += os.read(leader, 65536)
                except OSError:
                    break
        os.close(leader)
        assert process.wait() == 1
        text = output.decode()
        bars = [part for part in text.split("\r") if part.startswith("downloading [")]
        assert len(bars) >= 3
        assert any("MiB/s  ETA " in bar for bar in bars)
        assert any("] 100%" in bar for bar in bars)
        assert "staged: 2.0 (serial 2)" in text
        daemon.stop()


# Slower, so that the cancel lands in the download (after the socket buffers' burst).
@pytest.mark.parametrize("slow_host", ["1m"], indirect=True)
def test_cancel_stops_the_install_and_the_next_update_resumes(
    slow_host: tuple[Host, Nginx], images: list[Path]
) -> None:
    """cancel ends a running install (verdict cancelled); the next update resumes mid-image."""
    host, server = slow_host
    with DaemonProcess(host).start() as daemon:
        publish(host, images[1], "2.0", 2)
        started = organixctl("update", socket_path=host.socket)
        assert started.returncode == 0
        assert "update started" in started.stdout
        wait_for(host, "progress>3000000")
        time.sleep(0.3)  # let a checkpoint land (checkpoint_interval = 0.2 s)
        assert request(host.socket, "GET", "/v1/status").json()["phase"] == "downloading"
        cancel = organixctl("cancel", socket_path=host.socket)
        assert cancel.returncode == 0
        assert "cancelled the running operation" in cancel.stdout
        status = json.loads(organixctl("status", "--json", socket_path=host.socket).stdout)
        assert status["verdict"]["code"] == "cancelled"
        assert status["last_error"]["code"] == "cancelled"
        human = organixctl("status", socket_path=host.socket)
        assert human.returncode == 2
        assert "Last error:  [cancelled]" in human.stdout
        checkpoint = host.state()["progress"]
        assert checkpoint["chunks_done"] >= 1
        again = organixctl("cancel", socket_path=host.socket)
        assert "nothing was running" in again.stdout
        resumed = organixctl("update", "--wait", socket_path=host.socket)
        assert resumed.returncode == 1, resumed.stdout + resumed.stderr
        history = json.loads(organixctl("history", "--json", socket_path=host.socket).stdout)
        starts = [e["detail"] for e in history["history"] if e["event"] == "install-started"]
        assert starts[0] == "chunk 0"
        assert starts[-1] == f"chunk {checkpoint['chunks_done']}"
        ranges = ranged_image_requests(server)
        assert any(r.startswith("bytes=") for r in ranges), server.requests()
        daemon.stop()


def test_update_reboot_runs_the_reboot_command(tmp_path: Path, images: list[Path]) -> None:
    """update --wait --reboot stages the release and then runs the reboot command at once
    (the reboot policy is 'never')."""
    release = build_release(images[0], tmp_path / "pub", version="1.0", serial=1)
    marker = tmp_path / "rebooted"
    host = prepare_host(
        tmp_path / "host",
        release.url,
        installed=images[0],
        reboot_command=("touch", str(marker)),
    )
    try:
        with DaemonProcess(host).start() as daemon:
            publish(host, images[1], "2.0", 2)
            result = organixctl("update", "--wait", "--reboot", socket_path=host.socket)
            assert result.returncode == 1, result.stdout + result.stderr
            assert "staged: 2.0 (serial 2)" in result.stdout
            deadline = time.monotonic() + 10
            while not marker.exists():
                assert time.monotonic() < deadline, "the reboot command did not run"
                time.sleep(0.05)
            assert host.boot_state().next_slot == "b"
            assert daemon.stop() == 0
    finally:
        host.cleanup()


# ---------------------------------------------------------------------------- boot commands


def _stage_and_boot_trial(host: Host, images: list[Path]) -> None:
    """Publish 2.0, let the daemon's boot-time check stage it, then reboot into it on trial."""
    publish(host, images[1], "2.0", 2)
    with DaemonProcess(host).start() as daemon:
        status = daemon.wait_ready()
        assert status["verdict"]["code"] == "staged"
        assert daemon.stop() == 0
    decision = host.reboot()
    assert decision.slot == "b"
    assert decision.reason == "trial"


def test_mark_good_commits_the_trial_slot_then_rollback(host: Host, images: list[Path]) -> None:
    """After a trial boot into b, mark-good commits b; rollback then puts a first again."""
    _stage_and_boot_trial(host, images)
    with DaemonProcess(host).start() as daemon:
        status = organixctl("status", socket_path=host.socket)
        assert "Booted:      slot b - slot b is on trial (try 1)" in status.stdout
        assert "slot b [booted, boots next]: GRUB trial, 2 tries left" in status.stdout
        good = organixctl("mark-good", socket_path=host.socket)
        assert good.returncode == 0, good.stderr
        assert good.stdout.strip() == "slot b is committed; next boot: slot b"
        state = host.boot_state()
        assert state.b.state == "good"
        assert state.a.state == "good"
        assert organixctl("mark-good", socket_path=host.socket).returncode == 0  # idempotent
        history = json.loads(organixctl("history", "--json", socket_path=host.socket).stdout)
        assert [e["event"] for e in history["history"]].count("committed") == 1
        after = organixctl("status", socket_path=host.socket).stdout
        assert (
            "Booted:      slot b - slot b booted on trial (try 1) and is committed since" in after
        )
        assert "slot b [booted, boots next]: GRUB good; holds 2.0 (serial 2);" in after
        back = organixctl("rollback", socket_path=host.socket)
        assert back.returncode == 0, back.stderr
        assert back.stdout.strip() == "next boot: slot a (reboot to roll back)"
        assert host.boot_state().next_slot == "a"
        events = organixctl("history", socket_path=host.socket).stdout
        assert "rollback" in events
        assert daemon.stop() == 0
    assert host.reboot().slot == "a"
    with DaemonProcess(host).start():
        status = json.loads(organixctl("status", "--json", socket_path=host.socket).stdout)
        assert status["boot"]["booted"] == "a"
        assert status["boot"]["reason"] == "committed"
        # The rolled-back release is not installed again behind the admin's back.
        assert status["verdict"]["code"] == "release-failed-before"
        assert "rolled back by an admin" in status["verdict"]["message"]
        assert host.boot_state().b.state == "good"
        # The last boot's verdict ("slot b runs 2.0") is not carried over to this boot.
        assert "slot b runs" not in status["verdict"]["message"]


def test_mark_bad_remembers_the_failed_release(host: Host, images: list[Path]) -> None:
    """mark-bad on the trial slot marks it bad and records its release as failed for good."""
    _stage_and_boot_trial(host, images)
    with DaemonProcess(host).start() as daemon:
        bad = organixctl("mark-bad", "--reason", "web.service failed", socket_path=host.socket)
        assert bad.returncode == 0, bad.stderr
        assert bad.stdout.strip() == "slot b is marked bad; next boot: slot a (reboot to leave it)"
        state = host.boot_state()
        assert state.b.state == "bad"
        assert state.next_slot == "a"
        history = json.loads(organixctl("history", "--json", socket_path=host.socket).stdout)
        assert [f["release"]["version"] for f in history["failed"]] == ["2.0"]
        assert history["failed"][0]["reason"] == "web.service failed"
        human = organixctl("history", socket_path=host.socket).stdout
        assert "Releases that failed" in human
        assert "2.0 (serial 2): web.service failed" in human
        assert daemon.stop() == 0


def test_after_mark_bad_and_reboot_the_release_is_blocked(host: Host, images: list[Path]) -> None:
    """After mark-bad and a reboot into the old slot, the failed release is blocked, not staged."""
    _stage_and_boot_trial(host, images)
    with DaemonProcess(host).start() as daemon:
        bad = organixctl("mark-bad", socket_path=host.socket)
        assert bad.returncode == 0, bad.stderr
        assert daemon.stop() == 0
    decision = host.reboot()
    assert decision.slot == "a"
    with DaemonProcess(host).start():
        status = organixctl("status", socket_path=host.socket)
        assert status.returncode == 2, status.stdout
        assert "Verdict:     blocked [release-failed-before]" in status.stdout
        assert "Failed:      1 release(s) failed a trial boot" in status.stdout
        check = organixctl("check", socket_path=host.socket)
        assert check.returncode == 2
        assert "[release-failed-before]" in check.stdout


def test_mark_bad_refuses_a_committed_slot_unless_forced(daemon: DaemonProcess, host: Host) -> None:
    """mark-bad on the committed booted slot is refused (exit 2, policy-refused) and
    changes nothing; --force demotes it."""
    refused = organixctl("mark-bad", socket_path=host.socket)
    assert refused.returncode == 2
    assert "not on trial; refusing to mark the running committed system bad" in refused.stderr
    assert refused.stderr.rstrip().endswith("[policy-refused]")
    assert host.boot_state().a.state == "good"
    forced = organixctl("mark-bad", "--force", "--reason", "disk errors", socket_path=host.socket)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith("slot a is marked bad")
    assert host.boot_state().a.state == "bad"
    history = json.loads(organixctl("history", "--json", socket_path=host.socket).stdout)
    assert history["failed"][0]["reason"] == "disk errors"


def test_rollback_refused_without_a_committed_other_slot(daemon: DaemonProcess, host: Host) -> None:
    """rollback when the other slot is not good: problem printed with its code, exit 2."""
    result = organixctl("rollback", socket_path=host.socket)
    assert result.returncode == 2
    assert result.stderr.startswith("organixctl: cannot roll back to slot b")
    assert result.stderr.rstrip().endswith("[slot-unusable]")
    assert host.boot_state().next_slot == "a"


# ---------------------------------------------------------------------------- watch


class Lines:
    """Lines of a subprocess's stdout, read by a thread (select cannot see Python's buffer)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(process,), daemon=True)
        self.thread.start()

    def _pump(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.queue.put(line)

    def next(self, timeout: float = 20.0) -> str:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"organixctl printed no line within {timeout}s") from None


def test_watch_follows_events_until_interrupted(daemon: DaemonProcess, host: Host) -> None:
    """watch prints the status line, then each check's phases and verdict; Ctrl-C exits 0."""
    watch = subprocess.Popen(
        [sys.executable, "-m", "organixctl", "watch", "--socket", str(host.socket)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    lines = Lines(watch)
    try:
        first = lines.next()
        assert first.strip() == "booted slot a; phase idle; last verdict up-to-date"
        assert organixctl("check", socket_path=host.socket).returncode == 0
        seen = [lines.next().strip() for _ in range(3)]
        assert seen[0] == "phase: checking"
        assert any(line.startswith("up-to-date: ") and "slot a runs 1.0" in line for line in seen)
    finally:
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=10) == 0


def test_watch_json_lines_and_end_when_the_daemon_stops(daemon: DaemonProcess, host: Host) -> None:
    """watch --json prints NDJSON; SIGTERM to the daemon ends the stream (exit 3) at once."""
    watch = subprocess.Popen(
        [sys.executable, "-m", "organixctl", "watch", "--json", "--socket", str(host.socket)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    lines = Lines(watch)
    assert json.loads(lines.next())["event"] == "status"
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10
    assert json.loads(lines.next())["event"] == "stopping"
    assert watch.wait(timeout=10) == 3
    assert watch.stderr is not None
    assert "closed the event stream" in watch.stderr.read()
    assert not host.socket.exists()


# ---------------------------------------------------------------------------- the command itself


def test_completion_scripts_complete_commands_and_options() -> None:
    """completion bash completes commands and options in a real bash; zsh's script defines
    every command."""
    script = organixctl("completion", "bash")
    assert script.returncode == 0
    probe = (
        f"{script.stdout}\n"
        "COMP_WORDS=(organixctl mark-); COMP_CWORD=1; _organixctl; echo ${COMPREPLY[@]}\n"
        "COMP_WORDS=(organixctl update --w); COMP_CWORD=2; _organixctl; echo ${COMPREPLY[@]}\n"
        "COMP_WORDS=(organixctl completion ''); COMP_CWORD=2; _organixctl; echo ${COMPREPLY[@]}\n"
    )
    result = subprocess.run(
        ["bash", "--norc", "-c", probe], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["mark-good mark-bad", "--wait", "-h --help bash zsh"]
    zsh = organixctl("completion", "zsh")
    assert zsh.returncode == 0
    assert zsh.stdout.startswith("#compdef organixctl\n")
    for name in ("status", "update", "mark-good", "mark-bad", "rollback", "history", "watch"):
        assert f"'{name}:" in zsh.stdout
        assert f"        {name}) _arguments" in zsh.stdout
    assert "'--wait[follow the install with a progress display" in zsh.stdout


ZSH_PROBE = r"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z 'PS1="%% "; fpath=(DIR $fpath); autoload -Uz compinit; compinit -u -d DIR/dump'
zpty -w z 'bindkey "^I" list-choices; echo READY-1'
zpty -r z out '*READY-1*'
zpty -w -n z $'organixctl mark-\t'
zpty -r z out '*mark-good*'
print -r -- "$out"
zpty -w -n z $'\C-u organixctl update --w\t'
zpty -r z out '*--wait*'
print -r -- "$out"
zpty -d z
"""


def test_zsh_completion_in_a_real_zsh(tmp_path: Path) -> None:
    """In an interactive zsh (driven through zpty) the script lists commands with their
    descriptions and a command's options."""
    script = organixctl("completion", "zsh")
    assert script.returncode == 0
    (tmp_path / "_organixctl").write_text(script.stdout)
    syntax = subprocess.run(["zsh", "-n", str(tmp_path / "_organixctl")], check=False)
    assert syntax.returncode == 0
    probe = tmp_path / "probe.zsh"
    probe.write_text(ZSH_PROBE.replace("DIR", str(tmp_path)))
    result = subprocess.run(
        ["zsh", "-f", str(probe)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", result.stdout)
    assert re.search(r"mark-bad\s+-- mark the booted slot bad and remember its release", plain)
    assert re.search(r"mark-good\s+-- commit the booted slot after a good boot", plain)
    assert "\n--wait" in plain


def test_daemon_commands_import_only_the_standard_library() -> None:
    """Building the parser, importing the client and running ``status`` load no
    third-party or daemon module: of ``organixmd`` only the API's definition
    (``organixmd.apidef``, the standard library only) and its package."""
    code = (
        "import sys\n"
        "from organixctl.cli import build_parser, main\n"
        "import organixctl.client\n"
        "build_parser()\n"
        "main(['status', '--socket', '/nonexistent/organixm.sock'])\n"
        "heavy = {'aiohttp', 'pydantic', 'structlog', 'organixmd', 'zstandard', 'cryptography',"
        " 'botocore', 'aiobotocore', 'systemd', 'email', 'http', 'asyncio', 'dataclasses'}\n"
        "allowed = {'organixmd', 'organixmd.apidef'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy and m not in allowed))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "[]"


def test_installed_entry_point_answers_status(
    daemon: DaemonProcess, host: Host, tmp_path: Path
) -> None:
    """The installed ``organixctl`` script answers status, 20 times in a row, importing
    nothing heavy (the test above); how fast it is, is bench/cli.py's figure, not a
    pass/fail here (this machine is shared and noisy)."""
    command = [str(Path(sys.executable).with_name("organixctl")), "status"]
    command += ["--socket", str(host.socket)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")
    times = []
    for _ in range(20):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        times.append(time.perf_counter() - start)
        assert "Booted" in done.stdout, done.stdout
    print(f"\norganixctl status: median {statistics.median(times) * 1000:.1f} ms of 20 runs")
