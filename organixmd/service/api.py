"""The control socket: HTTP/JSON over a Unix socket, versioned under ``/v1``.

=================  ======  =====================================================
path               method  what
=================  ======  =====================================================
/v1/status         GET     booted slot and why, slots, phase, progress, verdict
/v1/history        GET     past installs, flips, commits, fallbacks; failed list
/v1/events         GET     a stream of events, one JSON object per line
/v1/check          POST    check now (install nothing); answers the verdict
/v1/update         POST    check and install in the background (202); 409 if busy
/v1/cancel         POST    cancel the running check or install
/v1/mark-good      POST    commit the booted trial slot
/v1/mark-bad       POST    mark the booted slot bad (reboot by policy)
/v1/rollback       POST    boot the other committed slot next
/metrics           GET     Prometheus text format
=================  ======  =====================================================

Reads are open to whoever can connect (the socket is mode 0660, group
``daemon.socket_group``). Changes need uid 0 or membership of
``daemon.admin_group``, checked with ``SO_PEERCRED``. Errors are RFC 9457
``application/problem+json`` with a stable ``code``; no tracebacks leave the
daemon. Every refused request is logged as one line (``request_refused``, or
``request_malformed`` for bytes that are not HTTP), without a traceback: a
client's mistake is not the daemon's. Only a bug in the daemon is logged with
its traceback. The documents served are defined (as ``TypedDict`` classes) in
``organixmd.apidef`` and described in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from pydantic import TypeAdapter

from organixmd import __version__
from organixmd.apidef import (
    API_VERSION,
    CancelAnswer,
    CheckAnswer,
    Event,
    FailedDoc,
    HistoryDoc,
    HistoryEntryDoc,
    MarkBadAnswer,
    MarkGoodAnswer,
    Outcome,
    ProblemDoc,
    ReleaseDoc,
    RollbackAnswer,
    Route,
    SlotDoc,
    StatusDoc,
    StatusEvent,
    UpdateStarted,
    VerdictDoc,
)
from organixmd.base.errors import BadRequest, Busy, ConfigError, OrganixmError, PermissionDenied
from organixmd.base.jsondepth import too_deep
from organixmd.base.logsetup import get_logger
from organixmd.base.slotname import SLOTS, SlotName

if TYPE_CHECKING:
    from organixmd.base.config import DaemonConfig
    from organixmd.host.bootmanager import BootManager, Reboot
    from organixmd.host.engine import Engine
    from organixmd.host.state import FailedRelease, HistoryEntry, ReleaseRef, Verdict

MAX_BODY = 16 * 1024
#: Request bodies are flat objects of flags; deeper JSON is refused before decoding.
MAX_BODY_DEPTH = 8
#: Paths in log lines are cut to this length (a request line may be 8 KiB).
LOG_PATH_CHARS = 200
EVENT_QUEUE = 256

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class EventHub:
    """Fan-out of daemon events to ``/v1/events`` subscribers (bounded queues)."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def listen(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """Call ``listener(kind, fields)`` after each event is queued for the subscribers."""
        self._listeners.append(listener)

    def publish(self, kind: str, fields: dict[str, Any]) -> None:
        """Queue ``{"event": kind, "at": now, **fields}`` for every subscriber.

        The engine's ``phase``, ``progress`` and ``verdict`` fields are those of the
        ``organixmd.apidef`` event documents (tests/test_apidef.py compares them).
        """
        data = {"event": kind, "at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        data.update(fields)
        event = cast(Event, data)
        for queue in self._subscribers:
            if queue.full():
                # A slow reader loses the oldest progress events, never blocks the daemon.
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)
        for listener in self._listeners:
            listener(kind, fields)

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(EVENT_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)

    def close(self) -> None:
        """Send every subscriber a last ``stopping`` event; their streams then end.

        Without it a stream handler waits for an event forever and shutdown waits for it.
        """
        self.publish("stopping", {})


def problem(status: int, code: str, detail: str, hint: str = "") -> web.Response:
    body: ProblemDoc = {
        "type": f"urn:organixm:error:{code}",
        "title": code.replace("-", " "),
        "status": status,
        "code": code,
        "detail": detail,
    }
    if hint:
        body["hint"] = hint
    return web.json_response(body, status=status, content_type="application/problem+json")


def peer_credentials(request: web.Request) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process on the other end of the Unix socket."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _group_id(name: str, key: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError as exc:
        setting = key.rsplit(".", 1)[-1]
        raise ConfigError(
            f"{key}: no group named {name!r} on this host",
            hint=f"set {setting} to an existing group (e.g. 'root' or 'sudo') "
            "in the [daemon] section",
        ) from exc


def is_admin(uid: int, gid: int, admin_gid: int) -> bool:
    if uid == 0 or gid == admin_gid:
        return True
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return admin_gid in os.getgrouplist(user.pw_name, gid)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def json_response(data: Mapping[str, object], status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, default=_json_default, indent=1),
        status=status,
        content_type="application/json",
    )


#: Times in documents built from the state's models are written as pydantic writes them
#: (``...Z`` for UTC), the others (daemon start, checks) with ``isoformat``.
_MODEL_TIME = TypeAdapter(datetime)


def _model_time(value: datetime) -> str:
    return cast(str, _MODEL_TIME.dump_python(value, mode="json"))


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def release_doc(ref: ReleaseRef) -> ReleaseDoc:
    return {
        "version": ref.version,
        "serial": ref.serial,
        "uuid": ref.uuid,
        "sha256": ref.sha256,
        "size": ref.size,
        "legacy": ref.legacy,
    }


def verdict_doc(verdict: Verdict) -> VerdictDoc:
    return {
        "outcome": Outcome(verdict.outcome),
        "code": verdict.code,
        "message": verdict.message,
        "release": release_doc(verdict.release) if verdict.release else None,
        "at": _model_time(verdict.at),
    }


def history_entry_doc(entry: HistoryEntry) -> HistoryEntryDoc:
    return {
        "at": _model_time(entry.at),
        "event": entry.event,
        "slot": entry.slot,
        "release": release_doc(entry.release) if entry.release else None,
        "detail": entry.detail,
    }


def failed_doc(entry: FailedRelease) -> FailedDoc:
    return {
        "release": release_doc(entry.release),
        "reason": entry.reason,
        "at": _model_time(entry.at),
    }


class _ProtocolLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's connection-level logger: a client's mistake is one line, a bug a traceback.

    aiohttp answers bytes it cannot parse as HTTP (a bad request line, an oversized
    header) with a 400 itself, and logs the parser's exception, as it logs a client
    that went away before its answer was written, with ``logger.exception``.
    """

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        log = get_logger("organixmd.api")
        if isinstance(exc_info, HttpProcessingError):
            # The request's only line: the middleware never saw it.
            log.info("request_malformed", status=exc_info.code, error=exc_info.message[:200])
        elif isinstance(exc_info, ConnectionError):
            log.info("request_aborted", error=str(exc_info)[:200])
        elif isinstance(exc_info, RequestPayloadError):
            # The rest of a body the middleware already refused (and logged) is unreadable.
            log.debug("request_body_unread", error=_payload_error(exc_info))
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)


def _payload_error(exc: Exception) -> str:
    """What was wrong with a request body: aiohttp wraps the parser's error."""
    cause = exc.__cause__ if isinstance(exc, RequestPayloadError) else exc
    if isinstance(cause, HttpProcessingError):
        return cause.message.strip()[:200]
    return str(cause).strip()[:200]


class Controls(Protocol):
    """What the control socket serves from: the daemon's parts and its run state."""

    @property
    def engine(self) -> Engine: ...
    @property
    def manager(self) -> BootManager: ...
    @property
    def reboot(self) -> Reboot: ...
    @property
    def hub(self) -> EventHub: ...
    @property
    def stop(self) -> asyncio.Event: ...
    @property
    def started(self) -> datetime: ...
    @property
    def ready(self) -> bool: ...
    @property
    def next_check(self) -> datetime | None: ...

    def start_update(self, *, force: bool, reboot: bool) -> asyncio.Task[Verdict]: ...


class ControlServer:
    """The aiohttp application on the control socket."""

    def __init__(self, config: DaemonConfig, source_url: str, daemon: Controls) -> None:
        self.config = config
        self.source_url = source_url
        self.daemon = daemon
        self.path: Path = config.socket
        self.socket_gid = _group_id(config.socket_group, "daemon.socket_group")
        self.admin_gid = _group_id(config.admin_group, "daemon.admin_group")
        self.log = get_logger("organixmd.api")
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------------ lifecycle

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        app.router.add_get(Route.STATUS, self.status)
        app.router.add_get(Route.HISTORY, self.history)
        app.router.add_get(Route.EVENTS, self.events)
        app.router.add_post(Route.CHECK, self._admin(self.check))
        app.router.add_post(Route.UPDATE, self._admin(self.update))
        app.router.add_post(Route.CANCEL, self._admin(self.cancel))
        app.router.add_post(Route.MARK_GOOD, self._admin(self.mark_good))
        app.router.add_post(Route.MARK_BAD, self._admin(self.mark_bad))
        app.router.add_post(Route.ROLLBACK, self._admin(self.rollback))
        app.router.add_get(Route.METRICS, self.metrics)
        return app

    async def start(self) -> None:
        """Listen on the socket. Raises ConfigError when the path cannot be used."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"daemon.socket: cannot create {self.path.parent}: {exc.strerror or exc}",
                hint="set socket to a path in a directory the daemon may create",
            ) from exc
        with contextlib.suppress(FileNotFoundError):
            # A socket left by a killed daemon; nothing else may live at this path.
            if self.path.is_socket():
                self.path.unlink()
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            logger=_ProtocolLog(logging.getLogger("aiohttp.server"), {}),
        )
        await self._runner.setup()
        # Create the socket with no access for others, then open it to the group.
        old_umask = os.umask(0o117)
        try:
            site = web.UnixSite(self._runner, str(self.path), backlog=1024)
            await site.start()
            os.chown(self.path, 0 if os.geteuid() == 0 else -1, self.socket_gid)
            os.chmod(self.path, 0o660)
        except OSError as exc:
            raise ConfigError(
                f"daemon.socket: cannot listen on {self.path}: {exc.strerror or exc}",
                hint="set socket to a path in a directory the daemon may write (e.g. "
                "/run/organixm/control.sock; paths are limited to 107 bytes)",
            ) from exc
        finally:
            os.umask(old_umask)

    async def stop(self) -> None:
        self.daemon.hub.close()
        try:
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
        finally:
            # Even when cleanup runs out of time, no socket is left behind; whatever
            # else a misconfigured socket path names is not ours to remove.
            with contextlib.suppress(FileNotFoundError):
                if self.path.is_socket():
                    self.path.unlink()

    # ------------------------------------------------------------------ middleware

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path[:LOG_PATH_CHARS]
        try:
            return await handler(request)
        except OrganixmError as exc:
            status, code, detail, hint = exc.status, exc.code, exc.message, exc.advice
        except web.HTTPRequestEntityTooLarge:
            status, code = 413, "request-too-large"
            detail, hint = f"request bodies are limited to {MAX_BODY} bytes", ""
        except web.HTTPNotFound:
            status, code, detail, hint = 404, "not-found", f"no such endpoint: {path}", ""
        except web.HTTPMethodNotAllowed as exc:
            status, code = 405, "method-not-allowed"
            detail, hint = f"{request.method} {path}: {exc}", ""
        except web.HTTPException as exc:
            status, code, detail, hint = exc.status, "http-error", exc.reason, ""
        except (HttpProcessingError, RequestPayloadError) as exc:
            # The body could not be read as sent (a broken chunked, gzip or deflate
            # encoding): the client's mistake.
            status, code, hint = 400, "bad-request", ""
            detail = f"the request body could not be read: {_payload_error(exc)}"
        except ConnectionError as exc:
            # The client went away mid-request; nobody reads the answer.
            status, code, hint = 400, "client-disconnected", ""
            detail = f"the connection closed before the request was read: {exc}"
        except Exception as exc:
            # A bug in the daemon: the only case logged with its traceback. The client
            # gets a code, never a traceback.
            self.log.exception("request_failed", method=request.method, path=path)
            return problem(500, "internal-error", f"{type(exc).__name__} while serving the request")
        self.log.info("request_refused", method=request.method, path=path, status=status, code=code)
        return problem(status, code, detail, hint)

    def _admin(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            creds = peer_credentials(request)
            if creds is None or not is_admin(creds[1], creds[2], self.admin_gid):
                uid = creds[1] if creds else "unknown"
                raise PermissionDenied(
                    f"uid {uid} may read status but not change anything",
                    hint=f"run as root or as a member of group {self.config.admin_group!r}",
                )
            return await handler(request)

        return guarded

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        """The request's JSON object (``{}`` without a body), bounded before decoding."""
        if not request.can_read_body:
            return {}
        raw = await request.read()
        if not raw:
            return {}
        if "Content-Type" in request.headers and not (
            request.content_type == "application/json" or request.content_type.endswith("+json")
        ):
            raise BadRequest(
                f"the request body must be JSON (Content-Type: application/json), "
                f"not {request.content_type[:100]!r}"
            )
        deep = too_deep(raw, MAX_BODY_DEPTH)
        if deep is not None:
            raise BadRequest(
                f"the request body nests deeper than {MAX_BODY_DEPTH} levels (at byte {deep})"
            )
        try:
            # JSON is UTF-8 (RFC 8259) whatever charset the header names.
            data = json.loads(raw.decode("utf-8"))
        except ValueError as exc:
            # UnicodeDecodeError and JSONDecodeError are both ValueErrors; so is an
            # integer longer than Python converts.
            raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object")
        return data

    @staticmethod
    def _flag(body: dict[str, Any], name: str) -> bool:
        value = body.get(name, False)
        if not isinstance(value, bool):
            raise BadRequest(f"{name!r} must be true or false")
        return value

    # ------------------------------------------------------------------ reads

    async def status(self, request: web.Request) -> web.Response:
        return json_response(await self.daemon_status())

    async def daemon_status(self) -> StatusDoc:
        daemon = self.daemon
        engine = daemon.engine
        manager = daemon.manager
        boot_state = await manager.read()
        report = manager.report
        slots: dict[SlotName, SlotDoc] = {}
        for name in SLOTS:
            record = engine.state.slots.get(name)
            grub = boot_state.slot(name) if boot_state is not None else None
            slots[name] = {
                "device": str(engine.slots[name].path),
                "state": grub.state if grub else None,
                "tries_left": grub.tries_left if grub else None,
                "status": record.status if record else None,
                "release": release_doc(record.release) if record else None,
            }
        progress = engine.progress
        verdict = engine.state.last_verdict
        error = engine.last_error
        return {
            "api": API_VERSION,
            "daemon": {
                "version": __version__,
                "pid": os.getpid(),
                "started": daemon.started.isoformat(),
                "ready": daemon.ready,
            },
            "source": self.source_url,
            "boot": {
                "booted": report.booted,
                "reason": report.reason,
                "trial_try": report.trial_try,
                "on_trial": report.on_trial,
                "explanation": report.explanation,
                "next_slot": boot_state.next_slot if boot_state else None,
                "env_copy": boot_state.source if boot_state else None,
            },
            "slots": slots,
            "phase": engine.phase.value,
            "current": release_doc(engine.current) if engine.current else None,
            "progress": None
            if progress is None
            else {
                "bytes_done": progress.bytes_done,
                "bytes_total": progress.bytes_total,
                "rate": round(progress.rate),
                "eta": None if progress.eta is None else round(progress.eta, 1),
                "downloaded": progress.downloaded,
                "reused": progress.reused,
            },
            "last_check": _time(engine.state.last_check),
            "next_check": _time(daemon.next_check),
            "verdict": verdict_doc(verdict) if verdict else None,
            "last_error": None
            if error is None
            else {"code": error.code, "message": error.message, "hint": error.advice},
            "reboot_pending": daemon.reboot.pending,
            "failed_releases": len(engine.state.failed),
        }

    async def history(self, request: web.Request) -> web.Response:
        state = self.daemon.engine.state
        answer: HistoryDoc = {
            "history": [history_entry_doc(entry) for entry in state.history],
            "failed": [failed_doc(entry) for entry in state.failed],
        }
        return json_response(answer)

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        queue = self.daemon.hub.subscribe()
        try:
            first: StatusEvent = {"event": "status", **(await self.daemon_status())}
            await response.write((json.dumps(first, default=_json_default) + "\n").encode())
            while not self.daemon.stop.is_set():
                event = await queue.get()
                await response.write((json.dumps(event, default=_json_default) + "\n").encode())
                if event["event"] == "stopping":
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.daemon.hub.unsubscribe(queue)
        return response

    async def metrics(self, request: web.Request) -> web.Response:
        from organixmd.service.metrics import render

        status = await self.daemon_status()
        return web.Response(
            text=render(status, self.daemon.engine.state, self.daemon.engine.counters),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Version": "0.0.4"},
        )

    # ------------------------------------------------------------------ changes

    async def check(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        force = self._flag(body, "force")
        verdict = await self.daemon.engine.check(install=False, force=force)
        answer: CheckAnswer = {"verdict": verdict_doc(verdict)}
        return json_response(answer)

    async def update(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        # Every flag is validated before anything starts: a 400 must not leave an update running.
        force, reboot, wait = (self._flag(body, name) for name in ("force", "reboot", "wait"))
        task = self.daemon.start_update(force=force, reboot=reboot)
        if wait:
            verdict = await asyncio.shield(task)
            waited: CheckAnswer = {"verdict": verdict_doc(verdict)}
            return json_response(waited)
        started: UpdateStarted = {"started": True}
        return json_response(started, status=202)

    async def cancel(self, request: web.Request) -> web.Response:
        answer: CancelAnswer = {"cancelled": self.daemon.engine.request_cancel()}
        return json_response(answer)

    async def mark_good(self, request: web.Request) -> web.Response:
        state = await self.daemon.manager.mark_good()
        answer: MarkGoodAnswer = {
            "committed": self.daemon.manager.booted,
            "next_slot": state.next_slot,
        }
        return json_response(answer)

    async def mark_bad(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        reason = body.get("reason", "marked bad by an admin")
        if not isinstance(reason, str) or len(reason) > 200:
            raise BadRequest("'reason' must be a string of at most 200 characters")
        state = await self.daemon.manager.mark_bad(reason, force=self._flag(body, "force"))
        rebooting = await self.daemon.reboot.request(f"slot marked bad: {reason}")
        answer: MarkBadAnswer = {
            "marked_bad": self.daemon.manager.booted,
            "next_slot": state.next_slot,
            "rebooting": rebooting,
        }
        return json_response(answer)

    async def rollback(self, request: web.Request) -> web.Response:
        state = await self.daemon.manager.rollback()
        answer: RollbackAnswer = {"next_slot": state.next_slot}
        return json_response(answer)


__all__ = ["Busy", "ControlServer", "EventHub"]
