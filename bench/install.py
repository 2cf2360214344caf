"""Install benchmark: organixmd's install against every stage alone and the best shell pipeline.

Prints, in one run, on the same real ext4 image, the same servers on 127.0.0.1
(nginx, moto's S3) and the same slot kinds (a preallocated file and, as root, a
loop device):

- every stage alone: the download (curl from nginx, aiohttp from S3), ``zstd -dc``,
  hashlib SHA-256, an ``O_DIRECT`` write (``dd oflag=direct conv=fsync``) and an
  ``O_DIRECT`` read (``dd iflag=direct``), and both at once on the same slot (what the
  device does during an install with read-back);
- the strongest shell pipeline, ``curl | zstd -dc | tee >(openssl dgst -sha256) |
  dd bs=4M iflag=fullblock oflag=direct``, plus its read-back ``dd iflag=direct |
  openssl dgst -sha256``;
- a RAUC-style two-pass install (download the object to a file first, then install
  from the file) as the anchor a download-then-install design gets;
- organixmd's install with read-back (``Engine.check()`` in a child process) from
  nginx and from S3 into both slot kinds, with its peak RSS (``VmHWM``);
- how the install time grows with the image size and with the chunk size;
- an idle daemon's ``VmRSS`` after a no-change poll, and its start to READY;
- ``organixctl publish`` against ``zstd -T0 -3`` on the same image;

and the ratios against their targets, each marked met or NOT met. Figures are
printed, never asserted: they depend on the machine and on what else runs on it,
which is why every ratio compares figures measured in the same run.

Images and releases are built once and reused from ``/var/tmp/organixm-bench``
(``ORGANIXM_BENCH_DIR``). Run: ``.venv/bin/python bench/install.py`` (``--repeat N``:
best of N per figure; ``--quick``: small images, one run each, a smoke test of the
whole benchmark in a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# ``tests.support`` (images, releases, servers) lives beside the package, not in it.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WORK = Path(os.environ.get("ORGANIXM_BENCH_DIR", "/var/tmp/organixm-bench"))
MiB = 1024 * 1024
GiB = 1024 * MiB
#: Chunk size of the benchmark releases unless a scaling row says otherwise.
CHUNK = 4 * MiB
BUCKET = "organixm-bench"


# --------------------------------------------------------------------------- child


def read_status_kib(field_name: str, pid: str = "self") -> int:
    """A ``/proc/PID/status`` figure in KiB (``VmHWM``, ``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(config_path: Path) -> int:
    """One check (and install) with the daemon's own engine; prints one JSON line."""
    from organixmd.base import logsetup
    from organixmd.base.config import load_config
    from organixmd.service.compose import build_host, unobserved

    logsetup.configure("warning")

    async def run() -> tuple[Any, float, float, float]:
        engine = (await build_host(load_config(config_path), unobserved)).engine
        started = time.monotonic()
        cpu = time.process_time()
        verdict = await engine.check()
        cpu = time.process_time() - cpu
        seconds = time.monotonic() - started
        return verdict, seconds, engine.counters.last_stream_seconds or 0.0, cpu

    verdict, seconds, stream_seconds, cpu_seconds = asyncio.run(run())
    print(
        json.dumps(
            {
                "outcome": verdict.outcome,
                "message": verdict.message,
                "seconds": seconds,
                "stream_seconds": stream_seconds,
                "cpu_seconds": cpu_seconds,
                "vmhwm_kib": read_status_kib("VmHWM"),
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
    def chunk_size(self) -> int:
        return int(self.meta.image.chunk_size)

    @property
    def object_path(self) -> Path:
        return self.directory / str(self.meta.image.object)


def build_inputs(
    name: str, size: int, payload: int, tree: Path | None, seed: int, chunk: int = CHUNK
) -> Published:
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
    published = Published(name, image, directory, parse_meta(meta_path.read_bytes()))
    if chunk == CHUNK:
        return published
    return republish(published, chunk)


def republish(base: Published, chunk: int) -> Published:
    """The same image published with another chunk size (for the chunk-size scaling)."""
    from organixmd.release.meta import parse_meta
    from tests.support.releases import build_release

    name = f"{base.name}-c{chunk // MiB}m"
    directory = WORK / "pub" / name
    stamp = WORK / f"{name}.stamp"
    wanted = f"from={base.meta.image.sha256} chunk={chunk}\n"
    if not (stamp.exists() and stamp.read_text() == wanted):
        print(f"  publishing {base.name} again in {chunk // MiB} MiB chunks ...", flush=True)
        if directory.exists():
            shutil.rmtree(directory)
        build_release(base.image, directory, name="host", serial=2, chunk_size=chunk)
        stamp.write_text(wanted)
    return Published(
        name, base.image, directory, parse_meta((directory / "host.meta").read_bytes())
    )


# --------------------------------------------------------------------------- measurements


def settle() -> None:
    """Write back every dirty page first: a figure must not pay for the previous one's
    writes (a downloaded file, say, still on its way to the disk)."""
    os.sync()


def timed(command: list[str] | str, **kwargs: Any) -> float:
    """Seconds one command takes (a string runs under ``bash -c``); it must succeed."""
    argv = ["bash", "-c", f"set -euo pipefail; {command}"] if isinstance(command, str) else command
    settle()
    started = time.monotonic()
    subprocess.run(argv, check=True, **kwargs)
    return time.monotonic() - started


def aiohttp_download(url: str) -> float:
    """Seconds for one GET of ``url`` with aiohttp, the body read and discarded."""
    import aiohttp

    settle()

    async def fetch() -> float:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            started = time.monotonic()
            async with session.get(url) as response:
                response.raise_for_status()
                received = 0
                async for piece in response.content.iter_chunked(1024 * 1024):
                    received += len(piece)
            if received != response.content_length:
                raise RuntimeError(f"{url}: got {received} of {response.content_length} bytes")
            return time.monotonic() - started

    return asyncio.run(fetch())


def hashlib_seconds(path: Path, size: int) -> float:
    """Seconds hashlib SHA-256 takes over ``size`` bytes of ``path``, in 4 MiB updates.

    The hash alone: up to 256 MiB of the image are read into memory first and hashed
    over and over until ``size`` bytes are done (the install hashes buffers in memory,
    it never reads the image from a file).
    """
    with open(path, "rb") as handle:
        blocks = [handle.read(4 * MiB) for _ in range(min(size, 256 * MiB) // (4 * MiB))]
    digest = hashlib.sha256()
    started = time.monotonic()
    done = 0
    while done < size:
        for block in blocks:
            digest.update(block)
            done += len(block)
            if done >= size:
                break
    return time.monotonic() - started


def stage_cpu_seconds(release: Published) -> dict[str, float]:
    """CPU seconds of each stage's work on the whole image, alone in one thread.

    The daemon's libraries and calls: zstandard decompressing every frame, and
    hashlib SHA-256 in chunk-sized updates, over every byte (``sha256``) and over the
    chunks that are not all zeros (``chunk_sha256``: the publisher remembers the
    digest of a zero chunk). Only the work is timed (``time.thread_time``), not
    reading the files.
    """
    import zstandard

    spent = {"decompress": 0.0, "sha256": 0.0, "chunk_sha256": 0.0}
    decompressor = zstandard.ZstdDecompressor()
    with open(release.object_path, "rb") as handle:
        for chunk in release.meta.image.chunks:
            frame = handle.read(chunk.length)
            started = time.thread_time()
            decompressor.decompress(frame)
            spent["decompress"] += time.thread_time() - started
    zeros = bytes(release.chunk_size)
    with open(release.image, "rb") as handle:
        while block := handle.read(release.chunk_size):
            started = time.thread_time()
            hashlib.sha256(block).digest()
            took = time.thread_time() - started
            spent["sha256"] += took
            if block != zeros[: len(block)]:
                spent["chunk_sha256"] += took
    return spent


def dd_write(image: Path, slot: Path) -> float:
    return timed(
        [
            "dd",
            f"if={image}",
            f"of={slot}",
            "bs=4M",
            "oflag=direct",
            "conv=notrunc,fsync",
            "status=none",
        ]
    )


def dd_read(slot: Path, size: int) -> float:
    return timed(
        [
            "dd",
            f"if={slot}",
            "of=/dev/null",
            "bs=4M",
            "iflag=direct,count_bytes",
            f"count={size}",
            "status=none",
        ]
    )


def dd_write_and_read(image: Path, slot: Path, size: int) -> float:
    """Seconds to write ``image`` into ``slot`` and read ``size`` bytes of it, both at once.

    What the device does during an install with read-back: every byte written once
    (``O_DIRECT``, fsync at the end) and read once (``O_DIRECT``) while the writes go
    on. The image is read from the page cache (it was just read by the other stages).
    """
    return timed(
        f"dd if='{image}' of='{slot}' bs=4M oflag=direct conv=notrunc,fsync status=none & "
        f"dd if='{slot}' of=/dev/null bs=4M iflag=direct,count_bytes count={size} status=none; "
        "wait $!"
    )


def shell_pipeline(url: str, slot: Path, size: int, expected: str) -> tuple[float, float]:
    """Seconds of the strongest shell pipeline and of its read-back; both digests checked."""
    digest_file = WORK / "pipeline.sha256"
    digest_file.unlink(missing_ok=True)
    stream = timed(
        f"curl -sSf '{url}' | zstd -dc | tee >(openssl dgst -sha256 -r > '{digest_file}') "
        f"| dd of='{slot}' bs=4M iflag=fullblock oflag=direct conv=notrunc status=none; "
        # The process substitution may still be hashing when dd is done.
        f"while [ ! -s '{digest_file}' ]; do sleep 0.005; done"
    )
    got = digest_file.read_text().split()[0]
    if got != expected:
        raise RuntimeError(f"shell pipeline produced SHA-256 {got}, expected {expected}")
    readback_file = WORK / "readback.sha256"
    readback = timed(
        f"dd if='{slot}' bs=4M iflag=direct,count_bytes count={size} status=none "
        f"| openssl dgst -sha256 -r > '{readback_file}'"
    )
    got = readback_file.read_text().split()[0]
    if got != expected:
        raise RuntimeError(f"shell read-back produced SHA-256 {got}, expected {expected}")
    return stream, readback


@dataclass
class InstallRun:
    seconds: float
    stream_seconds: float
    vmhwm_kib: int
    #: CPU seconds (user and system, all threads) of the check in the child.
    cpu_seconds: float


def fresh_host(label: str, url: str, slot_b: Path, *, source: str = "", extra: str = "") -> Path:
    """A host under ``WORK/runs/label`` booted from slot a, empty state; its config path."""
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
readback = true
# The whole image, every time: slot b may hold the release from an earlier run.
delta = false
{extra}
"""
    )
    return config


def install(
    label: str,
    url: str,
    slot_b: Path,
    *,
    source: str = "",
    env: dict[str, str],
    extra: str = "",
) -> InstallRun:
    """One fresh install (empty state) of ``url`` into ``slot_b`` in a child process."""
    config = fresh_host(label, url, slot_b, source=source, extra=extra)
    settle()
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
        cpu_seconds=result["cpu_seconds"],
    )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_daemon(release: Published) -> tuple[int, float, float]:
    """A real daemon after its no-change poll: ``VmRSS`` (KiB), start to READY (s), and
    the CPU seconds it then uses in 10 idle seconds.

    The host's booted slot already holds the release, so the boot-time check finds
    nothing to do (the poll every idle daemon runs).
    """
    from tests.support.daemon import DaemonProcess, prepare_host

    root = WORK / "idle"
    if root.exists():
        shutil.rmtree(root)
    host = prepare_host(root, f"{release.directory.as_uri()}/host", installed=release.image)
    try:
        started = time.monotonic()
        daemon = DaemonProcess(host).start()
        ready = time.monotonic() - started
        try:
            status = daemon.wait_ready()
            if status["phase"] != "idle":
                raise RuntimeError(f"the idle daemon is not idle: {status}")
            pid = daemon.daemon_pid()
            rss = read_status_kib("VmRSS", str(pid))
            before = cpu_seconds(pid)
            time.sleep(10)
            idle_cpu = cpu_seconds(pid) - before
        finally:
            daemon.stop()
    finally:
        host.cleanup()
    return rss, ready, idle_cpu


#: (seconds, CPU seconds of the child) of each run of a command timed by :func:`timed_cpu`.
CHILD_RUNS: dict[str, list[tuple[float, float]]] = {}


def timed_cpu(label: str, command: list[str], **kwargs: Any) -> float:
    """:func:`timed`, also keeping the user and system CPU seconds the command used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = timed(command, **kwargs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    CHILD_RUNS.setdefault(label, []).append((seconds, cpu))
    return seconds


def fastest_cpu(label: str) -> tuple[float, float]:
    """(seconds, CPU seconds) of the fastest run of ``label``."""
    return min(CHILD_RUNS[label])


def publish_seconds(image: Path, serial: int, *options: str) -> float:
    """Seconds of ``organixctl publish`` of ``image`` into a fresh directory (unsigned)."""
    target = WORK / "publish"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    ctl = str(Path(sys.executable).with_name("organixctl"))
    return timed_cpu(
        "publish" + "".join(options),
        [
            ctl,
            "publish",
            str(image),
            "--to",
            str(target / "host"),
            "--version",
            f"1.{serial}",
            "--serial",
            str(serial),
            "--allow-unsigned",
            *options,
        ],
        stdout=subprocess.DEVNULL,
    )


def zstd_cli_seconds(image: Path) -> float:
    out = WORK / "zstd-T0.zst"
    seconds = timed_cpu("zstd", ["zstd", "-q", "-f", "-T0", "-3", str(image), "-o", str(out)])
    out.unlink()
    return seconds


# --------------------------------------------------------------------------- servers


@contextmanager
def servers(releases: list[Published]) -> Iterator[tuple[Any, Any, Callable[[Published], str]]]:
    """nginx over WORK/pub and moto's S3 with ``releases`` uploaded (meta last).

    Also yields a function giving a presigned URL of a release's image object on S3,
    for plain HTTP clients.
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
        for release in releases:
            for path in (release.object_path, release.directory / "host.meta"):
                key = f"{release.name}/{path.relative_to(release.directory)}"
                with open(path, "rb") as body:
                    client.put_object(Bucket=BUCKET, Key=key, Body=body)
        print(f"  uploaded to moto in {time.monotonic() - started:.1f} s", flush=True)

        def presign(release: Published) -> str:
            url: str = client.generate_presigned_url(
                "get_object",
                Params={"Bucket": BUCKET, "Key": f"{release.name}/{release.meta.image.object}"},
                ExpiresIn=3600,
            )
            return url

        yield nginx, moto, presign
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


# --------------------------------------------------------------------------- report


@dataclass
class Report:
    repeat: int
    rates: dict[str, float] = field(default_factory=dict)
    ratios: list[tuple[str, float, float, bool]] = field(default_factory=list)

    def measure(self, name: str, size: int, run: Callable[[], float], note: str = "") -> float:
        """Best of ``repeat`` runs of ``run`` (seconds), printed and kept as MB/s of ``size``."""
        runs = [run() for _ in range(self.repeat)]
        return self.record(name, size, runs, note)

    def record(self, name: str, size: int, runs: list[float], note: str = "") -> float:
        value = size / min(runs) / 1e6
        spread = ", ".join(f"{size / s / 1e6:.0f}" for s in runs)
        self.rates[name] = value
        extra = f"; {note}" if note else ""
        print(f"  {name:<52} {value:7.0f} MB/s   (runs: {spread}{extra})", flush=True)
        return value

    def ratio(self, name: str, value: float, target: float, higher: bool = True) -> None:
        self.ratios.append((name, value, target, higher))

    def print_ratios(self) -> None:
        print("against the targets:")
        for name, value, target, higher in self.ratios:
            met = value >= target if higher else value <= target
            sign = ">=" if higher else "<="
            verdict = "met" if met else "NOT met"
            print(f"  {name:<62} {value:7.2f}  (target {sign} {target}: {verdict})")


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs per figure (best is shown)")
    parser.add_argument(
        "--quick", action="store_true", help="small images, one run each: a smoke test"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    for tool in ("nginx", "curl", "zstd", "mkfs.ext4", "dd", "openssl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench/install.py: {tool} is missing; run 'make deps'", file=sys.stderr)
            return 1
    WORK.mkdir(parents=True, exist_ok=True)
    repeat = 1 if args.quick else args.repeat
    report = Report(repeat)
    print(
        f"organixm install benchmark; work directory {WORK}; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f} at the start"
    )
    print("inputs:")
    if args.quick:
        main_image = build_inputs("q256m", 256 * MiB, 160 * MiB, None, seed=3)
        sized = [build_inputs("q64m", 64 * MiB, 40 * MiB, None, seed=4), main_image]
    else:
        # ~640 MiB of generated files in a 1 GiB ext4 image: about 3.9:1 with zstd -3.
        main_image = build_inputs("img1g", 1 * GiB, 640 * MiB, None, seed=1)
        # The 4 GiB image is a real ext4 file system made from the 1 GiB image's files:
        # 4 GiB to stream, hash, write and read back, most of it empty space.
        sized = [
            build_inputs("img256m", 256 * MiB, 160 * MiB, None, seed=2),
            main_image,
            build_inputs("img4g", 4 * GiB, 0, WORK / "img1g.tree", seed=1),
        ]
    chunked = [republish(main_image, 1 * MiB), main_image, republish(main_image, 16 * MiB)]
    for item in (*sized, chunked[0], chunked[2]):
        print(
            f"  {item.name}: {item.size / MiB:.0f} MiB -> {item.compressed / MiB:.0f} MiB "
            f"(ratio {item.size / item.compressed:.2f}), {len(item.meta.image.chunks)} chunks "
            f"of {item.chunk_size // MiB} MiB"
        )
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    size = main_image.size
    slot_file = prepare_slot(WORK / "slot-b.img", size)
    installs: dict[str, list[InstallRun]] = {}

    def daemon_install(label: str, url: str, slot: Path, **kwargs: Any) -> list[InstallRun]:
        runs = [
            install(label.replace(" ", "-").replace(",", ""), url, slot, **kwargs)
            for _ in range(repeat)
        ]
        installs[label] = runs
        return runs

    with (
        servers([main_image]) as (nginx, moto, presign),
        loop_device(WORK / "loop-b.backing", size) as loop,
    ):
        s3_env = {**base_env, **moto.credentials_env()}
        object_http = f"{nginx.url}/{main_image.name}/{main_image.meta.image.object}"
        sources = [
            ("nginx", f"{nginx.url}/{main_image.name}/host", "", base_env),
            (
                "S3",
                f"s3://{BUCKET}/{main_image.name}/host",
                f's3_endpoint = "{moto.endpoint}"',
                s3_env,
            ),
        ]
        slots: list[tuple[str, Path]] = [("file slot", slot_file)]
        if loop is not None:
            slots.append(("loop slot", loop))
        print(
            f"every stage alone ({main_image.name}, best of {repeat}; MB/s of image bytes, "
            "a download's too: image bytes over its seconds):"
        )
        report.measure(
            "download, nginx (curl > /dev/null)",
            size,
            lambda: timed(["curl", "-sSf", "-o", "/dev/null", object_http]),
        )
        report.measure(
            "download, S3 (aiohttp, presigned)",
            size,
            lambda: aiohttp_download(presign(main_image)),
        )
        report.measure(
            "zstd -dc > /dev/null",
            size,
            lambda: timed(f"zstd -dc '{main_image.object_path}' > /dev/null"),
        )
        report.measure(
            "SHA-256, hashlib, 4 MiB blocks", size, lambda: hashlib_seconds(main_image.image, size)
        )
        for slot_label, slot in slots:
            report.measure(
                f"O_DIRECT write, {slot_label} (dd, fsync)",
                size,
                functools.partial(dd_write, main_image.image, slot),
            )
            report.measure(
                f"O_DIRECT read, {slot_label} (dd)",
                size,
                functools.partial(dd_read, slot, size),
            )
            report.measure(
                f"O_DIRECT write and read at once, {slot_label} (dd & dd)",
                size,
                functools.partial(dd_write_and_read, main_image.image, slot, size),
            )
        print("shell pipelines and the two-pass anchor (nginx):")
        for slot_label, slot in slots:
            shell = [
                shell_pipeline(object_http, slot, size, main_image.meta.image.sha256)
                for _ in range(repeat)
            ]
            report.record(f"shell pipeline, {slot_label}", size, [s for s, _ in shell])
            report.record(
                f"shell pipeline + read-back, {slot_label}",
                size,
                [s + r for s, r in shell],
            )
        download = WORK / "rauc" / main_image.name
        for slot_label, slot in slots:
            totals = []
            for _ in range(repeat):
                if download.exists():
                    shutil.rmtree(download)
                (download / "images").mkdir(parents=True)
                shutil.copy(main_image.directory / "host.meta", download / "host.meta")
                fetched = timed(
                    [
                        "curl",
                        "-sSf",
                        "-o",
                        str(download / str(main_image.meta.image.object)),
                        object_http,
                    ]
                )
                run = install(
                    f"rauc-{slot_label.split()[0]}",
                    f"file://{download}/host",
                    slot,
                    env=base_env,
                )
                totals.append(fetched + run.seconds)
            report.record(f"download, then install from the file, {slot_label}", size, totals)
        print("organixmd install with read-back (Engine.check() in a child process):")
        for source_label, url, source, env in sources:
            for slot_label, slot in slots:
                label = f"install {source_label}, {slot_label}"
                runs = daemon_install(label, url, slot, source=source, env=env)
                rss = max(run.vmhwm_kib for run in runs) / 1024
                best = min(runs, key=lambda run: run.seconds)
                cores = best.cpu_seconds / best.seconds
                report.record(
                    label,
                    size,
                    [run.seconds for run in runs],
                    f"peak RSS {rss:.0f} MiB; {cores:.2f} CPUs busy",
                )
                report.record(
                    f"  its stream until the last write, {source_label}, {slot_label}",
                    size,
                    [run.stream_seconds for run in runs],
                )

        print(f"scaling (nginx, file slot, best of {repeat}):")
        rss_by_size: dict[str, float] = {}
        per_gib: dict[str, float] = {}
        for item in sized:
            slot = prepare_slot(WORK / f"slot-size-{item.name}.img", item.size)
            url = f"{nginx.url}/{item.name}/host"
            runs = daemon_install(f"size {item.name}", url, slot, env=base_env)
            seconds = min(run.seconds for run in runs)
            rss_by_size[item.name] = max(run.vmhwm_kib for run in runs) / 1024
            per_gib[item.name] = seconds / (item.size / GiB)
            print(
                f"  image {item.size / MiB:6.0f} MiB: {seconds:6.2f} s, "
                f"{per_gib[item.name]:5.2f} s per GiB, {item.size / seconds / 1e6:5.0f} MB/s, "
                f"peak RSS {rss_by_size[item.name]:.1f} MiB",
                flush=True,
            )
        for item in chunked:
            url = f"{nginx.url}/{item.name}/host"
            runs = daemon_install(f"chunk {item.name}", url, slot_file, env=base_env)
            seconds = min(run.seconds for run in runs)
            rss = max(run.vmhwm_kib for run in runs) / 1024
            print(
                f"  chunk {item.chunk_size // MiB:3d} MiB ({item.name}): {seconds:6.2f} s, "
                f"{item.size / seconds / 1e6:5.0f} MB/s, peak RSS {rss:.1f} MiB",
                flush=True,
            )

    print("idle daemon and publisher:")
    idle_rss, ready, idle_cpu = idle_daemon(sized[0])
    print(
        f"  idle daemon after a no-change poll: VmRSS {idle_rss / 1024:.1f} MiB; "
        f"READY in {ready:.2f} s; then {idle_cpu:.2f} CPU seconds in 10 s idle"
    )
    serials = iter(range(10, 100))
    publish = report.measure(
        "organixctl publish --no-delta (local directory)",
        size,
        lambda: publish_seconds(main_image.image, next(serials), "--no-delta"),
    )
    report.measure(
        "organixctl publish, with its delta index",
        size,
        lambda: publish_seconds(main_image.image, next(serials)),
    )
    zstd_t0 = report.measure(
        "zstd -T0 -3 (to a file)", size, lambda: zstd_cli_seconds(main_image.image)
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)")

    rates = report.rates
    stages = ["zstd -dc > /dev/null", "SHA-256, hashlib, 4 MiB blocks"]
    cores = os.cpu_count() or 1
    spent = min(
        (stage_cpu_seconds(main_image) for _ in range(repeat)),
        key=lambda figures: sum(figures.values()),
    )
    gib_scale = GiB / size
    slowest_name = min(stages, key=lambda name: rates[name])
    slowest_stage = rates[slowest_name]
    # The work no install can skip: every byte decompressed once and SHA-256-hashed
    # twice (its chunk before the write, the whole image as read back from the device:
    # the meta holds both digests and the invariant checks both). Spread over every
    # CPU with nothing else to do, it still takes this long.
    install_work = spent["decompress"] + 2 * spent["sha256"]
    install_bound = size / (install_work / cores) / 1e6
    # The publisher compresses as zstd -T0 does (zstd at the same level, its
    # content checksum too) and on top hashes every byte that is not in a zero chunk
    # for its chunk, every byte for the whole image, and the compressed object for its
    # content address. On ``cores`` CPUs doing nothing else it takes at least the
    # CPU seconds zstd spent plus that hashing, spread over all of them.
    zstd_seconds, zstd_cpu = fastest_cpu("zstd")
    publish_seconds_, publish_cpu = fastest_cpu("publish--no-delta")
    hashing = spent["chunk_sha256"] + spent["sha256"] * (1 + main_image.compressed / size)
    publish_floor = (zstd_cpu + hashing) / cores
    print(
        f"CPU budget ({main_image.name}, one thread each, CPU seconds per GiB): decompress "
        f"{spent['decompress'] * gib_scale:.2f}, SHA-256 {spent['sha256'] * gib_scale:.2f}, "
        f"SHA-256 of the chunks that are not all zeros {spent['chunk_sha256'] * gib_scale:.2f}"
    )
    print(
        f"  install: decompress + 2 x SHA-256 = {install_work * gib_scale:.2f} CPU s per GiB; on "
        f"{cores} CPUs at best {install_bound:.0f} MB/s = "
        f"{install_bound / slowest_stage:.2f} x {slowest_name.split(',')[0]} alone"
    )
    for source_label, _, _, _ in sources:
        for slot_label, _ in slots:
            name = f"install {source_label}, {slot_label}"
            best = min(installs[name], key=lambda run: run.seconds)
            device = rates[f"O_DIRECT write and read at once, {slot_label} (dd & dd)"]
            print(
                f"    {name:<30} {rates[name] / install_bound:5.2f} of that bound, "
                f"{rates[name] / device:.2f} x dd writing and reading the slot at once; "
                f"its process used {best.cpu_seconds * gib_scale:.2f} CPU s per GiB"
            )
    print(
        f"  publish: zstd -T0 -3 used {zstd_cpu * gib_scale:.2f} CPU s per GiB "
        f"({zstd_cpu / zstd_seconds:.2f} CPUs busy); the publisher needs that plus "
        f"{hashing * gib_scale:.2f} of SHA-256, so on {cores} CPUs at least "
        f"{publish_floor * gib_scale:.2f} s per GiB = at best "
        f"{zstd_seconds / publish_floor:.2f} x zstd -T0 -3"
    )
    print(
        f"    organixctl publish --no-delta used {publish_cpu * gib_scale:.2f} CPU s per GiB "
        f"({publish_cpu / publish_seconds_:.2f} CPUs busy), {publish_floor / publish_seconds_:.2f}"
        " of that bound"
    )
    for source_label, _, _, _ in sources:
        for slot_label, _ in slots:
            names = [
                *stages,
                "download, nginx (curl > /dev/null)"
                if source_label == "nginx"
                else "download, S3 (aiohttp, presigned)",
                f"O_DIRECT write, {slot_label} (dd, fsync)",
                f"O_DIRECT read, {slot_label} (dd)",
            ]
            slowest = min(names, key=lambda name: rates[name])
            report.ratio(
                f"{source_label}, {slot_label}: install / slowest stage ({slowest.split(',')[0]})",
                rates[f"install {source_label}, {slot_label}"] / rates[slowest],
                0.9,
            )
    for slot_label, _ in slots:
        report.ratio(
            f"nginx, {slot_label}: install / shell pipeline + read-back",
            rates[f"install nginx, {slot_label}"]
            / rates[f"shell pipeline + read-back, {slot_label}"],
            1.5,
        )
    # The default chunk size: every source, slot and image size (the chunk-size rows
    # print their own, larger for larger chunks).
    for source_label, _, _, _ in sources:
        peak = max(
            run.vmhwm_kib
            for label, runs in installs.items()
            if label.startswith(f"install {source_label},")
            or (source_label == "nginx" and label.startswith("size "))
            for run in runs
        )
        report.ratio(
            f"peak RSS of any {source_label} install ({CHUNK // MiB} MiB chunks), MiB",
            peak / 1024,
            100,
            higher=False,
        )
    smallest, largest = sized[0], sized[-1]
    report.ratio(
        f"peak RSS {largest.size // MiB} MiB image / {smallest.size // MiB} MiB image",
        rss_by_size[largest.name] / rss_by_size[smallest.name],
        1.1,
        higher=False,
    )
    report.ratio(
        f"install s/GiB, {largest.size // MiB} MiB / {main_image.size // MiB} MiB (linear: ~1)",
        per_gib[largest.name] / per_gib[main_image.name],
        1.1,
        higher=False,
    )
    report.ratio("idle daemon VmRSS, MiB", idle_rss / 1024, 60, higher=False)
    report.ratio("publish --no-delta / zstd -T0 -3", publish / zstd_t0, 0.8)
    report.print_ratios()
    return 0


if __name__ == "__main__":
    sys.exit(main())
