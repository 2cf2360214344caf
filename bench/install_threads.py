"""Where an install's time goes: CPU seconds per thread, and what the machine did meanwhile.

Runs the daemon's install (``Engine.check()``, read-back on) of the 1 GiB benchmark
image from nginx into a preallocated file slot, ``--runs`` times, each in a child
process, and prints for each run:

- the rate, and the CPU seconds of the whole process;
- the CPU seconds (user and system) of each thread, named by the stage it ran: the
  event loop (network), decompress, chunk hash, write, read-back (fsync, read and
  whole-image hash) and the read-back's reader (its O_DIRECT reads);
- how the machine's two CPUs were spent over the install (``/proc/stat``: user,
  system, softirq, idle, iowait): what the install left unused;
- the time spent in the slot's writes, the read-back's reads and hashing, and its
  fsyncs.

Stages are named by wrapping their entry points in the child (instrumentation only;
the daemon is not changed). Figures are printed, never asserted. Uses the images and
the slot of ``bench/install.py`` (built on first use in ``/var/tmp/organixm-bench``).
Run: ``.venv/bin/python bench/install_threads.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import install as bench  # noqa: E402 - bench/install.py, beside this file

CLOCK = os.sysconf("SC_CLK_TCK")
SYSTEM_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def system_ticks() -> list[int]:
    return [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def thread_cpu(tid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of thread ``tid`` of this process so far."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK, int(fields[12]) / CLOCK


def child(config_path: Path) -> None:
    """One install with every stage's thread named; prints the figures."""
    from organixmd.base import logsetup
    from organixmd.base.config import load_config
    from organixmd.install import blockio, pipeline
    from organixmd.service.compose import build_host, unobserved

    logsetup.configure("warning")
    #: CPU seconds (user, system) each stage's thread spent while it ran that stage.
    stage_cpu: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    timings: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])

    def own_cpu() -> tuple[float, float]:
        return thread_cpu(threading.get_native_id())

    def count(name: str, before: tuple[float, float]) -> None:
        after = own_cpu()
        stage_cpu[name][0] += after[0] - before[0]
        stage_cpu[name][1] += after[1] - before[1]

    def named(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            before = own_cpu()
            try:
                return function(*args, **kwargs)
            finally:
                count(name, before)

        return run

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return function(*args, **kwargs)
            finally:
                timings[name][0] += 1
                timings[name][1] += time.monotonic() - started

        return run

    stages: Any = pipeline._Stages
    stages.hash_stage = named("chunk hash", stages.hash_stage)
    stages.write_stage = named("write", stages.write_stage)
    start = stages.start
    stages.start = lambda self, decompress: start(self, named("decompress", decompress))
    readback: Any = pipeline.ReadBack
    readback.run = named("read-back (fsync, hash)", readback.run)
    reader: Any = blockio.DeviceReader
    original_init, original_close = reader.__init__, reader.close
    reader_start: dict[int, tuple[float, float]] = {}

    def reader_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # The reader's own thread, which reads ahead of the hash: counted from here
        # to its close.
        reader_start[id(self)] = self._reader.submit(own_cpu).result()

    def reader_close(self: Any) -> None:
        if id(self) in reader_start:
            self._reader.submit(count, "reader (O_DIRECT reads)", reader_start.pop(id(self)))
        original_close(self)

    reader.__init__, reader.close = reader_init, reader_close
    reader.sync = timed("read-back fsync", reader.sync)
    reader.hash_range = timed("read-back read + hash", reader.hash_range)
    writer: Any = blockio.SlotWriter
    writer.write = timed("slot write", writer.write)

    async def run() -> tuple[str, float, float, list[int]]:
        engine = (await build_host(load_config(config_path), unobserved)).engine
        before = system_ticks()
        started, cpu, loop_before = time.monotonic(), time.process_time(), own_cpu()
        verdict = await engine.check()
        count("event loop (network)", loop_before)
        seconds, cpu = time.monotonic() - started, time.process_time() - cpu
        spent = [b - a for a, b in zip(before, system_ticks(), strict=True)]
        return verdict.outcome, seconds, cpu, spent

    outcome, seconds, cpu, spent = asyncio.run(run())
    size = 1024**3
    print(
        f"  {outcome}: {seconds:.2f} s, {size / seconds / 1e6:.0f} MB/s; process "
        f"{cpu:.2f} CPU s ({cpu / seconds:.2f} CPUs busy)"
    )
    for name, (user, system) in sorted(stage_cpu.items(), key=lambda item: -sum(item[1])):
        print(f"    {name:<26} {user + system:5.2f} CPU s (system {system:.2f})")
    other = cpu - sum(sum(figures) for figures in stage_cpu.values())
    print(f"    {'other threads':<26} {other:5.2f} CPU s")
    machine = {
        name: ticks / CLOCK / seconds for name, ticks in zip(SYSTEM_FIELDS, spent, strict=True)
    }
    print(
        "    machine, CPUs over the install: "
        + ", ".join(f"{name} {machine[name]:.2f}" for name in SYSTEM_FIELDS if name != "nice")
    )
    print(
        "    "
        + "; ".join(
            f"{name}: {calls:.0f} calls, {total:.2f} s" for name, (calls, total) in timings.items()
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    from tests.support.nginx import start_nginx

    bench.WORK.mkdir(parents=True, exist_ok=True)
    release = bench.build_inputs("img1g", bench.GiB, 640 * bench.MiB, None, seed=1)
    slot = bench.prepare_slot(bench.WORK / "slot-b.img", release.size)
    nginx = start_nginx(bench.WORK / "pub", bench.WORK / "nginx-threads")
    print(
        f"install of {release.name} from nginx into a file slot; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f} at the start"
    )
    try:
        for _ in range(args.runs):
            config = bench.fresh_host("threads", f"{nginx.url}/{release.name}/host", slot)
            bench.settle()
            subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", str(config)],
                cwd=REPO,
                check=True,
            )
    finally:
        nginx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
