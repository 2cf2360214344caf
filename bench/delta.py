#!/usr/bin/env python3
"""Delta updates against full installs, in one run: bytes, requests, time.

A tree of real files (a deterministic selection from this machine's /usr) becomes a
1 GiB ext4 image with ``mkfs.ext4 -d`` (release 1, in slot a). Each case changes the
tree and rebuilds the image from scratch, so placement may move:

  a  1 % of the files changed (16 bytes each)
  b  5 % changed, 2 % added (files not in the tree before), 2 % removed
  c  the largest file rewritten
  d  every file changed (one byte put in front: every block of every file moves)

Each release is published with the project's publisher (delta index included) to a
directory that nginx serves on 127.0.0.1. Per case the host (slot a = release 1, slot
b = zeros, both files) installs the release twice from nginx: whole (the pipeline,
read-back included) and as a delta (index fetch, scan of slot a (slot b holds nothing
the host installed, so the engine does not read it), ranged fetches, read-back).
Printed per case: bytes downloaded / the full compressed image, requests, delta
install time / full install time, and an rsync-style ideal (the changed and
added files, each compressed with zstd -3). Then the targets: case b downloads at
most 15 % of a full image and installs no slower than a full install; case d costs
at most 1.05 x a full download. Also: publishing with the delta index / without.

Ratios from one run on a shared machine; never a pass/fail test.

    bench/delta.py            1 GiB image (about 6 minutes here)
    bench/delta.py --quick    256 MiB image
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from organixctl.publisher.publish import PublishRequest, publish
from organixmd.base.config import SourceConfig
from organixmd.install import delta
from organixmd.install.pipeline import Installer
from organixmd.release.meta import Release, parse_meta
from organixmd.release.sources import open_source
from tests.support.nginx import start_nginx
from tests.support.throttle import Throttle

MiB = 1024 * 1024
CHUNK = 4 * MiB
ROOTS = ("/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/bin", "/usr/lib/python3")


def candidates() -> list[Path]:
    """Regular files under ROOTS, in a fixed order then shuffled with a fixed seed."""
    found = []
    for root in ROOTS:
        for directory, subdirs, files in os.walk(root):
            subdirs.sort()
            for name in sorted(files):
                path = Path(directory, name)
                if not path.is_symlink() and path.is_file() and path.stat().st_size < 64 * MiB:
                    found.append(path)
    random.Random(1).shuffle(found)
    return found


def copy_files(files: list[Path], tree: Path, start: int = 0) -> list[Path]:
    placed = []
    for number, source in enumerate(files, start):
        target = tree / f"d{number % 97:02d}" / f"{number:06d}-{source.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        placed.append(target)
    return placed


def mkfs(tree: Path, image: Path, size: int) -> Path:
    with image.open("wb") as handle:
        handle.truncate(size)
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            # mke2fs picks 1 KiB blocks below 512 MiB; images as hosts run them have 4 KiB.
            "-b",
            "4096",
            "-E",
            "root_owner=0:0",
            "-U",
            "clear",
            "-d",
            str(tree),
            str(image),
        ],
        check=True,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    return image


def compressed(paths: list[Path]) -> int:
    """The rsync-style ideal: each changed file compressed on its own (zstd -3)."""
    compressor = zstandard.ZstdCompressor(level=3)
    return sum(len(compressor.compress(path.read_bytes())) for path in paths)


@dataclass
class Case:
    name: str
    what: str
    change: Callable[[list[Path], Path, list[Path]], list[Path]]


def change_some(share: float) -> Callable[[list[Path], Path, list[Path]], list[Path]]:
    def change(files: list[Path], tree: Path, spare: list[Path]) -> list[Path]:
        rng = random.Random(int(share * 1000))
        chosen = rng.sample(files, max(1, int(len(files) * share)))
        for path in chosen:
            data = bytearray(path.read_bytes())
            at = rng.randrange(max(1, len(data) - 16))
            data[at : at + 16] = rng.randbytes(16)
            path.write_bytes(bytes(data))
        return chosen

    return change


def change_add_remove(files: list[Path], tree: Path, spare: list[Path]) -> list[Path]:
    rng = random.Random(5)
    shuffled = list(files)
    rng.shuffle(shuffled)
    count = len(files)
    changed = change_some(0.05)(shuffled[: count * 5 // 100], tree, spare)
    for path in shuffled[count * 5 // 100 : count * 7 // 100]:
        path.unlink()
    added = copy_files(spare[: count * 2 // 100], tree, start=10**6)
    return changed + added


def rewrite_largest(files: list[Path], tree: Path, spare: list[Path]) -> list[Path]:
    """New bytes for the largest file: its own blocks in a shuffled order, each with a
    changed first byte (compressible like the original, but no block is on the host)."""
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    blocks = [data[o : o + 4096] for o in range(0, len(data), 4096)]
    random.Random(3).shuffle(blocks)
    for block in blocks:
        block[0] ^= 0xA5
    largest.write_bytes(b"".join(blocks))
    return [largest]


def change_every_file(files: list[Path], tree: Path, spare: list[Path]) -> list[Path]:
    for path in files:
        path.write_bytes(b"\n" + path.read_bytes())
    return files


CASES = [
    Case("a", "1 % of files changed", lambda f, t, s: change_some(0.01)(f, t, s)),
    Case("b", "5 % changed, 2 % added, 2 % removed", change_add_remove),
    Case("c", "the largest file rewritten", rewrite_largest),
    Case("d", "every file changed (worst case)", change_every_file),
]


def zero_file(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        handle.truncate(size)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def full_install(url: str, release: Release, slot: Path) -> tuple[float, int]:
    source = open_source(SourceConfig(url=url))
    async with source:
        started = time.monotonic()
        result = await Installer(release, source, slot).run(0, None)
        return time.monotonic() - started, result.downloaded


async def delta_install(
    url: str, release: Release, slot_a: Path, slot_b: Path, size: int
) -> tuple[float, int, int, int, float, str]:
    """(seconds, downloaded, requests, reused, scan seconds, why not) of a delta install."""
    source = open_source(SourceConfig(url=url))
    async with source:
        started = time.monotonic()
        prepared = await delta.prepare(
            source,
            release,
            [],
            stable=delta.LocalSlot("a", slot_a, size),
            # As the engine does: slot b holds no release this host installed (zeros),
            # so it is not read.
            target=None,
            start_chunk=0,
        )
        if prepared.plan is None:
            # What the engine does then: the whole image.
            _, downloaded = await full_install(url, release, slot_b)
            total = time.monotonic() - started
            return total, downloaded + prepared.index_bytes, 2, 0, 0.0, prepared.reason
        installer = delta.DeltaInstaller(
            release, source, slot_b, prepared.plan, index_bytes=prepared.index_bytes
        )
        result = await installer.run(0, None)
        return (
            time.monotonic() - started,
            result.downloaded,
            result.requests,
            result.reused,
            prepared.plan.local.seconds,
            "",
        )


def publish_release(
    image: Path, target: Path, version: str, serial: int, with_delta: bool
) -> float:
    request = PublishRequest(
        image=image,
        target=str(target),
        version=version,
        serial=serial,
        allow_unsigned=True,
        chunk_size=CHUNK,
        delta=with_delta,
    )
    return asyncio.run(publish(request)).total_seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 256 MiB image")
    parser.add_argument(
        "--link",
        type=float,
        default=100.0,
        metavar="MBIT",
        help="also install through one shared link of this many Mbit/s (default 100; 0: no)",
    )
    args = parser.parse_args()
    size = 256 * MiB if args.quick else 1024 * MiB
    work = Path(tempfile.mkdtemp(prefix="organixm-delta-bench-"))
    try:
        return run(work, size, args.link)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Row:
    case: Case
    full_bytes: int
    full_seconds: float
    seconds: float
    downloaded: int
    requests: int
    reused: int
    scan: float
    ideal: int
    why: str
    #: Through the shared link (0 when not measured).
    link_full: float
    link_delta: float


def run(work: Path, size: int, link_mbit: float) -> int:
    budget = int(size * 0.68)
    chosen: list[Path] = []
    rest: list[Path] = []
    total = 0
    for path in candidates():
        length = path.stat().st_size
        if total + length <= budget:
            chosen.append(path)
            total += length
        else:
            rest.append(path)
    print(f"tree: {len(chosen)} files, {total / MiB:.0f} MiB from {', '.join(ROOTS)}")
    print(f"image: {size // MiB} MiB ext4 (mkfs.ext4 -d), chunks of {CHUNK // MiB} MiB")
    base = work / "tree"
    copy_files(chosen, base)
    old = mkfs(base, work / "release-1.img", size)
    www = work / "www"
    www.mkdir()
    plain = publish_release(old, www / "cost-plain", "1", 1, with_delta=False)
    with_index = publish_release(old, www / "host", "1", 1, with_delta=True)
    server = start_nginx(www, work / "nginx")
    link = Throttle(server.port, shared=True)
    link.rate = link_mbit * 1e6 / 8 if link_mbit else None
    slot_a = work / "slot-a.img"
    shutil.copyfile(old, slot_a)
    slot_b = work / "slot-b.img"
    rows: list[Row] = []

    def measure(
        url: str, release: Release
    ) -> tuple[float, tuple[float, int, int, int, float, str]]:
        zero_file(slot_b, size)
        full_seconds, _ = asyncio.run(full_install(url, release, slot_b))
        zero_file(slot_b, size)
        drop_cache(slot_a)
        drop_cache(slot_b)
        return full_seconds, asyncio.run(delta_install(url, release, slot_a, slot_b, size))

    try:
        for serial, case in enumerate(CASES, start=2):
            tree = work / f"tree-{case.name}"
            shutil.copytree(base, tree)
            files = sorted(p for p in tree.rglob("*") if p.is_file())
            changed = case.change(files, tree, rest)
            ideal = compressed([p for p in changed if p.exists()])
            image = mkfs(tree, work / f"release-{case.name}.img", size)
            shutil.rmtree(tree)
            name = www / f"case-{case.name}"
            publish_release(image, name, str(serial), serial, with_delta=True)
            image.unlink()
            release = parse_meta(Path(f"{name}.meta").read_bytes(), source=f"{name}.meta")
            assert release.image is not None
            full_bytes = release.image.compressed_size
            full_seconds, (seconds, downloaded, requests, reused, scan, why) = measure(
                f"{server.url}/case-{case.name}", release
            )
            link_full = link_delta = 0.0
            if link_mbit:
                link_full, slow = measure(f"{link.url}/case-{case.name}", release)
                link_delta = slow[0]
            row = Row(
                case,
                full_bytes,
                full_seconds,
                seconds,
                downloaded,
                requests,
                reused,
                scan,
                ideal,
                why,
                link_full,
                link_delta,
            )
            rows.append(row)
            print(
                f"case {case.name} ({case.what}): delta {downloaded / MiB:.1f} MiB of a "
                f"{full_bytes / MiB:.1f} MiB image ({downloaded / full_bytes:.1%}), "
                f"{requests} requests, {reused / MiB:.0f} MiB reused, scan {scan:.1f} s; "
                f"delta {seconds:.1f} s vs full {full_seconds:.1f} s on loopback"
                + (f", {link_delta:.1f} s vs {link_full:.1f} s on the link" if link_mbit else "")
                + (f"; fell back to the full image: {why}" if why else ""),
                flush=True,
            )
    finally:
        link.close()
        server.stop()
    print()
    on_link = f"on {link_mbit:g} Mbit/s" if link_mbit else "on a link (not measured)"
    print(
        "| case | change | downloaded / full image | requests | reused | delta / full install, "
        f"loopback | delta / full install, {on_link} | rsync-style ideal / full image |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        note = f" (full image: {row.why})" if row.why else ""
        on_the_link = (
            f"{row.link_delta / row.link_full:.2f} ({row.link_delta:.1f} s / {row.link_full:.1f} s)"
            if row.link_full
            else "-"
        )
        print(
            f"| {row.case.name} | {row.case.what}{note} | "
            f"{row.downloaded / row.full_bytes:.3f} ({row.downloaded / MiB:.1f} of "
            f"{row.full_bytes / MiB:.1f} MiB) | {row.requests} | {row.reused / MiB:.0f} MiB | "
            f"{row.seconds / row.full_seconds:.2f} ({row.seconds:.1f} s / "
            f"{row.full_seconds:.1f} s) | {on_the_link} | {row.ideal / row.full_bytes:.3f} "
            f"({row.ideal / MiB:.1f} MiB) |"
        )
    print()
    by_name = {row.case.name: row for row in rows}
    b, d = by_name["b"], by_name["d"]
    b_share = b.downloaded / b.full_bytes
    d_cost = d.downloaded / d.full_bytes
    print(
        f"publish with the delta index / without: {with_index / plain:.2f} "
        f"({with_index:.1f} s / {plain:.1f} s)"
    )
    print(
        f"case b downloads {b_share:.1%} of a full image (target <= 15 %): "
        f"{'met' if b_share <= 0.15 else 'NOT met'}"
    )
    ratios = [("loopback", b.seconds / b.full_seconds)]
    if b.link_full:
        ratios.append((on_link, b.link_delta / b.link_full))
    for label, ratio in ratios:
        print(
            f"case b delta time / full install, {label}: {ratio:.2f} (target <= 1.0): "
            f"{'met' if ratio <= 1.0 else 'NOT met'}"
        )
    print(
        f"case d downloads {d_cost:.3f} x a full image (target <= 1.05): "
        f"{'met' if d_cost <= 1.05 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
