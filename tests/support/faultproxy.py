"""A fault-injecting TCP proxy on 127.0.0.1, put in front of the real nginx or moto.

The daemon talks to the proxy's port; the proxy forwards every byte to the real
server and back, unless a :class:`Fault` is set, which then applies to each new
connection (to the first ``connections`` of them, or to all until cleared):

``reset``  forward ``after`` bytes of the answer, then reset the connection (an RST,
           through ``SO_LINGER`` 0), as a dying middlebox or server does;
``cut``    forward ``after`` bytes, then close cleanly (FIN): a truncated answer;
``stall``  forward ``after`` bytes, then nothing more, holding both sockets open
           until the fault is cleared (longer than the client's read timeout);
``drip``   forward ``after`` bytes at once, the rest at ``rate`` bytes per second
           (a slow link, or one that becomes slow mid-download);
``refuse`` the listener is closed: connecting is refused (``ECONNREFUSED``);
``http``   answer the first request on the connection with a canned HTTP
           ``status`` (403, 404, 500, 503) and close, without asking the server;
``garbage`` forward ``after`` bytes, then as many seeded random bytes as the server
           sends (the lengths still agree; the bytes do not);
``length`` forward everything, but every ``Content-Length`` header the server sends is
           off by ``delta`` bytes (a broken middlebox).

Byte counts are of the server's answer (server → client) on that connection, from
its first byte, so a kept-alive connection counts the meta before the image.

The proxy runs its own event loop in a thread (the test's code stays synchronous)
and keeps a record of every connection (:attr:`FaultProxy.connections`). Use it as
a context manager; the listening port stays the same for its whole life, through
``refuse`` and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

FaultKind = Literal["reset", "cut", "stall", "drip", "refuse", "http", "garbage", "length"]
READ_SIZE = 64 * 1024
#: A request head longer than this is not HTTP the proxy answers; it is cut.
MAX_HEAD = 64 * 1024
#: How long a stalled connection is held at most if nobody clears the fault.
MAX_STALL = 300.0

_REASONS = {
    403: "Forbidden",
    404: "Not Found",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
_CONTENT_LENGTH = re.compile(rb"(?i)(\r\ncontent-length:[ \t]*)(\d+)")


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    #: reset, cut, stall, drip: bytes of the answer forwarded before the fault.
    after: int = 0
    #: drip: bytes per second.
    rate: int = 0
    #: http: the status answered.
    status: int = 503
    #: length: what every Content-Length header is off by.
    delta: int = 0
    #: Apply to this many new connections, then forward normally; ``None``: all until cleared.
    connections: int | None = None

    def describe(self) -> str:
        if self.kind in ("reset", "cut", "stall"):
            detail = f"{self.kind} after {self.after} bytes"
        elif self.kind == "garbage":
            detail = f"garbage after {self.after} bytes"
        elif self.kind == "length":
            detail = f"Content-Length off by {self.delta:+d}"
        elif self.kind == "drip":
            detail = f"drip at {self.rate} B/s" + (
                f" after {self.after} bytes" if self.after else ""
            )
        elif self.kind == "http":
            detail = f"HTTP {self.status}"
        else:
            detail = "refuse connections"
        if self.connections is not None:
            detail += f" (first {self.connections} connections)"
        return detail


@dataclass(slots=True)
class ConnectionRecord:
    """What happened on one proxied connection."""

    fault: Fault | None
    #: Bytes of the answer (server → client) forwarded.
    down: int = 0
    #: Bytes of the request (client → server) forwarded.
    up: int = 0
    #: ``forwarded`` (no fault hit), or the fault's kind once it hit.
    outcome: str = "open"
    #: The request heads seen on this connection (first line only), for ``http`` faults.
    requests: list[str] = field(default_factory=list)
    #: drip: when the paced forwarding began.
    dripped_since: float | None = None


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``; see the module docstring."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.connections: list[ConnectionRecord] = []
        self._lock = threading.Lock()
        self._fault: Fault | None = None
        self._remaining: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._lifted: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ control (any thread)

    def __enter__(self) -> Self:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._lifted = asyncio.Event()
            loop.run_until_complete(self._listen())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault proxy did not start listening within 10 s")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop = self._loop
        if loop is not None and self._thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(30)

    def set_fault(self, fault: Fault) -> None:
        """Apply ``fault`` to new connections (``refuse`` closes the listener now)."""
        with self._lock:
            self._fault = fault
            self._remaining = fault.connections
        self._call(self._close_listener() if fault.kind == "refuse" else self._listen())

    def clear(self) -> None:
        """Lift the fault: forward normally, listen again, end stalled connections."""
        with self._lock:
            self._fault = None
            self._remaining = None
        self._call(self._lift())

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # ------------------------------------------------------------------ the loop's side

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_listener(self) -> None:
        if self._server is not None:
            # close() stops listening at once; wait_closed() would also wait for the
            # open connections (Python 3.12), which a stall holds on purpose.
            self._server.close()
            self._server = None

    async def _lift(self) -> None:
        assert self._lifted is not None
        self._lifted.set()
        self._lifted = asyncio.Event()
        await self._listen()

    async def _shutdown(self) -> None:
        await self._close_listener()
        # Every task of this loop, not only the handlers that began: a connection
        # accepted just before the stop has a handler task that never ran, and a loop
        # closed over it prints "Task was destroyed but it is pending".
        current = asyncio.current_task()
        while pending := [task for task in asyncio.all_tasks() if task is not current]:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _take_fault(self) -> Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None or fault.kind == "refuse":
                return None
            if self._remaining is not None:
                if self._remaining <= 0:
                    return None
                self._remaining -= 1
            return fault

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        fault = self._take_fault()
        record = ConnectionRecord(fault=fault)
        with self._lock:
            self.connections.append(record)
        try:
            if fault is not None and fault.kind == "http":
                await self._answer_canned(reader, writer, fault, record)
                return
            await self._forward(reader, writer, fault, record)
        except (ConnectionError, OSError):
            if record.outcome == "open":
                record.outcome = "client or server went away"
        except asyncio.CancelledError:
            # Only the proxy's shutdown cancels a connection; asyncio's stream callback
            # would report a cancelled handler as an error.
            if record.outcome == "open":
                record.outcome = "proxy stopped"
        finally:
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()
            # Last: until here the shutdown must wait for this task, or the loop closes
            # over it ("Task was destroyed but it is pending").
            self._tasks.discard(task)

    async def _answer_canned(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fault: Fault,
        record: ConnectionRecord,
    ) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
            piece = await reader.read(READ_SIZE)
            if not piece:
                break
            head += piece
        record.up = len(head)
        record.requests.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
        body = f"{fault.status} {_REASONS.get(fault.status, 'Error')} (fault proxy)\n".encode()
        writer.write(
            f"HTTP/1.1 {fault.status} {_REASONS.get(fault.status, 'Error')}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        record.down = len(body)
        record.outcome = "http"

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fault: Fault | None,
        record: ConnectionRecord,
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            record.outcome = "upstream refused"
            return
        upload = asyncio.create_task(self._pump_up(reader, up_writer, record))
        try:
            await self._pump_down(up_reader, writer, fault, record)
        finally:
            upload.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await upload
            up_writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await up_writer.wait_closed()

    @staticmethod
    async def _pump_up(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: ConnectionRecord
    ) -> None:
        while piece := await reader.read(READ_SIZE):
            record.up += len(piece)
            writer.write(piece)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def _pump_down(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fault: Fault | None,
        record: ConnectionRecord,
    ) -> None:
        limit = (
            fault.after if fault is not None and fault.kind in ("reset", "cut", "stall") else None
        )
        if limit is not None and limit == 0:
            await self._hit(writer, fault, record)
            return
        garbage = (
            random.Random(fault.after) if fault is not None and fault.kind == "garbage" else None
        )
        while piece := await reader.read(READ_SIZE):
            if fault is not None and fault.kind == "length":
                piece = _CONTENT_LENGTH.sub(
                    lambda m: m.group(1) + str(max(0, int(m.group(2)) + fault.delta)).encode(),
                    piece,
                )
                record.outcome = "length"
            if garbage is not None and fault is not None and record.down + len(piece) > fault.after:
                keep = max(0, fault.after - record.down)
                piece = piece[:keep] + garbage.randbytes(len(piece) - keep)
                record.outcome = "garbage"
            if limit is not None and record.down + len(piece) >= limit:
                piece = piece[: limit - record.down]
                writer.write(piece)
                record.down += len(piece)
                await writer.drain()
                await self._hit(writer, fault, record)
                return
            if fault is not None and fault.kind == "drip":
                await self._drip(writer, piece, fault, record)
            else:
                writer.write(piece)
                record.down += len(piece)
                await writer.drain()
        if record.outcome == "open":
            record.outcome = "forwarded"

    @staticmethod
    async def _drip(
        writer: asyncio.StreamWriter, piece: bytes, fault: Fault, record: ConnectionRecord
    ) -> None:
        """Forward ``piece``: the first ``after`` bytes of the answer at once, the rest in
        50 ms steps, so that the dripped part averages ``rate`` bytes per second."""
        fast = max(0, fault.after - record.down)
        if fast:
            writer.write(piece[:fast])
            record.down += len(piece[:fast])
            await writer.drain()
            piece = piece[fast:]
        if not piece:
            return
        if record.dripped_since is None:
            record.dripped_since = time.monotonic()
        step = max(1, fault.rate // 20)
        for start in range(0, len(piece), step):
            part = piece[start : start + step]
            due = record.dripped_since + (record.down - fault.after + len(part)) / fault.rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(part)
            record.down += len(part)
            await writer.drain()

    async def _hit(
        self, writer: asyncio.StreamWriter, fault: Fault | None, record: ConnectionRecord
    ) -> None:
        assert fault is not None
        record.outcome = fault.kind
        if fault.kind == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # Linger 0: close() sends an RST instead of a FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif fault.kind == "cut":
            writer.close()
        else:
            # stall: hold the connection, send nothing, until the fault is lifted.
            lifted = self._lifted
            assert lifted is not None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(MAX_STALL):
                    await lifted.wait()
            writer.transport.abort()
