"""The control socket of the real daemon, spoken to with raw HTTP over the Unix socket.

One daemon serves the whole module: a host booted from slot a, which holds the
published release, so every check ends ``up-to-date`` and nothing is installed.
"""

from __future__ import annotations

import asyncio
import grp
import http.client
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.daemon import (
    DaemonProcess,
    Host,
    RawAnswer,
    make_images,
    organixctl,
    prepare_host,
    request,
)
from tests.support.releases import build_release


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ext4 root image (release 1.0)."""
    (built,) = make_images(tmp_path_factory.mktemp("images"), 1)
    return built


@pytest.fixture(scope="module")
def api_host(tmp_path_factory: pytest.TempPathFactory, image: Path) -> Iterator[Host]:
    """An up-to-date host (slot a holds release 1.0) whose socket group is ``nogroup``."""
    root = tmp_path_factory.mktemp("api")
    release = build_release(image, root / "pub", version="1.0", serial=1)
    host = prepare_host(root / "host", release.url, installed=image, socket_group="nogroup")
    daemon = DaemonProcess(host).start()
    try:
        yield host
    finally:
        daemon.stop()
        host.cleanup()


def _post(host: Host, path: str, body: Any = None, raw: bytes | None = None) -> RawAnswer:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"} if data is not None else {}
    return request(host.socket, "POST", path, data, headers)


def _get(host: Host, path: str) -> RawAnswer:
    return request(host.socket, "GET", path)


def _assert_still_serving(host: Host) -> None:
    answer = _get(host, "/v1/status")
    assert answer.status == 200
    assert answer.json()["daemon"]["ready"] is True


def test_status_says_what_booted_and_why(api_host: Host) -> None:
    """GET /v1/status: booted slot with GRUB's reason, per-slot state and release, verdict."""
    answer = _get(api_host, "/v1/status")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("application/json")
    status = answer.json()
    assert status["api"] == 1
    assert status["daemon"]["pid"] > 1
    assert status["boot"]["booted"] == "a"
    assert status["boot"]["reason"] == "committed"
    assert status["boot"]["explanation"] == "slot a is the committed slot"
    assert status["boot"]["on_trial"] is False
    assert status["slots"]["a"]["state"] == "good"
    assert status["slots"]["a"]["release"]["version"] == "1.0"
    assert status["slots"]["a"]["release"]["serial"] == 1
    assert status["slots"]["b"]["state"] == "bad"
    assert status["phase"] == "idle"
    assert status["progress"] is None
    assert status["verdict"]["outcome"] == "up-to-date"
    assert status["verdict"]["code"] == "up-to-date"
    next_check = datetime.fromisoformat(status["next_check"])
    assert next_check > datetime.now(UTC)
    assert status["last_error"] is None
    assert status["reboot_pending"] is None


def test_socket_is_0660_root_and_the_configured_group(api_host: Host) -> None:
    """The socket is created mode 0660, owned by root and group ``socket_group``."""
    info = os.stat(api_host.socket)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_uid == 0
    assert info.st_gid == grp.getgrnam("nogroup").gr_gid


def test_history_lists_events_and_failed_releases(api_host: Host) -> None:
    """GET /v1/history: the booted slot's release was identified at the first check."""
    answer = _get(api_host, "/v1/history")
    assert answer.status == 200
    data = answer.json()
    assert data["failed"] == []
    identified = [e for e in data["history"] if e["event"] == "identified"]
    assert identified
    assert identified[0]["slot"] == "a"
    assert identified[0]["release"]["version"] == "1.0"


def test_metrics_in_prometheus_text_format(api_host: Host) -> None:
    """GET /metrics: booted slot, last verdict and tries left as Prometheus gauges."""
    answer = _get(api_host, "/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.body.decode()
    assert 'organixm_booted_slot{slot="a"} 1' in text
    assert 'organixm_booted_slot{slot="b"} 0' in text
    assert 'organixm_last_verdict{outcome="up-to-date",code="up-to-date"} 1' in text
    assert "# TYPE organixm_checks_total counter" in text
    assert 'organixm_slot_trial_tries_left{slot="b"} 0' in text


def test_check_answers_the_verdict(api_host: Host) -> None:
    """POST /v1/check (with and without a body) runs a check and answers its verdict."""
    for answer in (_post(api_host, "/v1/check", {}), _post(api_host, "/v1/check")):
        assert answer.status == 200
        verdict = answer.json()["verdict"]
        assert verdict["outcome"] == "up-to-date"
        assert verdict["release"]["version"] == "1.0"


def test_update_when_up_to_date_starts_and_concludes(api_host: Host) -> None:
    """POST /v1/update answers 202; with wait=true it answers the check's verdict."""
    answer = _post(api_host, "/v1/update", {})
    assert answer.status == 202
    assert answer.json() == {"started": True}
    deadline = time.monotonic() + 30
    while _get(api_host, "/v1/status").json()["phase"] != "idle":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waited = _post(api_host, "/v1/update", {"wait": True})
    assert waited.status == 200
    assert waited.json()["verdict"]["outcome"] == "up-to-date"


def test_cancel_with_nothing_running(api_host: Host) -> None:
    """POST /v1/cancel answers whether anything was running: nothing here."""
    answer = _post(api_host, "/v1/cancel")
    assert answer.status == 200
    assert answer.json() == {"cancelled": False}


def test_events_stream_status_then_check_events(api_host: Host) -> None:
    """GET /v1/events: NDJSON, first the status, then a check's phase and verdict events."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(15)
    sock.connect(str(api_host.socket))
    sock.sendall(b"GET /v1/events HTTP/1.0\r\nHost: x\r\n\r\n")
    stream = sock.makefile("rb")
    try:
        assert stream.readline().split()[1] == b"200"
        headers = []
        while (line := stream.readline()) not in (b"\r\n", b""):
            headers.append(line.decode().lower())
        assert any(h.startswith("content-type: application/x-ndjson") for h in headers)
        first = json.loads(stream.readline())
        assert first["event"] == "status"
        assert first["boot"]["booted"] == "a"
        assert _post(api_host, "/v1/check", {}).status == 200
        kinds = []
        while True:
            event = json.loads(stream.readline())
            kinds.append(event["event"])
            assert "at" in event
            if event["event"] == "verdict":
                assert event["outcome"] == "up-to-date"
                break
        assert kinds[0] == "phase"
    finally:
        stream.close()
        sock.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/v1/nothing-here", None, 404, "not-found"),
        ("GET", "/v2/status", None, 404, "not-found"),
        ("GET", "/v1/update", None, 405, "method-not-allowed"),
        ("POST", "/v1/status", b"{}", 405, "method-not-allowed"),
        ("DELETE", "/v1/history", None, 405, "method-not-allowed"),
        ("POST", "/v1/check", b"{not json", 400, "bad-request"),
        ("POST", "/v1/check", b"[true]", 400, "bad-request"),
        ("POST", "/v1/check", b'{"force": "yes"}', 400, "bad-request"),
        ("POST", "/v1/update", b'{"reboot": 1}', 400, "bad-request"),
        ("POST", "/v1/mark-bad", b'{"reason": 5}', 400, "bad-request"),
        ("POST", "/v1/mark-bad", json.dumps({"reason": "x" * 201}).encode(), 400, "bad-request"),
        ("POST", "/v1/check", b'{"pad": "' + b"x" * 20000 + b'"}', 413, "request-too-large"),
        ("POST", "/v1/check", b"[" * 10000, 400, "bad-request"),
        ("POST", "/v1/update", b'{"wait": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "bad-request"),
        ("POST", "/v1/check", b'{"force": true, "x": "\xff\xfe"}', 400, "bad-request"),
        ("POST", "/v1/check", b'{"force": ' + b"9" * 5000 + b"}", 400, "bad-request"),
    ],
)
def test_bad_requests_get_problem_json(
    api_host: Host, method: str, path: str, body: bytes | None, status: int, code: str
) -> None:
    """Each malformed request gets a 4xx problem+json with a stable code; the daemon serves on."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    answer = request(api_host.socket, method, path, body, headers)
    assert answer.status == status
    assert answer.headers["content-type"].startswith("application/problem+json")
    problem = answer.json()
    assert problem["code"] == code
    assert problem["status"] == status
    assert problem["type"] == f"urn:organixm:error:{code}"
    assert problem["detail"]
    assert "Traceback" not in answer.body.decode()
    _assert_still_serving(api_host)


@pytest.mark.parametrize(
    ("content_type", "detail"),
    [
        ("text/plain", "must be JSON (Content-Type: application/json), not 'text/plain'"),
        ("application/x-www-form-urlencoded", "must be JSON"),
        ("application/json; charset=no-such-charset", "nests deeper than 8 levels"),
        ("application/json; charset=utf-16", "nests deeper than 8 levels"),
    ],
)
def test_body_content_type_and_charset(api_host: Host, content_type: str, detail: str) -> None:
    """A body that is not JSON by its type is refused; a JSON body is read as UTF-8
    whatever charset the header names (an unknown one was a 500)."""
    body = b'{"force": ' + b"[" * 9 + b"]" * 9 + b"}"
    answer = request(api_host.socket, "POST", "/v1/check", body, {"Content-Type": content_type})
    assert answer.status == 400, answer.body
    assert answer.json()["code"] == "bad-request"
    assert detail in answer.json()["detail"]


def _daemon_log(host: Host) -> str:
    (log,) = host.root.glob("organixmd-*.log")
    return log.read_text(errors="replace")


def test_refused_requests_are_one_log_line_each_without_traceback(api_host: Host) -> None:
    """Each refused request is one ``request_refused`` line naming its code; bytes that are
    not HTTP are one ``request_malformed`` line; neither carries a traceback."""
    before = _daemon_log(api_host)
    bodies = [b"{not json", b"[" * 10000, b'{"force": "\xff"}', b"[1]"]
    for body in bodies:
        assert _post(api_host, "/v1/check", raw=body).status == 400
    assert _get(api_host, "/v1/nothing-here").status == 404
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(api_host.socket))
        sock.sendall(b"GET /v1/status HTTP/1.1\r\nBad Header Name: x\r\n\r\n")
        assert b" 400 " in sock.recv(4096)
    _assert_still_serving(api_host)
    new = _daemon_log(api_host)[len(before) :]
    lines = [json.loads(line) for line in new.splitlines() if line.strip()]
    refused = [line for line in lines if line["event"] == "request_refused"]
    assert [(r["status"], r["code"]) for r in refused] == [(400, "bad-request")] * len(bodies) + [
        (404, "not-found")
    ]
    assert [line["event"] for line in lines].count("request_malformed") == 1
    assert "Traceback" not in new
    assert all("exception" not in line for line in lines)


def test_bad_flag_starts_nothing(api_host: Host) -> None:
    """An update with a non-boolean flag is refused before anything starts (no check runs)."""
    before = _get(api_host, "/v1/status").json()["last_check"]
    for body in (b'{"wait": "soon"}', b'{"force": null}'):
        answer = _post(api_host, "/v1/update", raw=body)
        assert answer.status == 400
        assert answer.json()["code"] == "bad-request"
    time.sleep(0.3)
    assert _get(api_host, "/v1/status").json()["last_check"] == before


def test_garbage_on_the_socket_gets_400_and_the_daemon_serves_on(api_host: Host) -> None:
    """Bytes that are not HTTP get a 400 from the server and do not disturb the daemon."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(api_host.socket))
        sock.sendall(b"\x00\x01 this is not HTTP\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.")
    assert b" 400 " in reply.split(b"\r\n")[0] + b" "
    _assert_still_serving(api_host)


def test_nobody_reads_status_but_is_denied_changes(api_host: Host) -> None:
    """A non-admin uid (nobody, in the socket's group) reads status; changes get 403 / exit 4."""
    status = organixctl("status", socket_path=api_host.socket, user="nobody")
    assert status.returncode == 0, status.stderr
    assert "Booted:      slot a" in status.stdout
    history = organixctl("history", socket_path=api_host.socket, user="nobody")
    assert history.returncode == 0, history.stderr
    for command in (["mark-good"], ["mark-bad"], ["rollback"], ["check"], ["update"], ["cancel"]):
        result = organixctl(*command, socket_path=api_host.socket, user="nobody")
        assert result.returncode == 4, (command, result.stdout, result.stderr)
        assert "[permission-denied]" in result.stderr
        assert "uid 65534 may read status but not change anything" in result.stderr
    # The slot is untouched by the refused mark-good.
    assert api_host.boot_state().b.state == "bad"


def test_thousand_concurrent_status_requests_all_answered(api_host: Host) -> None:
    """1,000 simultaneous GET /v1/status on 1,000 connections are all answered with 200."""

    async def hammer() -> tuple[list[int], float]:
        connector = aiohttp.UnixConnector(path=str(api_host.socket), limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> int:
                async with session.get("http://localhost/v1/status") as response:
                    body = await response.json()
                    assert body["boot"]["booted"] == "a"
                    return response.status

            start = time.perf_counter()
            statuses = await asyncio.gather(*(one() for _ in range(1000)))
            return list(statuses), time.perf_counter() - start

    statuses, seconds = asyncio.run(hammer())
    print(f"\n1000 concurrent status requests answered in {seconds:.2f} s")
    assert statuses == [200] * 1000
    assert seconds < 60
    _assert_still_serving(api_host)


def test_admin_requests_during_a_busy_event_stream(api_host: Host) -> None:
    """An open event stream does not hold up other requests (handlers never block)."""
    results: list[int] = []

    def follow() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(api_host.socket))
            sock.sendall(b"GET /v1/events HTTP/1.0\r\n\r\n")
            results.append(len(sock.recv(65536)))
            time.sleep(1.0)

    thread = threading.Thread(target=follow)
    thread.start()
    start = time.perf_counter()
    for _ in range(20):
        assert _get(api_host, "/v1/status").status == 200
    elapsed = time.perf_counter() - start
    thread.join()
    assert results
    assert results[0] > 0
    assert elapsed < 5


def test_boot_commands_over_raw_http(tmp_path: Path, image: Path) -> None:
    """mark-good, mark-bad and rollback answer JSON, or a problem when refused."""
    release = build_release(image, tmp_path / "pub", version="1.0", serial=1)
    host = prepare_host(tmp_path / "host", release.url, installed=image)
    try:
        with DaemonProcess(host).start() as daemon:
            good = _post(host, "/v1/mark-good")
            assert good.status == 200
            assert good.json() == {"committed": "a", "next_slot": "a"}
            back = _post(host, "/v1/rollback")
            assert back.status == 409
            assert back.json()["code"] == "slot-unusable"
            refused = _post(host, "/v1/mark-bad", {"reason": "testing"})
            assert refused.status == 409
            assert refused.json()["code"] == "policy-refused"
            assert _post(host, "/v1/mark-bad", {"force": "yes"}).status == 400
            assert host.boot_state().a.state == "good"
            bad = _post(host, "/v1/mark-bad", {"reason": "testing", "force": True})
            assert bad.status == 200
            assert bad.json() == {"marked_bad": "a", "next_slot": None, "rebooting": False}
            assert host.boot_state().a.state == "bad"
            failed = _get(host, "/v1/history").json()["failed"]
            assert [(f["release"]["version"], f["reason"]) for f in failed] == [("1.0", "testing")]
            assert daemon.stop() == 0
    finally:
        host.cleanup()


def test_check_cancelled_at_any_moment_still_answers(api_host: Host) -> None:
    """Admins' cancels landing anywhere in a POST /v1/check (fetch, decision, state
    write) ends that check, but its caller still gets an answer: 200 with a verdict, or
    409 when another check held the engine. It used to cancel the HTTP handler itself,
    which closed the connection unanswered."""
    outcomes: list[str] = []

    def check() -> None:
        try:
            outcomes.append(str(_post(api_host, "/v1/check", {}).status))
        except (OSError, http.client.HTTPException) as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")

    for i in range(150):
        worker = threading.Thread(target=check)
        worker.start()
        time.sleep((i % 10) / 2000)
        # Two admins cancelling at once: the second lands while the first one's
        # "cancelled" verdict is being written.
        cancels = [threading.Thread(target=_post, args=(api_host, "/v1/cancel")) for _ in "ab"]
        for cancel in cancels:
            cancel.start()
        for cancel in cancels:
            cancel.join(30)
        worker.join(30)
    assert len(outcomes) == 150
    assert set(outcomes) <= {"200", "409"}, [o for o in outcomes if o not in ("200", "409")]
    _assert_still_serving(api_host)
