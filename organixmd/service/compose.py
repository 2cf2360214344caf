"""The composition root: builds the daemon's components in dependency order.

Each component gets only what it uses; nothing reaches into a shared registry.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from organixmd.base.config import Config
from organixmd.base.fsutil import remove_temporaries
from organixmd.base.logsetup import get_logger
from organixmd.host import hostlock
from organixmd.host.engine import BootPort, Engine, EventSink, load_public_keys
from organixmd.host.state import StateStore


def build_boot_port(config: Config) -> BootPort:
    from organixmd.boot.port import GrubBootPort
    from organixmd.install.slots import booted_slot

    return GrubBootPort(
        config.boot.grubenv, config.boot.grubenv_copy, booted_slot(config.slots.cmdline)
    )


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


async def build_engine(config: Config, on_event: EventSink | None = None) -> Engine:
    """Load keys and state and wire the engine. Raises ConfigError/StateError."""
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
    engine = Engine(
        config,
        store,
        state,
        boot=build_boot_port(config),
        public_keys=keys,
        on_event=on_event,
    )
    engine.lock = lock
    return engine
