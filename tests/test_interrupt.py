"""Interrupted installs resume: a killed client, ``kill -9`` at random points, a server gone;
a write killed before its rename leaves nothing behind once the daemon starts again.

Every case uses a real ``organixmd --once`` process and a real nginx whose
``limit_rate`` makes the download take a few seconds, so the interruption lands
mid-stream. The server's access log shows what the next run asked for: a Range
request starting at the first unverified chunk, not at byte zero.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from organixmd.boot import grubenv
from organixmd.boot.machine import state_from_env
from tests.support.daemon import (
    DaemonProcess,
    make_images,
    prepare_host,
    request,
    strace_delaying,
)
from tests.support.images import make_ext4_image
from tests.support.nginx import AccessLogEntry, Nginx, start_nginx
from tests.support.releases import BuiltRelease, build_release
from tests.test_sources import CliHost

MiB = 1024 * 1024
#: Seconds a whole download takes under the rate limit.
DOWNLOAD_SECONDS = 3.0
#: Checkpoint after every chunk, so a kill loses at most the chunks in flight.
EVERY_CHUNK = "[install]\ncheckpoint_interval = 0.0"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> BuiltRelease:
    """A real 32 MiB ext4 image published in 512 KiB chunks (64 chunks)."""
    root = tmp_path_factory.mktemp("interrupt")
    image = make_ext4_image(root / "root.img", 32 * MiB, payload_bytes=20 * MiB, seed=21)
    return build_release(image, root / "pub" / "fleet", serial=3, chunk_size=512 * 1024)


def rate_for(release: BuiltRelease, seconds: float = DOWNLOAD_SECONDS) -> str:
    """An nginx limit_rate that makes the image download last about ``seconds``."""
    return f"{int(release.meta.image.compressed_size / seconds / 1024)}k"


@pytest.fixture
def slow_nginx(release: BuiltRelease, tmp_path: Path) -> Iterator[Nginx]:
    server = start_nginx(release.directory.parent, tmp_path / "nginx", limit_rate=rate_for(release))
    try:
        yield server
    finally:
        server.stop()


def read_progress(host: CliHost) -> dict[str, Any] | None:
    """The install checkpoint in the state file, if the file and a checkpoint exist."""
    try:
        state = json.loads(host.state_text())
    except (OSError, ValueError):
        return None
    progress: dict[str, Any] | None = state.get("progress")
    return progress


def wait_for_chunks(
    host: CliHost, process: subprocess.Popen[str], chunks: int, timeout: float = 30
) -> int:
    """Poll the state file until it records at least ``chunks`` verified chunks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = read_progress(host)
        if progress is not None and progress["chunks_done"] >= chunks:
            done: int = progress["chunks_done"]
            return done
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"organixmd ended before chunk {chunks}: {out}{err}")
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of {chunks} chunks within {timeout} s")


def image_requests(server: Nginx, release: BuiltRelease) -> list[AccessLogEntry]:
    path = f"/fleet/{release.meta.image.object}"
    return [entry for entry in server.requests() if entry.path == path]


def kill9(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=10)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_client_killed_at_half_resumes_with_range(
    tmp_path: Path, slow_nginx: Nginx, release: BuiltRelease
) -> None:
    """Killed at ~50 %, the next run asks for the rest with a Range request and verifies."""
    chunks = release.meta.image.chunks
    host = CliHost(tmp_path / "host")
    host.write_config(f"{slow_nginx.url}/fleet/host", extra=EVERY_CHUNK)
    process = host.start_once()
    wait_for_chunks(host, process, len(chunks) // 2)
    kill9(process)
    saved = read_progress(host)
    assert saved is not None
    done = saved["chunks_done"]
    assert len(chunks) // 2 <= done < len(chunks)
    assert host.boot_state().next_slot == "a"

    finished = host.run_once()
    host.assert_staged(finished, release.image_path)
    first, second = image_requests(slow_nginx, release)
    assert first.range_start is None
    assert first.body_bytes < release.meta.image.compressed_size
    assert second.status == 206
    assert second.range_start == chunks[done].offset > 0
    assert second.body_bytes < release.meta.image.compressed_size - first.body_bytes // 2
    installed = [e for e in host.state()["history"] if e["event"] == "installed"]
    assert installed[-1]["detail"].endswith(f"resumed at chunk {done}")


@pytest.mark.slow
def test_kill9_at_random_points_then_completes(tmp_path: Path, release: BuiltRelease) -> None:
    """kill -9 at seeded moments, three times; the last run resumes and verifies.

    Each moment is a seeded chunk count the state file must show, plus a seeded fraction
    of a chunk's download time, so the kills land mid-install however slowly this machine
    starts the daemon (a fixed delay after the start was not always mid-install)."""
    rng = random.Random(20261126)
    chunks = release.meta.image.chunks
    targets = sorted(rng.sample(range(2, len(chunks) * 2 // 3), 3))
    extra = [rng.uniform(0.0, 0.15) for _ in targets]
    # About 6 s for the image: a kill at the last target plus its extra time still
    # finds the download unfinished.
    server = start_nginx(
        release.directory.parent, tmp_path / "nginx", limit_rate=rate_for(release, 6.0)
    )
    host = CliHost(tmp_path / "host")
    host.write_config(f"{server.url}/fleet/host", extra=EVERY_CHUNK)
    try:
        checkpoints = kill_repeatedly(host, list(zip(targets, extra, strict=True)))
        finished = host.run_once()
    finally:
        server.stop()
    # Progress only grows: every run resumed where the previous one stopped.
    assert checkpoints == sorted(checkpoints)
    assert checkpoints[0] >= targets[0]
    host.assert_staged(finished, release.image_path)
    starts = [entry.range_start for entry in image_requests(server, release)]
    assert starts[0] is None
    assert starts[-1] == chunks[checkpoints[-1]].offset
    installed = [e for e in host.state()["history"] if e["event"] == "installed"]
    assert installed[-1]["detail"].endswith(f"resumed at chunk {checkpoints[-1]}")


def kill_repeatedly(host: CliHost, moments: list[tuple[int, float]]) -> list[int]:
    """Start organixmd --once and kill -9 it once the state shows ``chunks`` verified
    chunks and ``then`` more seconds passed, for each moment; the checkpoints seen."""
    checkpoints: list[int] = []
    for chunks, then in moments:
        process = host.start_once()
        wait_for_chunks(host, process, chunks)
        time.sleep(then)
        assert process.poll() is None, "organixmd finished before it could be killed"
        kill9(process)
        progress = read_progress(host)
        checkpoints.append(progress["chunks_done"] if progress else 0)
    return checkpoints


@pytest.mark.slow
def test_server_gone_mid_stream_then_resume(tmp_path: Path, release: BuiltRelease) -> None:
    """nginx stopped mid-download: the check ends source-unreachable; the next run resumes."""
    work = tmp_path / "nginx"
    server = start_nginx(release.directory.parent, work, limit_rate=rate_for(release))
    try:
        host = CliHost(tmp_path / "host")
        host.write_config(f"{server.url}/fleet/host", extra=EVERY_CHUNK)
        process = host.start_once()
        wait_for_chunks(host, process, len(release.meta.image.chunks) // 3)
        server.stop()
        out, err = process.communicate(timeout=30)
        assert process.returncode == 12, out + err
        assert out.startswith("error: "), out
        state = host.state()
        assert state["last_verdict"]["outcome"] == "error"
        assert state["last_verdict"]["code"] == "source-unreachable"
        assert state["slots"] == {}
        done = state["progress"]["chunks_done"]
        assert done > 0
        assert host.boot_state().next_slot == "a"

        server = start_nginx(
            release.directory.parent, work, limit_rate=rate_for(release), port=server.port
        )
        finished = host.run_once()
        host.assert_staged(finished, release.image_path)
        last = image_requests(server, release)[-1]
        assert last.status == 206
        assert last.range_start == release.meta.image.chunks[done].offset
    finally:
        server.stop()


#: The daemon under strace: every rename waits before it enters the kernel, so the
#: temporary file of each atomic write stands whole beside its target meanwhile.
HOLD_RENAMES = strace_delaying({"rename,renameat,renameat2": 0.3})


#: What :func:`tempfile.mkstemp` adds to the prefix ``.<target name>.``.
TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}$")


def kill_at_temporary(daemon: DaemonProcess, directory: Path, prefix: str) -> Path:
    """Wait for a temporary ``prefixXXXXXXXX`` file in ``directory``, SIGKILL the daemon."""
    pid = daemon.daemon_pid()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = sorted(p for p in directory.glob(f"{prefix}*") if TEMPORARY.match(p.name))
        if found:
            daemon.kill9(pid)
            return found[0]
        time.sleep(0.005)
    raise AssertionError(f"no {prefix}* in {directory} within 60 s")


def test_temporaries_of_killed_writes_are_removed_at_start(tmp_path: Path) -> None:
    """kill -9 while a state write and then a GRUB environment write wait for their rename:
    the next start removes both temporary files (and nothing else beside them)."""
    images = make_images(tmp_path / "images", 2)
    first = build_release(images[0], tmp_path / "pub", serial=1)
    host = prepare_host(tmp_path / "host", first.url, installed=images[0])
    keep = [host.state_dir / ".state.json.notes", host.grubenv.parent / ".grubenv.x"]
    try:
        host.state_dir.mkdir()
        for path in keep:
            path.write_text("not ours\n")
        # The first state write of the start (the boot assessment's).
        with DaemonProcess(host, prefix=HOLD_RENAMES).start(wait=False) as daemon:
            state_tmp = kill_at_temporary(daemon, host.state_dir, ".state.json.")
        assert state_tmp.exists()
        # A newer release: its flip writes the GRUB environment.
        build_release(images[1], tmp_path / "pub", serial=2)
        with DaemonProcess(host, prefix=HOLD_RENAMES).start(wait=False) as daemon:
            env_tmp = kill_at_temporary(daemon, host.grubenv.parent, ".grubenv.")
        assert env_tmp.exists()
        with DaemonProcess(host).start() as daemon:
            assert not state_tmp.exists(), state_tmp
            assert not env_tmp.exists(), env_tmp
            assert all(path.read_text() == "not ours\n" for path in keep)
            assert "removed_temporaries" in daemon.output()
            assert daemon.stop() == 0
    finally:
        host.cleanup()


JSON = {"Content-Type": "application/json"}


def post_ignoring_the_kill(socket: Path, path: str) -> None:
    """POST to the daemon that is about to be killed (its answer never comes)."""
    with contextlib.suppress(OSError):
        request(socket, "POST", path, b"{}", JSON)


def test_mark_bad_killed_between_its_renames_is_completed_at_restart(tmp_path: Path) -> None:
    """kill -9 of mark-bad on a trial boot after the primary's rename, before the backup's:
    the restart finishes it (both copies say bad, the release is remembered as failed),
    and mark-bad run again succeeds."""
    images = make_images(tmp_path / "images", 2)
    build_release(images[0], tmp_path / "pub", serial=1)
    host = prepare_host(
        tmp_path / "host", f"file://{tmp_path / 'pub' / 'host'}", installed=images[0]
    )
    trial = build_release(images[1], tmp_path / "pub", serial=2)
    try:
        with DaemonProcess(host).start() as daemon:
            assert daemon.stop() == 0
        assert host.reboot().slot == "b"
        with DaemonProcess(host, prefix=HOLD_RENAMES).start() as daemon:
            caller = threading.Thread(
                target=post_ignoring_the_kill, args=(host.socket, "/v1/mark-bad")
            )
            caller.start()
            kill_at_temporary(daemon, host.grubenv.parent, ".grubenv.bak.")
            caller.join(30)
        assert state_from_env(grubenv.read(host.grubenv)).b.state == "bad"
        assert state_from_env(grubenv.read(host.grubenv_backup)).b.state == "trial"
        with DaemonProcess(host).start() as daemon:
            assert host.grubenv.read_bytes() == host.grubenv_backup.read_bytes()
            failed = [f["release"]["uuid"] for f in host.state()["failed"]]
            assert failed == [str(trial.meta.uuid)]
            again = request(host.socket, "POST", "/v1/mark-bad", b"{}", JSON)
            assert again.status == 200, again.body
            assert len(host.state()["failed"]) == 1
            assert daemon.stop() == 0
    finally:
        host.cleanup()
