"""The long-running daemon: boot assessment, the poll loop, the control socket, systemd.

Start-up order: configuration (already loaded) → engine and state → boot
assessment (repair the GRUB env, learn why this slot booted, record a fallback)
→ control socket → the boot-time check → ``READY=1``. Units ordered
``After=organixm-update.service`` therefore start once the boot-time check has
finished, as with the original tool.

Shutdown (SIGTERM/SIGINT) is driven by one ``asyncio.Event``: ``STOPPING=1``,
the running install is cancelled (its checkpoint is saved, the next start
resumes), each stage under a timeout, the socket removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from organixmd.base.config import DaemonConfig
from organixmd.base.errors import Busy, OrganixmError
from organixmd.base.logsetup import get_logger
from organixmd.host.bootmanager import BootManager, Reboot
from organixmd.host.engine import Engine, Phase
from organixmd.host.state import Verdict
from organixmd.service.api import ControlServer, EventHub
from organixmd.service.notify import Notifier, watchdog_interval

SHUTDOWN_STAGE_TIMEOUT = 20.0


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


class Daemon:
    """Owns the long-lived tasks. Built by :func:`organixmd.service.compose.run_daemon`."""

    def __init__(
        self,
        config: DaemonConfig,
        engine: Engine,
        manager: BootManager,
        reboot: Reboot,
        hub: EventHub,
        notifier: Notifier,
    ) -> None:
        self.config = config
        self.engine = engine
        self.manager = manager
        self.reboot = reboot
        self.hub = hub
        self.notifier = notifier
        self.stop = asyncio.Event()
        self.wakeup = asyncio.Event()
        self.next_check: datetime | None = None
        self.started = datetime.now(UTC)
        self.ready = False
        self.log = get_logger("organixmd.daemon")
        self._background: set[asyncio.Task[Any]] = set()
        self._updates: set[asyncio.Task[Verdict]] = set()
        self._failures = 0
        self._last_status: float = 0.0

    # ------------------------------------------------------------------ systemd status

    def status_line(self) -> str:
        engine = self.engine
        progress = engine.progress
        if engine.phase in (Phase.DOWNLOADING, Phase.VERIFYING) and progress is not None:
            version = engine.current.version if engine.current else "?"
            return (
                f"{engine.phase.value} {version}: {format_bytes(progress.bytes_done)} of "
                f"{format_bytes(progress.bytes_total)} at {format_bytes(progress.rate)}/s"
            )
        verdict = engine.state.last_verdict
        if verdict is None:
            return engine.phase.value
        return f"{verdict.outcome}: {verdict.message}"[:200]

    def on_event(self, kind: str, fields: dict[str, Any]) -> None:
        """Listens to the event hub: keeps systemd's status line current."""
        if kind in ("phase", "verdict") or (kind == "progress" and self._status_due()):
            self.notifier.status(self.status_line())

    def _status_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_status >= 1.0:
            self._last_status = now
            return True
        return False

    # ------------------------------------------------------------------ operations

    async def run_check(self, *, install: bool = True, force: bool = False) -> Verdict:
        """One check; after staging, reboot according to policy."""
        verdict = await self.engine.check(install=install, force=force)
        version = verdict.release.version if verdict.release else "release"
        await self.reboot.after_check(verdict, f"{version} staged")
        return verdict

    def start_update(self, *, force: bool, reboot: bool) -> asyncio.Task[Verdict]:
        """Start an install in the background (the API answers 202). Busy if one runs."""
        # An update spawned a moment ago holds no lock until its task first runs.
        if self.engine.busy or any(not task.done() for task in self._updates):
            raise Busy("a check or install is already running")

        async def update() -> Verdict:
            verdict = await self.engine.check(install=True, force=force)
            why = "admin asked for a reboot after the update" if reboot else "update staged"
            await self.reboot.after_check(verdict, why, now=reboot)
            return verdict

        task = self.spawn(update())
        self._updates.add(task)
        task.add_done_callback(self._updates.discard)
        return task

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A background task with a held reference (no fire-and-forget)."""
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        """Forget a finished background task; its error is logged once, here.

        Nobody may await it (``update`` without ``wait``): an error left unretrieved
        would be printed by asyncio as a traceback when the task is collected.
        """
        self._background.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, OrganixmError):
            self.log.info("background_refused", code=error.code, error=str(error))
        elif error is not None:
            self.log.error("background_failed", exc_info=error)

    def _delay(self, verdict: Verdict | None) -> float:
        daemon = self.config
        if verdict is not None and verdict.outcome == "error":
            self._failures += 1
            # Exponential backoff on errors, capped; jitter spreads a fleet's retries.
            base = min(daemon.backoff_max, 30.0 * 2.0 ** min(self._failures - 1, 20))
            return float(base * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not crypto
        self._failures = 0
        return daemon.poll_interval + random.uniform(0, daemon.poll_jitter)  # noqa: S311

    async def poll_loop(self) -> None:
        """Check at start, then every interval (with jitter); READY=1 after the first."""
        while not self.stop.is_set():
            verdict: Verdict | None = None
            try:
                verdict = await self.run_check()
            except Busy:
                verdict = None  # an admin's update is running; it reports itself
            if not self.ready:
                self.ready = True
                self.notifier.ready(self.status_line())
                self.log.info("ready", detail="boot-time check finished")
            delay = self._delay(verdict)
            self.next_check = datetime.now(UTC) + timedelta(seconds=delay)
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.wakeup.wait()

    async def watchdog_loop(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def reboot_window_loop(self) -> None:
        while True:
            await self.reboot.wait_for_window()
            await asyncio.sleep(60)


def _install_signal_handlers(stop: asyncio.Event) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def restore() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)

    return restore


def startup_failed(log: structlog.stdlib.BoundLogger, exc: OrganixmError) -> int:
    """One line saying what is wrong and what to do; 78 (EX_CONFIG) for configuration."""
    log.error("startup_failed", error=str(exc), code=exc.code)
    return 78 if exc.code == "config-invalid" else 1


async def serve(daemon: Daemon, server: ControlServer, log: structlog.stdlib.BoundLogger) -> int:
    """Run the built daemon until SIGTERM/SIGINT. Returns the exit code."""
    config, engine, manager, reboot, notifier = (
        daemon.config,
        daemon.engine,
        daemon.manager,
        daemon.reboot,
        daemon.notifier,
    )
    restore_signals = _install_signal_handlers(daemon.stop)
    try:
        await manager.reconcile()
        # The last run's verdict may describe another boot (another slot, a slot since
        # marked bad): the first check of this run fetches the meta unconditionally.
        engine.state.meta_etag = None
        try:
            await server.start()
        except OrganixmError as exc:
            return startup_failed(log, exc)
        log.info("started", socket=str(config.socket), booted=manager.booted)
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(daemon.poll_loop()),
                group.create_task(manager.watch_deadline(reboot)),
                group.create_task(daemon.reboot_window_loop()),
            ]
            interval = watchdog_interval()
            if interval is not None:
                tasks.append(group.create_task(daemon.watchdog_loop(interval)))
            await daemon.stop.wait()
            notifier.stopping()
            log.info("stopping")
            background = list(daemon._background)
            for task in [*tasks, *background]:
                task.cancel()
        # An install running in the background saves its checkpoint as it stops.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_STAGE_TIMEOUT):
                await asyncio.gather(*background, return_exceptions=True)
    finally:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_STAGE_TIMEOUT):
                await server.stop()
        restore_signals()
    log.info("stopped")
    return 0
