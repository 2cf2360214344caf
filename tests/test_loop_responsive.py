"""The event loop stays responsive while an install runs in the same loop.

The daemon's control socket, watchdog and status all share the loop with the
install; the pipeline keeps decompression, hashing and writing in worker threads.
A 10 ms timer beside a real install of a 64 MiB image from nginx must never fire
more than 100 ms late.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from organixmd.base.config import load_config
from organixmd.service.compose import build_host, unobserved
from tests.support.images import make_ext4_image, sha256_file
from tests.support.nginx import start_nginx
from tests.support.releases import build_release
from tests.test_sources import CliHost

MiB = 1024 * 1024
TICK = 0.010
MAX_LATE = 0.100


@pytest.mark.slow
async def test_timer_never_late_during_install(tmp_path: Path) -> None:
    """A 10 ms asyncio timer is never more than 100 ms late during a 64 MiB install."""
    image = make_ext4_image(tmp_path / "root.img", 64 * MiB, payload_bytes=44 * MiB, seed=41)
    release = build_release(image, tmp_path / "pub" / "fleet", serial=6)
    server = start_nginx(tmp_path / "pub", tmp_path / "nginx")
    try:
        host = CliHost(tmp_path / "host", slot_size=72 * MiB)
        config = load_config(host.write_config(f"{server.url}/fleet/host"))
        parts = await build_host(config, unobserved)
        engine = parts.engine
        lateness: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                due = time.monotonic() + TICK
                await asyncio.sleep(TICK)
                lateness.append(time.monotonic() - due)

        timer = asyncio.create_task(ticker())
        started = time.monotonic()
        verdict = await engine.check()
        elapsed = time.monotonic() - started
        stop.set()
        await timer
    finally:
        server.stop()
    assert verdict.outcome == "staged", verdict.message
    assert sha256_file(host.slot_b, release.meta.image.size) == sha256_file(image)
    # The timer really ran beside the install, all along.
    assert len(lateness) >= elapsed / (TICK + MAX_LATE)
    worst = max(lateness)
    assert worst <= MAX_LATE, f"timer fired {worst * 1000:.0f} ms late during the install"
