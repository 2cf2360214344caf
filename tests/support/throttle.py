"""A throttling TCP proxy on 127.0.0.1: a fault-injecting hop in front of a real server.

nginx's ``limit_rate`` sends in bursts once a second, too coarse to stop a download at a
chosen byte. :class:`Throttle` forwards requests as they come and sends the answers at
:attr:`Throttle.rate` bytes per second in small, evenly spaced pieces; the rate can be
changed between (or during) downloads. Each connection is served by two threads that end
when either side closes.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class Throttle:
    """Listens on ``url``; forwards to ``127.0.0.1:upstream_port``.

    With ``shared`` the rate is that of one link all connections share (a host's
    uplink), else each connection gets it.
    """

    def __init__(self, upstream_port: int, *, shared: bool = False) -> None:
        self.upstream_port = upstream_port
        #: Bytes per second sent to clients; ``None``: as fast as the upstream sends.
        self.rate: float | None = None
        self.shared = shared
        self._link_lock = threading.Lock()
        #: When the shared link is free again (time.monotonic()).
        self._link_free = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            for source, sink, throttled in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pipe, args=(source, sink, throttled), daemon=True
                ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        try:
            while True:
                rate = self.rate if throttled else None
                # About 50 pieces a second at the current rate, so progress is smooth.
                piece = 65536 if rate is None else max(256, min(65536, int(rate / 50)))
                data = source.recv(piece)
                if not data:
                    break
                if rate is not None and self.shared:
                    with self._link_lock:
                        until = max(time.monotonic(), self._link_free) + len(data) / rate
                        self._link_free = until
                    time.sleep(max(0.0, until - time.monotonic()))
                sink.sendall(data)
                if rate is not None and not self.shared:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
