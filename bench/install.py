"""Install benchmark: a 1 GiB real ext4 image from nginx and from moto's S3 into a slot.

Prints, in one run, for the same servers on 127.0.0.1:

- the raw download rate (aiohttp GET, bytes discarded);
- organixmd's install rate without and with the read-back pass, into a file slot
  and (as root) a loop-device slot;
- the shell pipeline ``curl | zstd -dc | tee >(sha256sum) | dd bs=4M oflag=direct``;
- the install's peak RSS, and the peak RSS for a 256 MiB and a 4 GiB image;

and the ratios against the targets (install without read-back >= 0.55 x raw
download; with read-back >= 1.5 x the shell pipeline; peak RSS <= 150 MiB; the
4 GiB image's peak RSS at most 10 % above the 256 MiB one's). Figures are printed,
never asserted: they depend on the machine and on what else runs on it.

Each install runs ``Engine.check()`` in a child process (this file with
``--child CONFIG``), so its peak RSS is its own (``VmHWM``). Images and releases
are built once and reused from ``/var/tmp/organixm-bench`` (``ORGANIXM_BENCH_DIR``).

Run: ``.venv/bin/python bench/install.py`` (``--repeat N``: best of N per figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# ``tests.support`` (images, releases, servers) lives beside the package, not in it.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WORK = Path(os.environ.get("ORGANIXM_BENCH_DIR", "/var/tmp/organixm-bench"))
MiB = 1024 * 1024
GiB = 1024 * MiB
#: Chunk size of the benchmark releases: the publisher's default.
CHUNK = 4 * MiB
BUCKET = "organixm-bench"


# --------------------------------------------------------------------------- child


def read_vmhwm_kib() -> int:
    """This process's peak resident set (VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(config_path: Path) -> int:
    """One check (and install) with the daemon's own engine; prints one JSON line."""
    from organixmd.base import logsetup
    from organixmd.base.config import load_config
    from organixmd.service.compose import build_engine

    logsetup.configure("warning")

    async def run() -> tuple[Any, float, float]:
        engine = await build_engine(load_config(config_path))
        started = time.monotonic()
        verdict = await engine.check()
        return verdict, time.monotonic() - started, engine.counters.last_stream_seconds or 0.0

    verdict, seconds, stream_seconds = asyncio.run(run())
    print(
        json.dumps(
            {
                "outcome": verdict.outcome,
                "message": verdict.message,
                "seconds": seconds,
                "stream_seconds": stream_seconds,
                "vmhwm_kib": read_vmhwm_kib(),
            }
        )
    )
    return 0 if verdict.outcome == "staged" else 1


# --------------------------------------------------------------------------- inputs


@dataclass
class Published:
    name: str
    image: Path
    directory: Path
    meta: Any

    @property
    def size(self) -> int:
        return int(self.meta.image.size)

    @property
    def compressed(self) -> int:
        return int(self.meta.image.compressed_size)

    @property
    def object_path(self) -> Path:
        return self.directory / str(self.meta.image.object)


def build_inputs(name: str, size: int, payload: int, tree: Path | None, seed: int) -> Published:
    """A real ext4 image (``mkfs.ext4 -d``) published as a release; reused when present."""
    from organixmd.release.meta import parse_meta
    from tests.support.images import make_ext4_image
    from tests.support.releases import build_release

    image = WORK / f"{name}.img"
    directory = WORK / "pub" / name
    meta_path = directory / "host.meta"
    stamp = WORK / f"{name}.stamp"
    wanted = f"size={size} payload={payload} seed={seed} chunk={CHUNK} tree={tree}\n"
    if not (meta_path.exists() and stamp.exists() and stamp.read_text() == wanted):
        print(f"  building {name}: {size // MiB} MiB ext4 image ...", flush=True)
        started = time.monotonic()
        if tree is None and image.with_suffix(".tree").exists():
            shutil.rmtree(image.with_suffix(".tree"))
        make_ext4_image(image, size, payload_bytes=payload, seed=seed, tree=tree)
        if directory.exists():
            shutil.rmtree(directory)
        build_release(image, directory, name="host", serial=2, chunk_size=CHUNK)
        stamp.write_text(wanted)
        print(f"  built {name} in {time.monotonic() - started:.0f} s", flush=True)
    meta = parse_meta(meta_path.read_bytes())
    return Published(name, image, directory, meta)


# --------------------------------------------------------------------------- measurements


def raw_download(url: str) -> float:
    """Seconds for one GET of ``url`` with aiohttp, the body read and discarded."""
    import aiohttp

    async def fetch() -> float:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            started = time.monotonic()
            async with session.get(url) as response:
                response.raise_for_status()
                received = 0
                # Discarded as it arrives, like a write to /dev/null.
                async for piece in response.content.iter_chunked(1024 * 1024):
                    received += len(piece)
            if received != response.content_length:
                raise RuntimeError(f"{url}: got {received} of {response.content_length} bytes")
            return time.monotonic() - started

    return asyncio.run(fetch())


def shell_pipeline(url: str, slot: Path, expected_sha256: str) -> float:
    """Seconds for ``curl | zstd -dc | tee >(sha256sum) | dd of=SLOT bs=4M oflag=direct``."""
    digest_file = WORK / "pipeline.sha256"
    digest_file.unlink(missing_ok=True)
    script = (
        "set -euo pipefail; "
        f"curl -sSf '{url}' | zstd -dc | tee >(sha256sum > '{digest_file}') "
        f"| dd of='{slot}' bs=4M oflag=direct status=none; "
        # The process substitution may still be hashing when dd is done.
        f"while [ ! -s '{digest_file}' ]; do sleep 0.005; done"
    )
    started = time.monotonic()
    subprocess.run(["bash", "-c", script], check=True)
    seconds = time.monotonic() - started
    got = digest_file.read_text().split()[0]
    if got != expected_sha256:
        raise RuntimeError(f"shell pipeline produced SHA-256 {got}, expected {expected_sha256}")
    return seconds


@dataclass
class InstallRun:
    seconds: float
    stream_seconds: float
    vmhwm_kib: int


def install(
    label: str, url: str, slot_b: Path, *, readback: bool, source: str = "", env: dict[str, str]
) -> InstallRun:
    """One fresh install (empty state) of ``url`` into ``slot_b`` in a child process."""
    from organixmd.boot.machine import BootControl

    run = WORK / "runs" / label
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    # A tiny booted slot: the engine's first-boot identification (hashing the whole
    # booted slot) is not part of an install and is kept out of the timing.
    (run / "slot-a").write_bytes(bytes(4096))
    (run / "cmdline").write_text("organixm.slot=a\n")
    BootControl(run / "grubenv", run / "grubenv.bak").initialize("a")
    config = run / "organixmd.toml"
    config.write_text(
        f"""
[source]
url = "{url}"
{source}
[slots]
a = "{run / "slot-a"}"
b = "{slot_b}"
cmdline = "{run / "cmdline"}"
[boot]
grubenv = "{run / "grubenv"}"
[daemon]
state_dir = "{run / "state"}"
socket = "{run / "control.sock"}"
host_id_file = "{run / "machine-id"}"
[install]
readback = {"true" if readback else "false"}
"""
    )
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"install {label} failed: {done.stdout}{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return InstallRun(
        seconds=result["seconds"],
        stream_seconds=result["stream_seconds"],
        vmhwm_kib=result["vmhwm_kib"],
    )


def stage_rates(release: Published) -> tuple[float, float]:
    """Single-thread MB/s of SHA-256 (4 MiB updates) and of decompressing the image's frames.

    Measured now, under whatever else runs on the machine: the reference that tells
    a slow pipeline from a busy machine.
    """
    import hashlib

    import zstandard

    data = release.image.read_bytes()[: 256 * MiB]
    started = time.monotonic()
    digest = hashlib.sha256()
    for offset in range(0, len(data), 4 * MiB):
        digest.update(data[offset : offset + 4 * MiB])
    sha = len(data) / (time.monotonic() - started) / 1e6
    chunks = release.meta.image.chunks[:64]
    blob = release.object_path.read_bytes()[: chunks[-1].offset + chunks[-1].length]
    dctx = zstandard.ZstdDecompressor()
    out = bytearray(CHUNK)
    started = time.monotonic()
    for chunk in chunks:
        frame = blob[chunk.offset : chunk.offset + chunk.length]
        with dctx.stream_reader(frame) as reader:
            reader.readinto(out)
    zstd = len(chunks) * CHUNK / (time.monotonic() - started) / 1e6
    return sha, zstd


def best(values: list[float]) -> float:
    return min(values)


def rate(size: int, seconds: float) -> float:
    return size / seconds / 1e6


# --------------------------------------------------------------------------- servers


@contextmanager
def servers(release: Published) -> Iterator[tuple[Any, Any, str]]:
    """nginx over WORK/pub and moto's S3 with the release uploaded (meta last).

    Also yields a presigned URL of the image object on S3, for plain HTTP clients.
    """
    import boto3

    from tests.support.nginx import start_nginx
    from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, start_moto

    nginx = start_nginx(WORK / "pub", WORK / "nginx")
    moto = start_moto(WORK / "moto.log")
    try:
        client = boto3.client(
            "s3",
            endpoint_url=moto.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        client.create_bucket(Bucket=BUCKET)
        started = time.monotonic()
        for path in (release.object_path, release.directory / "host.meta"):
            key = f"{release.name}/{path.relative_to(release.directory)}"
            with open(path, "rb") as body:
                client.put_object(Bucket=BUCKET, Key=key, Body=body)
        print(f"  uploaded to moto in {time.monotonic() - started:.1f} s", flush=True)
        presigned = client.generate_presigned_url(
            "get_object",
            Params={"Bucket": BUCKET, "Key": f"{release.name}/{release.meta.image.object}"},
            ExpiresIn=3600,
        )
        yield nginx, moto, presigned
    finally:
        nginx.stop()
        moto.stop()


@contextmanager
def loop_device(backing: Path, size: int) -> Iterator[Path | None]:
    """A loop device over ``backing`` (as root), detached on exit; ``None`` otherwise."""
    if os.geteuid() != 0:
        yield None
        return
    prepare_slot(backing, size)
    device = Path(
        subprocess.run(
            ["losetup", "--find", "--show", str(backing)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=False)


def prepare_slot(path: Path, size: int) -> Path:
    """A slot file with its blocks allocated, like a partition (not a sparse file)."""
    if not path.exists() or path.stat().st_size < size:
        with open(path, "wb") as handle:
            os.posix_fallocate(handle.fileno(), 0, size)
    return path


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs per figure (best is shown)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    for tool in ("nginx", "curl", "zstd", "mkfs.ext4", "dd", "sha256sum"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench/install.py: {tool} is missing; run 'make deps'", file=sys.stderr)
            return 1
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"organixm install benchmark; work directory {WORK}; {os.cpu_count()} CPUs")
    print("inputs:")
    # ~640 MiB of generated files in a 1 GiB ext4 image: about 3.5:1 with zstd -3.
    big = build_inputs("img1g", 1 * GiB, 640 * MiB, None, seed=1)
    small = build_inputs("img256m", 256 * MiB, 160 * MiB, None, seed=2)
    # The 4 GiB image is a real ext4 filesystem made from the 1 GiB image's files:
    # 4 GiB to stream, hash and write, most of it empty space that compresses well.
    huge = build_inputs("img4g", 4 * GiB, 0, WORK / "img1g.tree", seed=1)
    for item in (big, small, huge):
        print(
            f"  {item.name}: {item.size / MiB:.0f} MiB -> {item.compressed / MiB:.0f} MiB "
            f"(ratio {item.size / item.compressed:.2f}), {len(item.meta.image.chunks)} chunks"
        )
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    slot_file = prepare_slot(WORK / "slot-b.img", big.size)
    results: dict[str, float] = {}
    peak_kib = 0

    def record(name: str, runs: list[float], size: int, rss_kib: int | None = None) -> float:
        value = rate(size, best(runs))
        spread = ", ".join(f"{rate(size, s):.0f}" for s in runs)
        results[name] = value
        memory = f"; peak RSS {rss_kib / 1024:.0f} MiB" if rss_kib is not None else ""
        print(f"  {name:<44} {value:7.0f} MB/s   (runs: {spread}{memory})", flush=True)
        return value

    load_before = os.getloadavg()[0]
    sha, zstd = stage_rates(big)
    # Read-back on: thread 1 decompresses, thread 2 hashes each chunk and writes, so the
    # stream is bound by the slower of the two. Read-back off: each thread decompresses
    # or hashes once and hashes once more, bound by 1 / (1/zstd + 1/sha).
    print(
        f"machine now: load average {load_before:.1f}; one thread does SHA-256 at {sha:.0f} "
        f"MB/s and zstd decompression at {zstd:.0f} MB/s; bounds: stream with read-back "
        f"~{min(sha, zstd):.0f} MB/s, stream without read-back ~{1 / (1 / sha + 1 / zstd):.0f} "
        "MB/s (before the network's share of the two cores)"
    )
    print("servers:")
    with (
        servers(big) as (nginx, moto, presigned),
        loop_device(WORK / "loop-b.backing", big.size) as loop,
    ):
        s3_env = {**base_env, **moto.credentials_env()}
        http_url = f"{nginx.url}/{big.name}/host"
        s3_url = f"s3://{BUCKET}/{big.name}/host"
        s3_source = f's3_endpoint = "{moto.endpoint}"'
        object_http = f"{nginx.url}/{big.name}/{big.meta.image.object}"
        object_s3 = presigned
        print(
            f"results (1 GiB image, best of {args.repeat}): installs and the shell pipeline in "
            "MB/s of image bytes written; raw downloads in MB/s of (compressed) bytes received, "
            "which is how the targets compare them"
        )
        repeat = range(args.repeat)
        for label, url in (("nginx", object_http), ("moto S3", object_s3)):
            runs = [raw_download(url) for _ in repeat]
            record(f"raw download, {label}", runs, big.compressed)
        slots: list[tuple[str, Path]] = [("file slot", slot_file)]
        if loop is not None:
            slots.append(("loop slot", loop))
        for source_label, url, source, env in (
            ("nginx", http_url, "", base_env),
            ("moto S3", s3_url, s3_source, s3_env),
        ):
            for slot_label, slot in slots:
                for readback in (False, True):
                    mode = "on" if readback else "off"
                    label = f"install {source_label}, {slot_label}, readback {mode}"
                    installs = [
                        install(
                            label.replace(" ", "-").replace(",", ""),
                            url,
                            slot,
                            readback=readback,
                            source=source,
                            env=env,
                        )
                        for _ in repeat
                    ]
                    rss_kib = max(run.vmhwm_kib for run in installs)
                    peak_kib = max(peak_kib, rss_kib)
                    record(label, [run.seconds for run in installs], big.size, rss_kib)
                    if readback:
                        # The same installs up to the end of the stream (chunk-checked
                        # writes), before the read-back hashes the whole slot.
                        record(
                            f"install {source_label}, {slot_label}, stream phase",
                            [run.stream_seconds for run in installs],
                            big.size,
                        )
        for slot_label, slot in slots:
            runs = [shell_pipeline(object_http, slot, big.meta.image.sha256) for _ in repeat]
            record(f"shell pipeline nginx, {slot_label}", runs, big.size)

    print("peak RSS (VmHWM of the installing process, read-back on, from file://):")
    rss: dict[str, int] = {}
    for item in (small, big, huge):
        slot = prepare_slot(WORK / f"slot-rss-{item.name}.img", item.size)
        rss_runs = [
            install(
                f"rss-{item.name}",
                f"file://{item.directory}/host",
                slot,
                readback=True,
                env=base_env,
            )
            for _ in repeat
        ]
        rss[item.name] = max(run.vmhwm_kib for run in rss_runs)
        peak_kib = max(peak_kib, rss[item.name])
        rate_text = f"{rate(item.size, best([r.seconds for r in rss_runs])):.0f} MB/s"
        print(f"  {item.name:<10} {rss[item.name] / 1024:6.1f} MiB   ({rate_text})")

    print(f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)")
    print("against the targets:")

    def ratio(name: str, value: float, target: float, higher: bool = True) -> None:
        met = value >= target if higher else value <= target
        sign = ">=" if higher else "<="
        print(f"  {name:<58} {value:6.2f}  (target {sign} {target}: {'met' if met else 'MISSED'})")

    for source_label, raw in (
        ("nginx", "raw download, nginx"),
        ("moto S3", "raw download, moto S3"),
    ):
        for slot_label, _ in slots:
            key = f"install {source_label}, {slot_label}, readback off"
            ratio(
                f"{source_label} {slot_label}: install (no read-back) / raw",
                results[key] / results[raw],
                0.55,
            )
            key = f"install {source_label}, {slot_label}, stream phase"
            ratio(
                f"{source_label} {slot_label}: stream before read-back / raw",
                results[key] / results[raw],
                0.55,
            )
    for slot_label, _ in slots:
        key = f"install nginx, {slot_label}, readback on"
        ratio(
            f"nginx {slot_label}: install (read-back) / shell pipeline",
            results[key] / results[f"shell pipeline nginx, {slot_label}"],
            1.5,
        )
    ratio("peak RSS of any install, MiB", peak_kib / 1024, 150, higher=False)
    ratio("peak RSS 4 GiB image / 256 MiB image", rss["img4g"] / rss["img256m"], 1.10, higher=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
