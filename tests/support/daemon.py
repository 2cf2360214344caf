"""A host in a directory and the real daemon on it, for the control socket's tests.

:func:`prepare_host` lays out what a host has: two file-backed slots, a kernel
command line saying ``organixm.slot=a``, a GRUB environment (primary and backup)
initialised by :class:`organixmd.boot.machine.BootControl` as the installer does, and the
daemon's TOML configuration. :class:`DaemonProcess` starts the real daemon
(``python -m organixmd.cli --config ...``) as a subprocess, waits for its socket
and stops it with SIGTERM. :meth:`Host.reboot` plays GRUB at the next boot: it
applies the decision :func:`organixmd.boot.machine.predict_boot` computes (the same
rules as grub.cfg, held together by the grub-emu tests) and writes the
``organixm.slot=`` the kernel would get.

The socket lives in a short directory under /tmp that every user may traverse
(sockets need a path under 108 bytes, and the ``nobody`` test must reach it).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from organixmd.boot import grubenv
from organixmd.boot.machine import BootControl, BootState, Decision, env_from_state, predict_boot
from tests.support.nginx import Nginx

REPO = Path(__file__).resolve().parents[2]
SLOT_SIZE = 48 * 1024 * 1024


@dataclass
class Host:
    root: Path
    socket_dir: Path
    config: Path
    slots: dict[str, Path]
    cmdline: Path
    grubenv: Path
    grubenv_backup: Path
    state_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.socket_dir / "control.sock"

    def boot_control(self) -> BootControl:
        return BootControl(self.grubenv, self.grubenv_backup)

    def boot_state(self) -> BootState:
        return self.boot_control().read()

    def state(self) -> dict[str, Any]:
        """The daemon's state file as JSON (``{}`` before the first write)."""
        path = self.state_dir / "state.json"
        if not path.exists():
            return {}
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def reboot(self) -> Decision:
        """Boot the host as GRUB would now: record GRUB's decision, set the cmdline.

        Call with the daemon stopped (a real reboot stops it too).
        """
        decision = predict_boot(self.boot_state(), {"a": True, "b": True})
        if decision.slot is None:
            raise AssertionError(f"GRUB would find no slot to boot: {decision}")
        variables = grubenv.updated(grubenv.read(self.grubenv), env_from_state(decision.after))
        block = grubenv.render(variables, source=str(self.grubenv))
        grubenv.write_block(self.grubenv, block)
        grubenv.write_block(self.grubenv_backup, block)
        self.cmdline.write_text(f"BOOT_IMAGE=/vmlinuz ro organixm.slot={decision.slot}\n")
        self.uptime.write_text("1.00 1.00\n")
        return decision

    @property
    def uptime(self) -> Path:
        """The host's ``/proc/uptime``: it booted a second ago (the commit deadline counts
        from boot, and this machine's own uptime is hours)."""
        return self.root / "uptime"

    def write_config(
        self, url: str, *, reboot_command: tuple[str, ...] = ("true",), **daemon: Any
    ) -> None:
        """(Re)write the daemon's configuration; ``daemon`` overrides ``[daemon]`` keys."""
        settings = {
            "state_dir": str(self.state_dir),
            "socket": str(self.socket),
            "socket_group": "root",
            "admin_group": "root",
            "host_id_file": str(self.root / "machine-id"),
            "poll_interval": 3600,
            "poll_jitter": 0,
        }
        settings.update(daemon)
        self.settings = settings
        lines = [
            "[source]",
            f"url = {json.dumps(url)}",
            "[slots]",
            f"a = {json.dumps(str(self.slots['a']))}",
            f"b = {json.dumps(str(self.slots['b']))}",
            f"cmdline = {json.dumps(str(self.cmdline))}",
            "[boot]",
            f"grubenv = {json.dumps(str(self.grubenv))}",
            f"uptime = {json.dumps(str(self.uptime))}",
            f"reboot_command = {json.dumps(list(reboot_command))}",
            "[install]",
            "checkpoint_interval = 0.2",
            "[daemon]",
            *(f"{key} = {json.dumps(value)}" for key, value in settings.items()),
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def cleanup(self) -> None:
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def prepare_host(
    root: Path,
    url: str,
    *,
    installed: Path | None = None,
    reboot_command: tuple[str, ...] = ("true",),
    **daemon: Any,
) -> Host:
    """A host booted from slot a, committed; slot a holds ``installed`` (an image) if given."""
    root.mkdir(parents=True, exist_ok=True)
    socket_dir = Path(tempfile.mkdtemp(prefix="oxm-", dir="/tmp"))
    socket_dir.chmod(0o755)
    (root / "boot").mkdir(exist_ok=True)
    host = Host(
        root=root,
        socket_dir=socket_dir,
        config=root / "organixmd.toml",
        slots={"a": root / "slot-a.img", "b": root / "slot-b.img"},
        cmdline=root / "cmdline",
        grubenv=root / "boot" / "grubenv",
        grubenv_backup=root / "boot" / "grubenv.bak",
        state_dir=root / "state",
    )
    for path in host.slots.values():
        with open(path, "wb") as handle:
            handle.truncate(SLOT_SIZE)
    if installed is not None:
        with open(installed, "rb") as source, open(host.slots["a"], "r+b") as target:
            shutil.copyfileobj(source, target, 4 * 1024 * 1024)
    (root / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    host.cmdline.write_text("BOOT_IMAGE=/vmlinuz ro organixm.slot=a\n")
    host.uptime.write_text("1.00 1.00\n")
    host.boot_control().initialize("a")
    host.write_config(url, reboot_command=reboot_command, **daemon)
    return host


class DaemonFailed(AssertionError):
    pass


class DaemonProcess:
    """The real ``organixmd`` as a subprocess; its output goes to a log file in the host."""

    count = 0

    def __init__(
        self, host: Host, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> None:
        self.host = host
        self.env = env
        #: A command the daemon runs under (``strace ...``); its first child is the daemon.
        self.prefix = prefix
        DaemonProcess.count += 1
        self.log = host.root / f"organixmd-{DaemonProcess.count}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._daemon_pid: int | None = None

    def start(
        self, *, ready: bool = True, timeout: float = 60.0, wait: bool = True
    ) -> DaemonProcess:
        """Start the daemon; wait for its socket (and READY, unless ``ready=False``).

        ``wait=False`` returns at once, for tests that kill it before it listens.
        """
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env.update(self.env or {})
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "organixmd.cli",
                    "--config",
                    str(self.host.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )
        if wait:
            self.wait_socket(timeout)
        if wait and ready:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        """The pid of the process started (the prefix's, when there is one)."""
        assert self.process is not None
        return self.process.pid

    def daemon_pid(self, timeout: float = 30.0) -> int:
        """The daemon's own pid: :attr:`pid`, or the prefix command's child running it
        (strace forks probes of its own before it starts the command)."""
        if not self.prefix:
            return self.pid
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            for child in children.read_text().split():
                with contextlib.suppress(OSError):
                    # A probe is a fork of strace: same command line, strace's argv[0].
                    argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                    if argv[0] == sys.executable.encode() and b"organixmd.cli" in argv:
                        self._daemon_pid = int(child)
                        return self._daemon_pid
            time.sleep(0.005)
        raise DaemonFailed(f"{self.prefix[0]} started no daemon within {timeout}s")

    def kill9(self, daemon_pid: int | None = None) -> None:
        """SIGKILL the daemon (not its prefix) and wait until the whole command is gone."""
        assert self.process is not None
        os.kill(daemon_pid or self.daemon_pid(), signal.SIGKILL)
        self.process.wait(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise DaemonFailed(
                f"organixmd exited with {self.process.returncode}:\n{self.output()[-4000:]}"
            )

    def wait_socket(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self.host.socket.is_socket():
                try:
                    with socket.socket(socket.AF_UNIX) as probe:
                        probe.connect(str(self.host.socket))
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise DaemonFailed(f"no control socket after {timeout}s:\n{self.output()[-4000:]}")

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the boot-time check has finished; returns the status then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            answer = request(self.host.socket, "GET", "/v1/status")
            status: dict[str, Any] = answer.json()
            if status["daemon"]["ready"]:
                return status
            time.sleep(0.05)
        raise DaemonFailed(f"not ready after {timeout}s:\n{self.output()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise DaemonFailed(
                    f"organixmd did not stop within {timeout}s of SIGTERM:\n{self.output()[-4000:]}"
                ) from None
        return self.process.returncode

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            if self._daemon_pid is not None:
                # The daemon first: without its tracer it would go on alone.
                with contextlib.suppress(OSError):
                    os.kill(self._daemon_pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait()


# ---------------------------------------------------------------------------- raw HTTP


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.path))
        self.sock = sock


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    path: Path,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> RawAnswer:
    """One HTTP/1.1 request over the Unix socket with :mod:`http.client` (independent of
    organixctl's own client)."""
    connection = _UnixConnection(path, timeout)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return RawAnswer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        connection.close()


def as_user(user: str) -> list[str]:
    """The ``setpriv`` prefix that runs a command as ``user``:nogroup, no other groups."""
    return ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups"]


#: Interpreters to try for another user: this one's base (the venv lives in the
#: checkout, which another user may not read), then the system's.
_PYTHON_CANDIDATES = (
    str(Path(sys.base_prefix) / "bin" / "python3"),
    "/usr/bin/python3",
    "/usr/local/bin/python3",
)


@functools.cache
def python_for(user: str) -> str:
    """A Python interpreter ``user`` can run (it must read the binary and its stdlib).

    Fails loudly when there is none: a test run as another user cannot run otherwise.
    """
    tried = []
    for candidate in dict.fromkeys(_PYTHON_CANDIDATES):
        probe = subprocess.run(
            [*as_user(user), candidate, "-E", "-s", "-c", "import json, socket, argparse"],
            capture_output=True,
            text=True,
            cwd="/",
            check=False,
        )
        if probe.returncode == 0:
            return candidate
        tried.append(f"{candidate}: {(probe.stderr.strip() or 'exit ' + str(probe.returncode))}")
    raise AssertionError(f"no Python that {user} may run:\n" + "\n".join(tried))


def organixctl(
    *args: str,
    socket_path: Path | None = None,
    user: str | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``organixctl`` (``python -m organixctl``) as a subprocess.

    ``user="nobody"`` runs it through ``setpriv`` as nobody:nogroup with no
    supplementary groups. The checkout (and the venv in it) may be unreadable to
    nobody (a clone under a 0700 directory), so the client, which is stdlib-only,
    is copied (with the API's definition, ``organixmd.apidef``, stdlib-only too) to
    a directory every user may read and run by an interpreter nobody can run
    (:func:`python_for`).
    """
    options = [] if socket_path is None else ["--socket", str(socket_path)]
    if user is None:
        return subprocess.run(
            [sys.executable, "-m", "organixctl", *args, *options],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            check=False,
        )
    with tempfile.TemporaryDirectory(prefix="oxm-ctl-", dir="/tmp") as copy:
        Path(copy).chmod(0o755)
        shutil.copytree(
            REPO / "organixctl",
            Path(copy) / "organixctl",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        (Path(copy) / "organixmd").mkdir()
        for name in ("__init__.py", "apidef.py"):
            shutil.copy(REPO / "organixmd" / name, Path(copy) / "organixmd" / name)
        # The copy keeps the checkout's modes, which a umask of 077 makes private.
        for path in Path(copy).rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        # -E -s: no PYTHON* variables, no user site; -m finds the copy in the cwd.
        command = [*as_user(user), python_for(user), "-E", "-s", "-m", "organixctl"]
        return subprocess.run(
            [*command, *args, *options],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=copy,
            env={**os.environ, **(env or {})},
            check=False,
        )


# ---------------------------------------------------------------------------- releases

#: Small real ext4 images (about 7.5 MB compressed): several times what the loopback
#: socket buffers absorb at once, so a download throttled by nginx takes seconds and
#: can be watched, cancelled and interrupted.
IMAGE_SIZE = 32 * 1024 * 1024
PAYLOAD = 16 * 1024 * 1024


def make_images(directory: Path, count: int) -> list[Path]:
    """``count`` different root images (seeds 1..count) in ``directory``."""
    from tests.support.images import make_ext4_image

    directory.mkdir(parents=True, exist_ok=True)
    return [
        make_ext4_image(directory / f"root-{n}.img", IMAGE_SIZE, payload_bytes=PAYLOAD, seed=n)
        for n in range(1, count + 1)
    ]


def ranged_image_requests(server: Nginx, timeout: float = 10.0) -> list[str]:
    """The ``Range`` headers of image downloads nginx has logged, once one is ranged.

    nginx logs a request when it ends, which may be a moment after the client has
    all the bytes (or, for a download the client cut off, much later).
    """
    deadline = time.monotonic() + timeout
    while True:
        ranges = [r.range for r in server.requests() if r.path.startswith("/images/")]
        if any(r.startswith("bytes=") for r in ranges) or time.monotonic() > deadline:
            return ranges
        time.sleep(0.05)


def strace_delaying(delays: dict[str, float]) -> tuple[str, ...]:
    """A ``DaemonProcess`` prefix: the daemon under strace, each syscall group named in
    ``delays`` (comma-separated syscalls) held that many seconds before it enters the
    kernel, so a test can act (read a temporary file, SIGKILL) while it waits."""
    traced = ",".join([*delays, "set_robust_list", "rseq"])
    argv = ["strace", "-f", "--seccomp-bpf", "-qq", "-o", "/dev/null"]
    # set_robust_list and rseq: every new thread makes one of them first, and strace traces
    # a thread's every syscall until its first seccomp stop; they stop it at once.
    argv += ["-e", f"trace={traced}"]
    for calls, seconds in delays.items():
        argv += ["-e", f"inject={calls}:delay_enter={int(seconds * 1e6)}"]
    return tuple(argv)
