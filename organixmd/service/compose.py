"""The composition root: builds every part of the updater once, in dependency order.

``organixmd --once`` uses :func:`build_host`; the daemon uses :func:`run_daemon`,
which builds the host's parts the same way and adds boot assessment, the reboot
policy, the event hub, the control socket and systemd notification. Each part gets
only what it uses; nothing reaches into a shared registry.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from organixmd.base.config import Config
from organixmd.base.errors import OrganixmError
from organixmd.base.fsutil import remove_temporaries
from organixmd.base.logsetup import get_logger
from organixmd.host import hostlock
from organixmd.host.engine import Engine, EventSink, read_host_id
from organixmd.host.state import StateKeeper, StateStore
from organixmd.release.sources import open_source
from organixmd.release.trust import load_public_keys

if TYPE_CHECKING:
    from organixmd.boot.port import GrubBootPort


def _remove_temporaries(targets: list[Path]) -> None:
    """Remove what writes killed before their rename left (the holder of the lock is the
    only writer of these files). A failure is logged: it must not stop the start."""
    log = get_logger("organixmd")
    for target in targets:
        try:
            removed = remove_temporaries(target)
        except OSError as exc:
            log.warning(
                "temporaries_not_removed",
                detail=f"cannot clean temporary copies of {target}: {exc}; they are harmless "
                "but take space: remove them by hand",
            )
            continue
        if removed:
            log.warning(
                "removed_temporaries",
                detail=f"removed {len(removed)} temporary copies of {target} left by a write "
                "that was interrupted before its rename",
                files=[str(path) for path in removed],
            )


@dataclass(frozen=True, slots=True)
class HostParts:
    """What one host's updater is made of; built once, by :func:`build_host`."""

    engine: Engine
    port: GrubBootPort
    keeper: StateKeeper
    #: The host's writer lock, held while these parts live.
    lock: hostlock.HostLock


def unobserved(kind: str, fields: dict[str, Any]) -> None:
    """The event sink of ``organixmd --once``: one check, no subscribers (the verdict is
    printed and logged)."""


async def build_host(config: Config, on_event: EventSink) -> HostParts:
    """Load keys and state, take the host lock, build the boot port and the engine.

    The root of ``organixmd --once`` and of the daemon (:func:`run_daemon`) alike;
    each part gets the configuration sections it uses. Raises ConfigError/StateError.
    """
    from organixmd.boot.port import GrubBootPort
    from organixmd.install.slots import booted_slot

    keys = load_public_keys(config)
    # Before the state is read: only the lock's holder may act on it (one writer per host).
    lock = await asyncio.to_thread(hostlock.acquire, config.daemon.state_dir)
    store = StateStore(config.daemon.state_dir)
    await asyncio.to_thread(
        _remove_temporaries, [store.path, config.boot.grubenv, config.boot.grubenv_copy]
    )
    state, note = await asyncio.to_thread(store.load)
    if note is not None:
        get_logger("organixmd").warning("state_reset", detail=note)
    keeper = StateKeeper(store, state)
    port = GrubBootPort(
        config.boot.grubenv, config.boot.grubenv_copy, booted_slot(config.slots.cmdline)
    )
    engine = Engine(
        slots=config.slots,
        install=config.install,
        trial_boots=config.boot.trial_boots,
        host_id=read_host_id(config.daemon.host_id_file),
        keeper=keeper,
        boot=port,
        public_keys=keys,
        source_factory=lambda: open_source(config.source),
        on_event=on_event,
    )
    return HostParts(engine, port, keeper, lock)


async def run_daemon(config: Config) -> int:
    """Build the long-running daemon's parts, each once, and run it. Returns the exit code."""
    from organixmd.host.bootmanager import BootManager, Reboot
    from organixmd.service.api import ControlServer, EventHub
    from organixmd.service.daemon import Daemon, serve, startup_failed
    from organixmd.service.notify import Notifier

    log = get_logger("organixmd.daemon", pid=os.getpid())
    notifier = Notifier()
    hub = EventHub()
    try:
        host = await build_host(config, on_event=hub.publish)
    except OrganixmError as exc:
        return startup_failed(log, exc)
    manager = BootManager(config.boot, host.keeper, host.port)
    reboot = Reboot(config.boot)
    daemon = Daemon(config.daemon, host.engine, manager, reboot, hub, notifier)
    hub.listen(daemon.on_event)
    try:
        # Resolves socket_group and admin_group: a group missing on this host is a
        # configuration error, reported like every other one.
        server = ControlServer(config.daemon, config.source.url, daemon)
    except OrganixmError as exc:
        return startup_failed(log, exc)
    return await serve(daemon, server, log)
