"""Fault row "devices: a slot that resolves to the booted slot": invariant 1 through layers.

Slot b is configured as a path that reaches slot a's bytes: a symlink or a hard link to
a's image file, a loop device over that file (from its start or from an offset), a loop
device over such a loop device, and a loop device over an overlapping range of one disk
file whose other range is slot a. Each host boots from slot a, which holds release 1.0,
with 2.0 published; the real daemon's boot-time check must refuse to write slot b
(``slot-unusable``, naming what the two share), leave slot a's bytes and the GRUB
environment as they were, and, once the operator points slot b at a device of its own,
the next start installs 2.0 there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from tests.faults.report import FaultReport, Row, count_tracebacks
from tests.support.daemon import DaemonProcess, Host, make_images, prepare_host
from tests.support.images import sha256_file
from tests.support.releases import build_release
from tests.test_slots import LoopDevices, device_hash

MiB = 1024 * 1024


def _digest(path: Path) -> str:
    return device_hash(path) if path.is_block_device() else sha256_file(path)


def test_slot_aliasing_the_booted_slot_is_never_written(
    faults: FaultReport, loops: LoopDevices, tmp_path: Path
) -> None:
    row = faults.add(Row(fault="devices: slot b resolves to the booted slot (links, loops)"))
    started = time.monotonic()
    images = make_images(tmp_path / "images", 2)
    r1 = build_release(images[0], tmp_path / "pub", version="1.0", serial=1)
    build_release(images[1], tmp_path / "pub", version="2.0", serial=2)

    def symlink(host: Host) -> Path:
        link = host.root / "slot-b-link.img"
        link.symlink_to(host.slots["a"])
        return link

    def hardlink(host: Host) -> Path:
        link = host.root / "slot-b-hard.img"
        os.link(host.slots["a"], link)
        return link

    def shared_disk(host: Host) -> Path:
        # Slot a becomes the first 48 MiB of a disk file; b starts inside it.
        disk = host.root / "disk.img"
        with open(disk, "wb") as handle:
            handle.truncate(96 * MiB)
        with open(host.slots["a"], "rb") as source, open(disk, "r+b") as target:
            target.write(source.read())
        host.slots["a"] = loops.over(disk, 0, 48 * MiB)
        return loops.over(disk, 40 * MiB)

    cases: dict[str, Callable[[Host], Path]] = {
        "symlink to slot a's file": symlink,
        "hard link to slot a's file": hardlink,
        "loop device over slot a's file": lambda host: loops.over(host.slots["a"]),
        "loop device over slot a's file from 1 MiB": lambda host: loops.over(host.slots["a"], MiB),
        "loop over a loop over slot a's file": lambda host: loops.over(loops.over(host.slots["a"])),
        "overlapping range of one disk file": shared_disk,
    }
    failures: list[str] = []
    for index, (label, alias) in enumerate(cases.items()):
        row.tries += 1
        host = prepare_host(tmp_path / f"host{index}", r1.url, installed=images[0])
        try:
            host.slots["b"] = alias(host)
            host.write_config(r1.url)
            booted_before = _digest(host.slots["a"])
            env_before = host.grubenv.read_bytes()
            with DaemonProcess(host).start() as daemon:
                verdict = daemon.wait_ready()["verdict"]
                assert daemon.stop() == 0
                row.tracebacks += count_tracebacks(daemon.output())
            print(f"  {label}: {verdict['code']}: {verdict['message'][:160]}")
            row.reported[verdict["code"]] += 1
            if _digest(host.slots["a"]) != booted_before or host.grubenv.read_bytes() != env_before:
                row.flips_on_bad_data += 1
                failures.append(f"{label}: slot a or the GRUB env was written")
            if verdict["code"] != "slot-unusable" or "booted slot" not in verdict["message"]:
                failures.append(
                    f"{label}: expected slot-unusable naming the booted slot: {verdict}"
                )
            # The operator gives slot b a file of its own: the next start installs.
            own = host.root / "slot-b-own.img"
            with open(own, "wb") as handle:
                handle.truncate(64 * MiB)
            host.slots["b"] = own
            host.write_config(r1.url)
            with DaemonProcess(host).start() as daemon:
                after = daemon.wait_ready()["verdict"]
                assert daemon.stop() == 0
                row.tracebacks += count_tracebacks(daemon.output())
            if after["code"] == "staged" and _digest(host.slots["a"]) == booted_before:
                row.recovered += 1
            else:
                row.stuck += 1
                failures.append(f"{label}: after the fix: {after}")
        finally:
            host.cleanup()
    row.seconds = time.monotonic() - started
    assert failures == [], "\n".join(failures)
    assert (row.flips_on_bad_data, row.stuck, row.tracebacks) == (0, 0, 0)
    assert row.recovered == row.tries == len(cases)
