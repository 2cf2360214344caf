"""A real nginx on 127.0.0.1 serving a directory, for the HTTP source's tests and benchmarks.

nginx runs in the foreground (``daemon off``) with its own prefix, configuration,
pid file and temp directories under a private work directory, so several can run
side by side and none touches the system's nginx. The access log records the
status, the bytes sent and the request's ``Range`` and ``If-None-Match`` headers, so
tests can assert what the client asked for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.s3 import free_port

#: One access-log line per request, tab-separated (see :class:`AccessLogEntry`).
LOG_FORMAT = (
    "$request_method\\t$uri\\t$status\\t$body_bytes_sent\\t$http_range\\t$http_if_none_match"
)


#: The readiness probe's path; left out of :meth:`Nginx.requests`.
PROBE = "/.organixm-readiness-probe"


@dataclass(frozen=True, slots=True)
class AccessLogEntry:
    method: str
    path: str
    status: int
    body_bytes: int
    #: The request's Range header, ``""`` when there was none.
    range: str
    #: The request's If-None-Match header, ``""`` when there was none.
    if_none_match: str

    @property
    def range_start(self) -> int | None:
        """The first byte of a ``bytes=N-`` range, ``None`` without a Range header."""
        if not self.range.startswith("bytes="):
            return None
        return int(self.range.removeprefix("bytes=").split("-", 1)[0])


def _config(root: Path, port: int, work: Path, limit_rate: str | None) -> str:
    rate = f"limit_rate {limit_rate};" if limit_rate else ""
    # Started as root, nginx's workers would switch to 'nobody', who cannot read
    # pytest's private temp directories: keep them as the invoking user.
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections 64; }}
http {{
    types {{ application/octet-stream img zst; application/json meta; }}
    default_type application/octet-stream;
    log_format organixm_test escape=none '{LOG_FORMAT}';
    access_log {work}/access.log organixm_test;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    sendfile on;
    etag on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {rate}
        location / {{ }}
    }}
}}
"""


@dataclass
class Nginx:
    """A running nginx; ``url`` is ``http://127.0.0.1:PORT`` (no trailing slash)."""

    root: Path
    work: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.work / "access.log"

    def requests(self) -> list[AccessLogEntry]:
        """Every request logged so far, oldest first."""
        if not self.access_log.exists():
            return []
        entries = []
        for line in self.access_log.read_text().splitlines():
            method, path, status, sent, rng, inm = (line.split("\t") + [""] * 6)[:6]
            if path == PROBE:
                continue
            entries.append(
                AccessLogEntry(
                    method=method,
                    path=path,
                    status=int(status),
                    body_bytes=int(sent),
                    range="" if rng == "-" else rng,
                    if_none_match="" if inm == "-" else inm,
                )
            )
        return entries

    def stop(self) -> None:
        """Stop nginx at once (SIGTERM: fast shutdown, open downloads are cut off)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_nginx(
    root: Path, work: Path, *, limit_rate: str | None = None, port: int | None = None
) -> Nginx:
    """Serve ``root`` on ``port`` (default: a free loopback port).

    ``limit_rate`` is per connection, as nginx spells it (``4m``, ``500k``). Starting
    again with the same ``work`` and ``port`` after :meth:`Nginx.stop` brings the
    same server back (the access log is kept and appended to).

    Raises RuntimeError (with nginx's error log) when nginx is missing or does not start.
    """
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is not installed; run 'make deps' (Debian package nginx-light)")
    work.mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    port = port or free_port()
    (work / "nginx.conf").write_text(_config(root.resolve(), port, work, limit_rate))
    process = subprocess.Popen(
        [binary, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "stderr.log", "wb"),  # noqa: SIM115 - handed to Popen
    )
    server = Nginx(root=root, work=work, port=port, process=process)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            errors = (work / "stderr.log").read_text(errors="replace")
            raise RuntimeError(f"nginx exited with {process.returncode}: {errors}")
        try:
            urllib.request.urlopen(f"{server.url}{PROBE}", timeout=1).read()
            break
        except urllib.error.HTTPError:
            break  # any HTTP answer (403/404 for the index) means it listens
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    else:
        server.stop()
        raise RuntimeError(f"nginx did not answer on {server.url} within 15 s")
    return server
