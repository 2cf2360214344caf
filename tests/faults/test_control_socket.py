"""Fault rows "bad input: malformed control-socket requests" and "control socket".

One real daemon (an up-to-date host: every check ends ``up-to-date``, nothing is
installed) gets ≥10,000 seeded malformed requests over raw Unix sockets: odd
methods, paths, versions and headers, bodies that are not JSON, nest 10,000
deep, are too large, have the wrong type or encoding, requests cut off half-way
and connections reset. Every answer must be a 4xx (or a 2xx for what happens to
be valid), never a 5xx; the log must hold no traceback; afterwards the daemon
answers status and the GRUB environment is unchanged.

The second row: a non-admin peer (nobody, through ``setpriv``) is refused every
mutating endpoint with 403, and 1,000 concurrent status calls are all answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import random
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults.report import FaultReport, Row, count_tracebacks
from tests.support.daemon import (
    DaemonProcess,
    Host,
    make_images,
    organixctl,
    prepare_host,
    request,
)
from tests.support.releases import build_release

SEED = 90210
REQUESTS = 10_000
WORKERS = 8
#: A complete request is answered at once; a wait this long means no answer.
ANSWER_TIMEOUT = 20.0

ENDPOINTS = [
    "/v1/status",
    "/v1/history",
    "/v1/events",
    "/metrics",
    "/v1/check",
    "/v1/update",
    "/v1/cancel",
    "/v1/mark-good",
    "/v1/mark-bad",
    "/v1/rollback",
]
MUTATING = ["check", "update", "cancel", "mark-good", "mark-bad", "rollback"]
METHODS = [
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "HEAD",
    "OPTIONS",
    "TRACE",
    "CONNECT",
    "get",
    "P0ST",
    "BREW",
    "PRI",
    "G\x00T",
    "X" * 300,
    "",
]
ODD_PATHS = [
    "/",
    "*",
    "",
    "/v1",
    "/v1/",
    "/v2/status",
    "/v1/status/",
    "/v1/../v1/status",
    "/v1/%2e%2e/v1/status",
    "/v1/status?x=1&&&=&force=true",
    "/v1/status#frag",
    "http://localhost/v1/status",
    "//v1/status",
    "/v1/st%00atus",
    "/v1/\xff\xfe",
    "/v1/status%",
    "/v1/%zz",
    "/v1/\u0109eck",
    "/v1/check;x",
    " /v1/status",
    "/v1/mark%2Dgood",
    "/" + "a" * 9000,
    "/v1/status?" + "q" * 5000,
]
VERSIONS = ["HTTP/1.1"] * 6 + [
    "HTTP/1.0",
    "HTTP/2.0",
    "HTTP/0.9",
    "HTTP/1.2",
    "HTTP/9.9",
    "http/1.1",
    "HTTP/1.x",
    "FOO/1.1",
    "",
]
CONTENT_TYPES = [
    "application/json",
    "application/json",
    "application/json; charset=no-such-charset",
    "application/json; charset=utf-16",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "",
    "application/json;;;",
    "\xff\xfe",
    "application/problem+json",
]
ODD_HEADERS = [
    "Host: a\r\nHost: b",
    "NoColonHere",
    "Bad Name: x",
    ": empty-name",
    "X-Fold: a\r\n continued",
    "X-Nul: a\x00b",
    "X-Long: " + "v" * 9000,
    "X" * 9000 + ": v",
    "Expect: 100-continue",
    "Connection: upgrade\r\nUpgrade: websocket",
    "Upgrade: h2c",
    "Connection: close",
    "Connection: keep-alive",
    "Accept: text/html",
    "X-Utf8: \xff\xfe\xfd",
    "Content-Encoding: br",
    "Content-Encoding: deflate",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: chunked, identity",
    "Transfer-Encoding: identity",
    "\r\n".join(f"X-Many-{i}: {i}" for i in range(150)),
]


def _json_body(rng: random.Random) -> bytes:
    choice = rng.randrange(22)
    if choice == 0:
        return b"{}"
    if choice == 1:
        return b'{"wait": true}'
    if choice == 2:
        return b"{not json"
    if choice == 3:
        return b"[" * rng.choice([9, 100, 1000, 10_000, 16_000])
    if choice == 4:
        depth = rng.choice([9, 1000, 5000, 8000])
        return b'{"force": ' + b"[" * depth + b"]" * depth + b"}"
    if choice == 5:
        return b'{"pad": "' + b"x" * rng.choice([16_000, 17_000, 100_000]) + b'"}'
    if choice == 6:
        return rng.randbytes(rng.choice([1, 10, 500, 5000]))
    if choice == 7:
        return b'{"force": "\xff\xfe"}'
    if choice == 8:
        return b'{"force": ' + b"9" * rng.choice([5000, 10_000]) + b"}"
    if choice == 9:
        return rng.choice([b"null", b"true", b"1", b'"x"', b"[]", b"[1, 2]", b"1e99999"])
    if choice == 10:
        return b'{"force": NaN, "wait": -Infinity}'
    if choice == 11:
        return b'{"reason": ' + rng.choice([b"5", b"null", b'"' + b"r" * 300 + b'"']) + b"}"
    if choice == 12:
        return b'{"force": "\\ud800"}'
    if choice == 13:
        return b"\xef\xbb\xbf{}"
    if choice == 14:
        return '{"force": false}'.encode("utf-16")
    if choice == 15:
        return b'{"force": false, "force": "x"}'
    if choice == 16:
        return b'{"wait": false, "reboot": 1}'
    if choice == 17:
        return b'{"a": ' * 20 + b"1" + b"}" * 20
    if choice == 18:
        return b'{"force": 0}'
    if choice == 19:
        return b""
    if choice == 20:
        return b'{"x": "' + "\u202e\U0001f4a5".encode() * 50 + b'"}'
    return b"\x00" * rng.choice([1, 100])


def _safe(body: bytes) -> bytes:
    """Refuse to send what would legitimately change the host: a forced mark-bad."""
    try:
        value: Any = json.loads(body)
    except (ValueError, RecursionError):
        return body  # not JSON, or too deep for json.loads: the daemon refuses it
    if isinstance(value, dict) and value.get("force") is True:
        return b'{"force": "not a boolean"}'
    return body


@dataclass
class Case:
    index: int
    data: bytes
    #: "answer": read the status line; "cut": send part, close; "reset": part, RST.
    mode: str
    #: The request as sent declares more body than it carries (a client that stalls).
    short: bool


def make_case(seed: int, index: int) -> Case:
    """Request ``index`` of the fuzzer seeded with ``seed``."""
    rng = random.Random(seed * 1_000_003 + index)
    method = rng.choice(METHODS) if rng.random() < 0.3 else rng.choice(["GET", "POST"])
    path = rng.choice(ODD_PATHS) if rng.random() < 0.3 else rng.choice(ENDPOINTS)
    version = rng.choice(VERSIONS)
    eol = "\r\n" if rng.random() < 0.9 else rng.choice(["\n", "\r", "\r\r\n"])
    body = _safe(_json_body(rng)) if rng.random() < 0.7 else b""
    headers: list[str] = []
    if rng.random() < 0.9:
        headers.append("Host: localhost")
    if body and rng.random() < 0.8:
        headers.append(f"Content-Type: {rng.choice(CONTENT_TYPES)}")
    if rng.random() < 0.3:
        headers.append(rng.choice(ODD_HEADERS))
    short = False
    framing = rng.randrange(10)
    if framing == 0 and body:
        # chunked, well-formed or broken
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        if rng.random() < 0.5:
            broken = [
                b"zz\r\n" + body + b"\r\n0\r\n\r\n",
                b"%x;ext=\xff\r\n%s\r\n0\r\n\r\n" % (len(body), body),
                b"-1\r\n\r\n",
                b"%x\r\n%s0\r\n\r\n" % (len(body), body),
                # a chunk longer than what follows: the client stalls mid-body
                b"%x\r\n%s" % (len(body) + 10, body),
            ]
            pick = rng.randrange(len(broken))
            chunked = broken[pick]
            short = pick == len(broken) - 1
        headers.append("Transfer-Encoding: chunked")
        body = chunked
    elif framing == 1 and body:
        # gzip, valid or not
        encoded = gzip.compress(body) if rng.random() < 0.5 else b"\x1f\x8b" + body
        headers.append("Content-Encoding: gzip")
        headers.append(f"Content-Length: {len(encoded)}")
        body = encoded
    elif framing == 2:
        value = rng.choice(["-1", "abc", "99999999999999999999", "1, 2", "+5", " 5", "0x10"])
        headers.append(f"Content-Length: {value}")
    elif framing == 3 and body:
        headers.append(f"Content-Length: {len(body)}")
        headers.append(f"Content-Length: {len(body) + 1}")
    elif framing == 4 and body:
        headers.append(f"Content-Length: {len(body)}")
        headers.append("Transfer-Encoding: chunked")
    elif framing == 5 and body:
        headers.append(f"Content-Length: {len(body) + rng.choice([1, 100, 100_000])}")
        short = True
    elif body:
        headers.append(f"Content-Length: {len(body)}")
    line = f"{method} {path} {version}".rstrip() if version else f"{method} {path}"
    head = (eol.join([line, *headers]) + eol + eol).encode("utf-8", "surrogateescape")
    # A head that promises a body the request does not carry (or HTTP/2's preface,
    # which PRI starts) waits for more bytes, as HTTP says: a stalled client.
    promises = re.search(rb"content-length: *\+?0*[1-9]|chunked", head, re.IGNORECASE)
    if method == "PRI" or (not body and promises):
        short = True
    data = head + body
    mode = rng.choices(["answer", "cut", "reset"], weights=[85, 10, 5])[0]
    if mode != "answer":
        data = data[: rng.randrange(0, max(len(data), 1))]
    if short or "100-continue" in head.decode(errors="replace"):
        mode = "cut" if mode == "answer" else mode
    return Case(index, data, mode, short)


def _send(socket_path: Path, case: Case) -> str:
    """Send one case; the outcome is the HTTP status, or what happened instead."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(ANSWER_TIMEOUT)
        sock.connect(str(socket_path))
        # The server may answer early (413, 400) and close while we still send.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(case.data)
        if case.mode == "cut":
            return "cut"
        if case.mode == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return "reset"
        reply = b""
        try:
            while b"\r\n" not in reply:
                more = sock.recv(4096)
                if not more:
                    break
                reply += more
        except ConnectionResetError:
            pass
        except TimeoutError:
            return "no-answer"
    first = reply.split(b"\r\n", 1)[0].split()
    if len(first) >= 2 and first[0].startswith(b"HTTP/") and first[1].isdigit():
        return first[1].decode()
    return "closed" if not reply else "garbled"


@pytest.fixture(scope="module")
def daemon_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, DaemonProcess]]:
    """An up-to-date host (slot a holds release 1.0), socket group ``nogroup``."""
    root = tmp_path_factory.mktemp("control")
    (image,) = make_images(root / "images", 1)
    release = build_release(image, root / "pub", version="1.0", serial=1)
    host = prepare_host(root / "host", release.url, installed=image, socket_group="nogroup")
    daemon = DaemonProcess(host).start()
    try:
        yield host, daemon
    finally:
        daemon.stop()
        host.cleanup()


def _boot_env(host: Host) -> tuple[bytes, bytes]:
    return host.grubenv.read_bytes(), host.grubenv_backup.read_bytes()


def _serving(host: Host) -> bool:
    answer = request(host.socket, "GET", "/v1/status")
    return answer.status == 200 and answer.json()["daemon"]["ready"] is True


def test_malformed_requests_get_4xx_and_the_daemon_serves_on(
    faults: FaultReport, daemon_host: tuple[Host, DaemonProcess]
) -> None:
    """≥10,000 seeded malformed requests: no 5xx, no traceback, no flip, status after."""
    host, daemon = daemon_host
    print(f"\ncontrol-socket fuzzer: seed {SEED}, {REQUESTS} requests, {WORKERS} clients")
    row = faults.add(Row(fault=f"bad input: {REQUESTS} malformed socket requests (seed {SEED})"))
    env_before = _boot_env(host)
    log_before = len(daemon.output())
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        cases = [make_case(SEED, i) for i in range(REQUESTS)]
        for case, outcome in zip(
            cases, pool.map(lambda c: _send(host.socket, c), cases), strict=True
        ):
            outcomes[outcome] += 1
            row.tries += 1
            if outcome.startswith("5") or (case.mode == "answer" and not outcome.isdigit()):
                failures.append(f"seed {SEED} index {case.index}: {outcome}: {case.data[:300]!r}")
    row.seconds = time.perf_counter() - start
    alive = _serving(host)
    env_after = _boot_env(host)
    new_log = daemon.output()[log_before:]
    row.tracebacks = count_tracebacks(new_log)
    row.flips_on_bad_data = int(env_after != env_before)
    row.reported.update({f"HTTP {k}" if k.isdigit() else k: v for k, v in outcomes.items()})
    row.recovered = row.tries if alive else 0
    row.stuck = 0 if alive else 1
    refused_lines = new_log.count('"request_refused"') + new_log.count('"request_malformed"')
    print(f"outcomes: {dict(sorted(outcomes.items()))}; {row.seconds:.1f} s")
    print(f"log: {refused_lines} one-line refusals, {row.tracebacks} tracebacks")
    assert failures == [], "\n".join(failures[:20])
    assert alive
    assert row.tracebacks == 0, new_log[new_log.find("Traceback") - 2000 :][:6000]
    assert '"exception"' not in new_log
    assert row.flips_on_bad_data == 0
    assert row.tries >= 10_000
    assert sum(n for k, n in outcomes.items() if k.startswith("4")) > REQUESTS // 2


def test_non_admin_is_refused_every_change_and_status_scales(
    faults: FaultReport, daemon_host: tuple[Host, DaemonProcess]
) -> None:
    """nobody (socket group, not admin) reads status and gets 403 for every mutating
    endpoint; 1,000 concurrent status calls are all answered."""
    host, daemon = daemon_host
    row = faults.add(Row(fault="control socket: non-admin changes; 1,000 concurrent status"))
    env_before = _boot_env(host)
    log_before = len(daemon.output())
    start = time.perf_counter()
    status = organixctl("status", socket_path=host.socket, user="nobody")
    assert status.returncode == 0, status.stderr
    for command in MUTATING:
        result = organixctl(command, socket_path=host.socket, user="nobody")
        row.tries += 1
        if result.returncode == 4 and "[permission-denied]" in result.stderr:
            row.reported["permission-denied (403)"] += 1
        else:
            pytest.fail(f"{command} as nobody: exit {result.returncode}: {result.stderr}")

    async def hammer() -> tuple[list[int], float]:
        connector = aiohttp.UnixConnector(path=str(host.socket), limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> int:
                async with session.get("http://localhost/v1/status") as response:
                    body = await response.json()
                    assert body["boot"]["booted"] == "a"
                    return response.status

            began = time.perf_counter()
            statuses = await asyncio.gather(*(one() for _ in range(1000)))
            return list(statuses), time.perf_counter() - began

    statuses, seconds = asyncio.run(hammer())
    print(f"\n1000 concurrent status calls: {statuses.count(200)} answered 200 in {seconds:.2f} s")
    row.tries += 1000
    row.reported["status 200"] += statuses.count(200)
    row.recovered = row.tries if _serving(host) else 0
    row.flips_on_bad_data = int(_boot_env(host) != env_before)
    row.tracebacks = count_tracebacks(daemon.output()[log_before:])
    row.seconds = time.perf_counter() - start
    row.fault += f" ({seconds:.2f} s)"
    assert statuses == [200] * 1000
    assert row.reported["permission-denied (403)"] == len(MUTATING)
    assert row.flips_on_bad_data == 0
    assert row.tracebacks == 0
    assert row.recovered == row.tries
