"""A small HTTP/JSON client for the daemon's control socket (standard library only).

``organixctl status`` must start and answer in well under 80 ms, so this module
and every daemon command import nothing beyond a few standard modules and
:mod:`organixmd.apidef` (the API's documents; the standard library only): no
aiohttp, no pydantic, no other ``organixmd`` module, and not even
:mod:`http.client` (with :mod:`email` and :mod:`ssl` it costs a Python start-up
about 25 ms, measured).
The API needs a tiny subset of HTTP, spoken here over the Unix socket: one
HTTP/1.0 request per connection, so the daemon answers with ``Content-Length``
or, for the event stream, with a body that ends when the connection closes
(never chunked).

Answers are read as the documents of :mod:`organixmd.apidef` (:meth:`Answer.document`,
the one place the decoded JSON is given its type; the daemon builds it from the same
definition). Errors become :class:`ClientError` carrying the organixctl exit code; an
RFC 9457 problem from the daemon is printed as ``organixctl: <detail> (<hint>) [code]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, BinaryIO, TypeVar, cast

from organixctl.exitcodes import Exit
from organixmd.apidef import (
    Event,
    Outcome,
    ProblemDoc,
    ProgressCounts,
    ReleaseDoc,
    Route,
)

#: An ``organixmd.apidef`` document (a ``TypedDict``).
D = TypeVar("D")

DEFAULT_SOCKET = "/run/organixm/control.sock"
SOCKET_ENV = "ORGANIXM_SOCKET"
#: Reads answer at once; a check without install waits for the release source.
DEFAULT_TIMEOUT = 120.0
UNREACHABLE_HINT = (
    "is organixm-update.service running? is the socket path right? (--socket or ORGANIXM_SOCKET)"
)
#: Bounds on what the daemon may send, so a confused peer cannot exhaust memory.
MAX_HEADER_LINE = 8192
MAX_HEADERS = 100
MAX_BODY = 64 * 1024 * 1024


class ClientError(Exception):
    """A request that did not produce a usable answer; ``exit_code`` is organixctl's."""

    def __init__(self, message: str, exit_code: int = Exit.ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class Problem(ClientError):
    """The daemon answered with an RFC 9457 problem (``application/problem+json``)."""

    def __init__(self, status: int, code: str, detail: str, hint: str = "") -> None:
        exit_code = Exit.DENIED if status == 403 else Exit.ERROR
        text = detail + (f" ({hint})" if hint else "") + f" [{code}]"
        super().__init__(text, exit_code)
        self.status = status
        self.code = code
        self.detail = detail
        self.hint = hint


class Answer:
    """A complete response: status, content type and body bytes."""

    __slots__ = ("body", "content_type", "status")

    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise ClientError(f"the daemon answered with invalid JSON: {exc}") from exc

    def document(self, kind: type[D]) -> D:
        """The body as the API document ``kind`` (say ``StatusDoc``), trusted unchecked."""
        return cast(D, self.json())


class _Response:
    """The status line and headers of an answer; the body is read from ``stream``."""

    __slots__ = ("headers", "status", "stream")

    def __init__(self, status: int, headers: dict[str, str], stream: BinaryIO) -> None:
        self.status = status
        self.headers = headers
        self.stream = stream

    def read_body(self) -> bytes:
        length = self.headers.get("content-length")
        if length is None:
            data = self.stream.read(MAX_BODY + 1)
            if len(data) > MAX_BODY:
                raise ClientError(f"the daemon's answer exceeds {MAX_BODY} bytes")
            return data
        if not length.isdigit() or int(length) > MAX_BODY:
            raise ClientError(f"the daemon sent an unusable Content-Length: {length!r}")
        data = self.stream.read(int(length))
        if len(data) != int(length):
            raise ClientError("the daemon closed the connection in the middle of an answer")
        return data


def _read_head(stream: BinaryIO) -> _Response:
    status_line = stream.readline(MAX_HEADER_LINE)
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ClientError(f"the daemon sent no HTTP status line (got {status_line[:80]!r})")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        line = stream.readline(MAX_HEADER_LINE)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        raise ClientError(f"the daemon sent more than {MAX_HEADERS} header lines")
    if "chunked" in headers.get("transfer-encoding", ""):
        raise ClientError("the daemon answered an HTTP/1.0 request with a chunked body")
    return _Response(int(parts[1]), headers, stream)


def socket_path(args: argparse.Namespace) -> str:
    """``--socket``, else ``$ORGANIXM_SOCKET``, else the default path."""
    given: str | None = getattr(args, "socket", None)
    return given or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class Client:
    """One request per connection; not thread-safe (a CLI needs neither)."""

    def __init__(self, path: str, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def _connect(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise ClientError(
                f"cannot connect to {self.path}: {exc.strerror} ({UNREACHABLE_HINT})",
                Exit.UNREACHABLE,
            ) from exc
        except PermissionError as exc:
            sock.close()
            raise ClientError(
                f"cannot connect to {self.path}: {exc.strerror} (the socket is open to root "
                "and its group only; run as root or as a member of that group)",
                Exit.DENIED,
            ) from exc
        except OSError as exc:
            sock.close()
            raise ClientError(
                f"cannot connect to {self.path}: {exc} ({UNREACHABLE_HINT})", Exit.UNREACHABLE
            ) from exc
        return sock

    def _exchange(
        self, method: str, target: str, body: dict[str, Any] | None, timeout: float | None
    ) -> tuple[socket.socket, _Response]:
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {target} HTTP/1.0\r\nHost: localhost\r\nAccept: application/json\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        sock = self._connect(timeout)
        try:
            sock.sendall(head.encode() + b"\r\n" + payload)
            return sock, _read_head(sock.makefile("rb"))
        except TimeoutError as exc:
            sock.close()
            raise ClientError(
                f"no answer from {self.path} within {timeout}s (is the daemon stuck? see "
                "journalctl -u organixm-update)",
                Exit.UNREACHABLE,
            ) from exc
        except OSError as exc:
            sock.close()
            raise ClientError(
                f"talking to {self.path} failed: {exc} ({UNREACHABLE_HINT})", Exit.UNREACHABLE
            ) from exc
        except BaseException:
            sock.close()
            raise

    def request(self, method: str, target: str, body: dict[str, Any] | None = None) -> Answer:
        """Send one request and read the whole answer; a problem raises :class:`Problem`."""
        sock, response = self._exchange(method, target, body, self.timeout)
        try:
            data = response.read_body()
        except OSError as exc:
            raise ClientError(f"reading the answer from {self.path} failed: {exc}") from exc
        finally:
            sock.close()
        answer = Answer(response.status, response.headers.get("content-type", ""), data)
        if answer.status >= 400:
            raise _problem(answer)
        return answer

    def get(self, target: str) -> Answer:
        return self.request("GET", target)

    def post(self, target: str, body: dict[str, Any] | None = None) -> Answer:
        return self.request("POST", target, body if body is not None else {})

    def events(self) -> Iterator[tuple[bytes, Event]]:
        """Follow ``GET /v1/events``: (raw line, parsed event) until the daemon closes it."""
        sock, response = self._exchange("GET", Route.EVENTS, None, self.timeout)
        try:
            if response.status >= 400:
                raise _problem(Answer(response.status, "", response.read_body()))
            # Events come when something happens: wait for them without a deadline.
            sock.settimeout(None)
            while True:
                try:
                    line = response.stream.readline(MAX_BODY)
                except OSError as exc:
                    raise ClientError(
                        f"the event stream from {self.path} broke: {exc}", Exit.UNREACHABLE
                    ) from exc
                if not line:
                    return
                line = line.strip()
                if not line:
                    continue
                try:
                    event = cast(Event, json.loads(line))
                except ValueError as exc:
                    raise ClientError(f"the daemon sent an invalid event line: {exc}") from exc
                yield line, event
        finally:
            sock.close()


def _problem(answer: Answer) -> ClientError:
    try:
        data = json.loads(answer.body)
    except ValueError:
        data = None
    if isinstance(data, dict) and "code" in data:
        # Any JSON object with a code is shown as a problem (so a proxy's or an older
        # daemon's answer still is): its fields are read with defaults.
        problem = cast(ProblemDoc, data)
        return Problem(
            answer.status,
            str(problem["code"]),
            str(problem.get("detail", "")),
            str(problem.get("hint", "") or ""),
        )
    text = answer.body.decode(errors="replace").strip()[:200]
    return ClientError(f"the daemon answered HTTP {answer.status}: {text}")


# ---------------------------------------------------------------------------- command plumbing


def add_socket_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the daemon's control socket (default ${SOCKET_ENV} or {DEFAULT_SOCKET})",
    )


def add_epilog(parser: argparse.ArgumentParser, exits: dict[int, str]) -> None:
    """End ``--help`` with the command's exit codes and where the socket is."""
    codes: dict[int, str] = {
        Exit.ERROR: "the daemon refused or failed the request (the message ends in [code])",
        Exit.UNREACHABLE: "the daemon is unreachable",
        Exit.DENIED: "permission denied: changes need root or the admin group",
        Exit.USAGE: "usage error",
    }
    codes.update(exits)
    lines = "".join(f"  {code:>2}  {text}\n" for code, text in sorted(codes.items()))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        f"exit status:\n{lines}\n"
        f"The socket is --socket PATH, else ${SOCKET_ENV}, else {DEFAULT_SOCKET}.\n"
        "See docs/operations.md for the API, the verdict codes and troubleshooting."
    )


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer unchanged")


def run_with_client(
    args: argparse.Namespace,
    body: Callable[[Client], int],
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> int:
    """Run ``body`` with a client for the chosen socket; print errors, return the exit code."""
    try:
        return body(Client(socket_path(args), timeout))
    except ClientError as exc:
        print(f"organixctl: {exc.message}", file=sys.stderr)
        return exc.exit_code


def add_action_arguments(parser: argparse.ArgumentParser, done: str) -> None:
    """The options of a command that POSTs one action: --json, --socket, exit codes."""
    add_json_argument(parser)
    add_socket_argument(parser)
    add_epilog(parser, {Exit.OK: done})


def run_action(
    args: argparse.Namespace,
    target: Route,
    kind: type[D],
    describe: Callable[[D], str],
    body: dict[str, Any] | None = None,
) -> int:
    """POST ``body`` to ``target``; print the raw answer (--json) or ``describe(answer)``,
    the answer read as the document ``kind``."""

    def call(client: Client) -> int:
        answer = client.post(target, body)
        if args.json:
            print_raw(answer)
        else:
            print(describe(answer.document(kind)))
        return Exit.OK

    return run_with_client(args, call)


def print_raw(answer: Answer) -> None:
    """Write the daemon's answer byte for byte (``--json``)."""
    sys.stdout.buffer.write(answer.body)
    if not answer.body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


#: Outcomes that leave an update to boot (exit 1), and those of a check that failed (2).
_UPDATE_OUTCOMES = frozenset({Outcome.AVAILABLE, Outcome.INSTALLING, Outcome.STAGED})
_FAILED_OUTCOMES = frozenset({Outcome.BLOCKED, Outcome.ERROR})


def verdict_exit(outcome: Outcome | None) -> int:
    """The exit code for a verdict: 0 up to date, 1 available or staged, 2 blocked or error."""
    # A decoded outcome is a plain string; it equals (and hashes as) its member.
    if outcome in _UPDATE_OUTCOMES:
        return Exit.UPDATE_AVAILABLE
    if outcome in _FAILED_OUTCOMES:
        return Exit.ERROR
    return Exit.OK


# ---------------------------------------------------------------------------- formatting


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{int(count)} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def format_time(value: str | None, now: datetime | None = None) -> str:
    """``2026-01-01 10:00:00 UTC (5m00s ago)``; ``never`` for no time."""
    moment = parse_time(value)
    if moment is None:
        return "never"
    now = now or datetime.now(UTC)
    delta = (moment - now).total_seconds()
    relative = f"in {format_duration(delta)}" if delta > 0 else f"{format_duration(-delta)} ago"
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({relative})"


def describe_release(release: ReleaseDoc | None) -> str:
    if release is None:
        return "-"
    return f"{release['version']} (serial {release['serial']})"


def describe_progress(progress: ProgressCounts, phase: str = "", eta: float | None = None) -> str:
    """``<done> of <total> (<%>) at <rate>/s, ETA <eta>``; the ETA (the status has it,
    progress events do not) is estimated from the rate when not given."""
    done = progress["bytes_done"]
    total = progress["bytes_total"]
    rate = float(progress["rate"])
    percent = f" ({100 * done / total:.0f}%)" if total else ""
    text = f"{format_bytes(done)} of {format_bytes(total)}{percent} at {format_bytes(rate)}/s"
    if eta is None and rate > 0 and total > done:
        eta = (total - done) / rate
    if eta is not None:
        text += f", ETA {format_duration(float(eta))}"
    reused = progress["reused"]
    if reused:
        downloaded = progress["downloaded"]
        text += (
            f"; delta: {format_bytes(reused)} reused locally, {format_bytes(downloaded)} downloaded"
        )
    return f"{phase}: {text}" if phase else text
