"""Fault rows "device: ...": the real daemon against slots and directories that fail.

Each row prepares a real host (:func:`~tests.support.daemon.prepare_host`) whose slot b,
state directory or GRUB environment directory sits on something that fails the way an
operator meets it, with real kernel parts only:

- an image larger than slot b (the slot file is then grown with ``truncate``);
- slot b a sparse file on a small tmpfs or loop-mounted ext4 that fills up mid-install
  (then the tmpfs is remounted larger, or a filler file is deleted);
- the state directory on a full tmpfs, filled before a check and while the image
  downloads so a checkpoint cannot be written (then the filler is deleted);
- slot b an immutable file (``chattr +i`` on ext4), a file on an ext4 remounted
  read-only, and a read-only loop device (``losetup -r``), then ``chattr -i``, a
  read-write remount and a read-write loop device;
- slot b a loop device whose writes fail: its backing file on a tiny tmpfs (the block
  device answers ENOSPC), or on an ext4 shut down with ``EXT4_IOC_SHUTDOWN`` (EIO);
- the GRUB environment's directory bind-mounted read-only while the image downloads
  (nginx at a limited rate), so the flip is what fails.

Each try publishes the next release (R1 or R2) to the host's file or nginx source, asks
for an update (``POST /v1/update`` with ``wait``), checks the verdict names the slot (or
file) and the cause, that GRUB would not boot unverified bytes, then removes the cause
and runs ``organixctl update --wait --json``, which must stage the release.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from organixmd.boot.machine import predict_boot
from tests.faults.report import FaultReport, Row, count_tracebacks
from tests.faults.test_network import (
    CHECK_LIMIT,
    flipped_onto_bad_data,
    installed_since,
    staged_problem,
    update_with_organixctl,
)
from tests.support.daemon import (
    IMAGE_SIZE,
    SLOT_SIZE,
    DaemonProcess,
    Host,
    prepare_host,
    request,
)
from tests.support.nginx import start_nginx
from tests.support.releases import BuiltRelease, ReleaseSet, build_release_set

MIB = 1024 * 1024
#: EXT4_IOC_SHUTDOWN (_IOR('X', 125, __u32)) and its "no log flush" flag.
EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def run(*command: str) -> str:
    """Run a system tool; a missing tool or a failure fails the test loudly."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr}")
    return done.stdout.strip()


def is_mount_point(path: Path) -> bool:
    """Whether something is mounted at ``path`` (a bind mount onto itself included,
    which :func:`os.path.ismount` does not see)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


def unmount(path: Path) -> None:
    """Unmount everything mounted at ``path`` (mounts may be stacked)."""
    while is_mount_point(path):
        run("umount", str(path))


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        unmount(path)


def mount_ext4(image: Path, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "ext4", "-o", "loop", str(image), str(path))


@contextlib.contextmanager
def ext4(path: Path, image: Path, size: int) -> Iterator[Path]:
    """A fresh ext4 of ``size`` bytes in ``image``, loop-mounted at ``path``."""
    with open(image, "wb") as handle:
        handle.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    mount_ext4(image, path)
    try:
        yield path
    finally:
        unmount(path)


@contextlib.contextmanager
def loop_device(backing: Path, *, read_only: bool = False) -> Iterator[list[str]]:
    """Attach ``backing``; yields a one-element list so the device can be replaced."""
    device = [run("losetup", "-f", "--show", *(["-r"] if read_only else []), str(backing))]
    try:
        yield device
    finally:
        with contextlib.suppress(AssertionError):
            run("losetup", "-d", device[0])


def sparse(path: Path, size: int = SLOT_SIZE) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def fill(directory: Path, name: str = "filler") -> Path:
    """Write zeros into ``directory`` until its file system is full."""
    filler = directory / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # Big writes, then smaller ones for what a big one no longer fits in.
        for size in (1024 * 1024, 4096, 1):
            block = bytes(size)
            with contextlib.suppress(OSError):
                while os.write(fd, block):
                    pass
        os.fsync(fd)
    finally:
        os.close(fd)
    if free_bytes(directory) != 0:
        raise AssertionError(f"{directory}: {free_bytes(directory)} bytes still free")
    return filler


def free_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


# ---------------------------------------------------------------------------- releases


Releases = ReleaseSet


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> ReleaseSet:
    return build_release_set(tmp_path_factory.mktemp("devices"))


class Fleet:
    """A published directory (``fleet/host.meta`` and ``fleet/images/``) for one host."""

    def __init__(self, directory: Path, releases: Releases) -> None:
        self.directory = directory
        (directory / "images").mkdir(parents=True)
        for release in (releases.r0, releases.r1, releases.r2):
            shutil.copy(release.object_path, directory / "images" / release.object_path.name)
        self.mtime = time.time() - 3600.0
        self.publish(releases.r0)

    @property
    def file_url(self) -> str:
        return f"file://{self.directory}/host"

    def publish(self, release: BuiltRelease) -> None:
        partial = self.directory / "host.meta.partial"
        partial.write_bytes(release.meta_path.read_bytes())
        # A new mtime: R1's and R2's metas have the same size.
        self.mtime += 10
        os.utime(partial, (self.mtime, self.mtime))
        os.replace(partial, self.directory / "host.meta")


# ---------------------------------------------------------------------------- a try


def update_answer(host: Host) -> tuple[int, dict[str, Any]]:
    """POST /v1/update with wait: (HTTP status, the verdict or the problem+json)."""
    answer = request(
        host.socket,
        "POST",
        "/v1/update",
        b'{"wait": true}',
        {"Content-Type": "application/json"},
        timeout=CHECK_LIMIT,
    )
    body: dict[str, Any] = answer.json()
    return answer.status, body.get("verdict", body) if answer.status == 200 else body


@dataclass
class Fault:
    """One try: what breaks, how it is put right, and what the verdict must say."""

    name: str
    code: str
    #: Words the verdict's message must hold (the slot or file, and the cause).
    says: tuple[str, ...]
    apply: Callable[[], object]
    lift: Callable[[], object]
    #: Extra checks while the fault holds (problems, empty when fine).
    holds: Callable[[dict[str, Any]], list[str]] = lambda verdict: []


def drive(
    row: Row, host: Host, fleet: Fleet, releases: Releases, faults: list[Fault], first: int = 0
) -> list[str]:
    """Run each fault as one try against the running daemon; returns the problems.

    Tries alternate R1 and R2 from the ``first``-th (a host that staged R1 gets R2 next).
    """
    problems: list[str] = []
    for index, fault in enumerate(faults, start=first):
        target = releases.target(index)
        name = f"{fault.name} ({target.meta.version})"
        row.tries += 1
        began = datetime.now(UTC)
        fleet.publish(target)
        fault.apply()
        lifted = False
        try:
            started = time.monotonic()
            try:
                status, verdict = update_answer(host)
            except TimeoutError:
                row.stuck += 1
                problems.append(f"{name}: no answer within {CHECK_LIMIT} s")
                continue
            seconds = time.monotonic() - started
            code = verdict.get("code", "?")
            message = str(verdict.get("message", verdict.get("detail", "")))
            print(f"  {name}: HTTP {status} {code} in {seconds:.1f} s: {message[:200]}")
            if flipped_onto_bad_data(host):
                row.flips_on_bad_data += 1
                problems.append(f"{name}: GRUB would boot slot b, which holds no verified release")
            if code != fault.code or verdict.get("outcome") == "staged":
                problems.append(f"{name}: expected {fault.code}, got HTTP {status} {verdict}")
            elif missing := [w for w in fault.says if w not in message]:
                problems.append(f"{name}: the verdict does not say {missing}: {message}")
            else:
                row.reported[code] += 1
            problems += [f"{name}: {p}" for p in fault.holds(verdict)]
            if "internal error" in message:
                problems.append(f"{name}: an internal error instead of a verdict: {message}")
            answer = request(host.socket, "GET", "/v1/status")
            if answer.status != 200:
                problems.append(f"{name}: status answered {answer.status} during the fault")
        finally:
            fault.lift()
            lifted = True
        assert lifted
        try:
            verdict = update_with_organixctl(host)
        except TimeoutError:
            row.stuck += 1
            problems.append(f"{name}: no verdict within {CHECK_LIMIT} s after the fault")
            continue
        if (problem := staged_problem(row, host, verdict, target)) is not None:
            problems.append(f"{name}: {problem}")
            continue
        if host.boot_state().next_slot != "b":
            problems.append(f"{name}: staged, but GRUB would not try slot b next")
            continue
        print(f"    then staged: {installed_since(host, began) or 'verified earlier, flipped'}")
        row.recovered += 1
    return problems


def finish(row: Row, daemons: list[DaemonProcess], problems: list[str], started: float) -> None:
    for daemon in daemons:
        assert daemon.stop() == 0
    row.seconds = time.perf_counter() - started
    row.tracebacks = sum(count_tracebacks(daemon.output()) for daemon in daemons)
    daemon = daemons[-1]
    assert problems == [], "\n".join(problems)
    assert row.flips_on_bad_data == 0
    assert row.stuck == 0
    assert row.tracebacks == 0, daemon.output()[-3000:]
    assert row.recovered == row.tries


@contextlib.contextmanager
def running(
    root: Path,
    fleet: Fleet,
    releases: Releases,
    daemons: list[DaemonProcess],
    *,
    slot_b: Path | None = None,
    state_dir: Path | None = None,
    url: str | None = None,
) -> Iterator[Host]:
    """A fresh host on R0 (slot b at ``slot_b``, state in ``state_dir`` if given) and its
    running daemon, stopped (and killed if need be) on the way out. The fleet publishes
    R0 again, so the host starts up to date."""
    fleet.publish(releases.r0)
    url = url or fleet.file_url
    host = prepare_host(root, url, installed=releases.images[0])
    if slot_b is not None:
        host.slots["b"] = slot_b
    if state_dir is not None:
        host.state_dir = state_dir
    host.write_config(url)
    try:
        with DaemonProcess(host).start() as daemon:
            daemons.append(daemon)
            assert host.state()["last_verdict"]["code"] == "up-to-date"
            yield host
            assert daemon.stop() == 0
    finally:
        host.cleanup()


def nothing_written(path: Path) -> Callable[[dict[str, Any]], list[str]]:
    def check(verdict: dict[str, Any]) -> list[str]:
        with open(path, "rb") as handle:
            data = handle.read(IMAGE_SIZE)
        return [] if not data.strip(b"\0") else [f"bytes were written to {path}"]

    return check


# ---------------------------------------------------------------------------- rows


def test_slot_too_small(faults: FaultReport, releases: Releases, tmp_path: Path) -> None:
    """An image larger than slot b (a file, then a loop device) is blocked and nothing is
    written; once the slot has grown (truncate; losetup -c), the next update installs."""
    row = faults.add(Row(fault="device: image larger than the slot"))
    started = time.perf_counter()
    fleet = Fleet(tmp_path / "fleet", releases)
    daemons: list[DaemonProcess] = []
    problems: list[str] = []

    def resize(path: Path, size: int, device: str | None = None) -> None:
        with open(path, "r+b") as handle:
            handle.truncate(size)
        if device is not None:
            run("losetup", "-c", device)

    with running(tmp_path / "file", fleet, releases, daemons) as host:
        slot = host.slots["b"]
        fault = Fault(
            name="slot b a file 4 KiB short of the image",
            code="slot-unusable",
            says=("larger than slot b", str(slot)),
            apply=lambda: resize(slot, IMAGE_SIZE - 4096),
            lift=lambda: resize(slot, SLOT_SIZE),
            holds=nothing_written(slot),
        )
        problems += drive(row, host, fleet, releases, [fault])
    backing = sparse(tmp_path / "loop-b.img", 16 * MIB)
    with loop_device(backing) as device:
        link = tmp_path / "slot-b-device"
        link.symlink_to(device[0])
        with running(tmp_path / "loop", fleet, releases, daemons, slot_b=link) as host:
            fault = Fault(
                name="slot b a 16 MiB loop device",
                code="slot-unusable",
                says=("larger than slot b", str(link), str(16 * MIB)),
                apply=lambda: None,
                lift=lambda: resize(backing, SLOT_SIZE, device[0]),
                holds=nothing_written(backing),
            )
            problems += drive(row, host, fleet, releases, [fault])
    finish(row, daemons, problems, started)


def test_slot_file_system_fills_up(faults: FaultReport, releases: Releases, tmp_path: Path) -> None:
    """Slot b a sparse file on a 12 MiB tmpfs, then on an ext4 a filler leaves 12 MiB of:
    writing the 32 MiB image hits ENOSPC, the verdict names the slot and the cause; with
    the tmpfs remounted larger or the filler deleted, the next update installs."""
    row = faults.add(Row(fault="device: the slot's file system fills up mid-install"))
    started = time.perf_counter()
    fleet = Fleet(tmp_path / "fleet", releases)
    small, disk = tmp_path / "small", tmp_path / "disk"
    daemons: list[DaemonProcess] = []
    problems: list[str] = []
    with tmpfs(small, "12m"), ext4(disk, tmp_path / "disk.ext4", 64 * MIB):
        on_tmpfs = sparse(small / "slot-b.img")
        on_ext4 = sparse(disk / "slot-b.img")

        def leave_12_mib() -> None:
            with open(disk / "filler", "wb") as handle:
                for _ in range((free_bytes(disk) - 12 * MIB) // MIB):
                    handle.write(bytes(MIB))
                os.fsync(handle.fileno())

        tries = [
            Fault(
                name="slot b a sparse file on a 12 MiB tmpfs",
                code="slot-unusable",
                says=(str(on_tmpfs), "No space left on device", "free space"),
                apply=lambda: None,
                lift=lambda: run("mount", "-o", "remount,size=96m", str(small)),
            ),
            Fault(
                name="slot b a sparse file on an ext4 with 12 MiB free",
                code="slot-unusable",
                says=(str(on_ext4), "No space left on device", "free space"),
                apply=leave_12_mib,
                lift=lambda: (disk / "filler").unlink(),
            ),
        ]
        for index, (slot, fault) in enumerate(zip((on_tmpfs, on_ext4), tries, strict=True)):
            root = tmp_path / f"host-{index}"
            with running(root, fleet, releases, daemons, slot_b=slot) as host:
                problems += drive(row, host, fleet, releases, [fault])
    finish(row, daemons, problems, started)


class WhenDownloading:
    """Runs ``action`` in a thread once the daemon's status says ``downloading``."""

    def __init__(self, host: Host, action: Callable[[], object]) -> None:
        self.host = host
        self.action = action
        self.done = False
        self.thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        deadline = time.monotonic() + CHECK_LIMIT
        while time.monotonic() < deadline:
            phase = request(self.host.socket, "GET", "/v1/status").json()["phase"]
            if phase == "downloading":
                self.action()
                self.done = True
                return
            time.sleep(0.02)

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        if self.thread.is_alive() or self.thread.ident is not None:
            self.thread.join()


@contextlib.contextmanager
def slow_nginx(tmp_path: Path, releases: Releases) -> Iterator[tuple[Fleet, str]]:
    """A fleet served by nginx at 3 MB/s per connection: the 7.5 MB image takes about
    2.5 s, time to break something mid-download."""
    serve = tmp_path / "serve"
    fleet = Fleet(serve / "fleet", releases)
    server = start_nginx(serve, tmp_path / "nginx", limit_rate="3m")
    try:
        yield fleet, f"{server.url}/fleet/host"
    finally:
        server.stop()


def test_state_directory_full(faults: FaultReport, releases: Releases, tmp_path: Path) -> None:
    """The state directory on a tmpfs filled up before a check, then while the image
    downloads (its checkpoint cannot be written): the check ends in a state-error
    verdict, the old state file is intact, the daemon answers status; the filler
    deleted, the next update installs."""
    row = faults.add(Row(fault="device: the state directory's file system is full"))
    started = time.perf_counter()
    daemons: list[DaemonProcess] = []
    with (
        slow_nginx(tmp_path, releases) as (fleet, url),
        tmpfs(tmp_path / "statefs", "4m") as statefs,
    ):
        state = statefs / "state"
        before: list[bytes] = []

        def fill_up() -> None:
            fill(statefs)
            # The last state file that could be written: it must survive unchanged.
            before.append((state / "state.json").read_bytes())

        def intact(verdict: dict[str, Any]) -> list[str]:
            now = (state / "state.json").read_bytes()
            left = [p.name for p in state.iterdir() if p.name not in ("state.json", "lock")]
            return (["the state file changed or was lost"] if now != before[-1] else []) + (
                [f"temporary files left in the state directory: {left}"] if left else []
            )

        with running(tmp_path / "host", fleet, releases, daemons, state_dir=state, url=url) as host:
            later = WhenDownloading(host, fill_up)

            def checkpoint_failed(verdict: dict[str, Any]) -> list[str]:
                problems = intact(verdict)
                return problems + ([] if later.done else ["the tmpfs did not fill mid-download"])

            def free() -> None:
                later.join()
                (statefs / "filler").unlink()

            says = (str(state / "state.json"), "No space left on device", "free space")
            tries = [
                Fault(
                    name="state directory on a full 4 MiB tmpfs",
                    code="state-error",
                    says=says,
                    apply=fill_up,
                    lift=lambda: (statefs / "filler").unlink(),
                    holds=intact,
                ),
                Fault(
                    name="state directory's tmpfs fills up mid-download (checkpoint)",
                    code="state-error",
                    says=says,
                    apply=later.start,
                    lift=free,
                    holds=checkpoint_failed,
                ),
            ]
            try:
                problems = drive(row, host, fleet, releases, tries)
            finally:
                later.join()
    finish(row, daemons, problems, started)


def test_slot_not_writable(faults: FaultReport, releases: Releases, tmp_path: Path) -> None:
    """Slot b an immutable file on ext4 (chattr +i), a file on an ext4 remounted
    read-only, then a read-only loop device (losetup -r): a clear verdict, no flip;
    chattr -i / remounted read-write / attached read-write, the next update installs."""
    row = faults.add(Row(fault="device: immutable slot file, read-only mount, read-only loop"))
    started = time.perf_counter()
    fleet = Fleet(tmp_path / "fleet", releases)
    daemons: list[DaemonProcess] = []
    problems: list[str] = []
    with ext4(tmp_path / "disk", tmp_path / "disk.ext4", 128 * MIB) as disk:
        slot = sparse(disk / "slot-b.img")
        try:
            fault = Fault(
                name="slot b a file with chattr +i",
                code="slot-unusable",
                says=(str(slot), "Operation not permitted", "chattr -i"),
                apply=lambda: run("chattr", "+i", str(slot)),
                lift=lambda: run("chattr", "-i", str(slot)),
                holds=nothing_written(slot),
            )
            with running(tmp_path / "immutable", fleet, releases, daemons, slot_b=slot) as host:
                problems += drive(row, host, fleet, releases, [fault])
            second = sparse(disk / "slot-b-2.img")
            fault = Fault(
                name="slot b a file on an ext4 remounted read-only",
                code="slot-unusable",
                says=(str(second), "Read-only file system", "read-only mount"),
                apply=lambda: run("mount", "-o", "remount,ro", str(disk)),
                lift=lambda: run("mount", "-o", "remount,rw", str(disk)),
                holds=nothing_written(second),
            )
            root = tmp_path / "ro-mount"
            with running(root, fleet, releases, daemons, slot_b=second) as host:
                problems += drive(row, host, fleet, releases, [fault])
        finally:
            run("chattr", "-i", str(slot))
            run("mount", "-o", "remount,rw", str(disk))
    backing = sparse(tmp_path / "loop-b.img")
    link = tmp_path / "slot-b-device"
    with loop_device(backing, read_only=True) as device:
        link.symlink_to(device[0])

        def read_write() -> None:
            run("losetup", "-d", device[0])
            device[0] = run("losetup", "-f", "--show", str(backing))
            link.unlink()
            link.symlink_to(device[0])

        fault = Fault(
            name="slot b a read-only loop device",
            code="slot-unusable",
            says=(str(link), "Operation not permitted", "losetup -r"),
            apply=lambda: None,
            lift=read_write,
            holds=nothing_written(backing),
        )
        with running(tmp_path / "read-only", fleet, releases, daemons, slot_b=link) as host:
            problems += drive(row, host, fleet, releases, [fault])
    finish(row, daemons, problems, started)


def shut_down(mountpoint: Path) -> None:
    """EXT4_IOC_SHUTDOWN: from now on every I/O to the file system fails with EIO."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


def test_slot_io_errors(faults: FaultReport, releases: Releases, tmp_path: Path) -> None:
    """Slot b a loop device whose writes fail for real: its sparse backing file on a
    12 MiB tmpfs (the device answers ENOSPC past what the tmpfs holds), then on an ext4
    shut down with EXT4_IOC_SHUTDOWN (every write answers EIO). A clear verdict, no
    flip; with the tmpfs grown, or the ext4 mounted again, the next update installs."""
    row = faults.add(Row(fault="device: I/O errors on a loop-device slot"))
    started = time.perf_counter()
    fleet = Fleet(tmp_path / "fleet", releases)
    daemons: list[DaemonProcess] = []
    problems: list[str] = []
    link = tmp_path / "slot-b-device"
    with tmpfs(tmp_path / "small", "12m") as small:
        backing = sparse(small / "loop-b.img")
        with loop_device(backing) as device:
            link.symlink_to(device[0])
            fault = Fault(
                name="slot b a loop device over a 12 MiB tmpfs",
                code="slot-unusable",
                says=(str(link), "No space left on device", "free space"),
                apply=lambda: None,
                lift=lambda: run("mount", "-o", "remount,size=96m", str(small)),
            )
            with running(tmp_path / "nospace", fleet, releases, daemons, slot_b=link) as host:
                problems += drive(row, host, fleet, releases, [fault])
    link.unlink()
    image = tmp_path / "disk.ext4"
    with ext4(tmp_path / "disk", image, 64 * MIB) as disk:
        backing = sparse(disk / "loop-b.img")
        with loop_device(backing) as device:
            link.symlink_to(device[0])

            def mount_again() -> None:
                run("losetup", "-d", device[0])
                run("umount", str(disk))
                mount_ext4(image, disk)
                device[0] = run("losetup", "-f", "--show", str(backing))
                link.unlink()
                link.symlink_to(device[0])

            fault = Fault(
                name="slot b a loop device over a shut-down ext4",
                code="slot-unusable",
                says=(str(link), "Input/output error", "dmesg"),
                apply=lambda: shut_down(disk),
                lift=mount_again,
            )
            with running(tmp_path / "eio", fleet, releases, daemons, slot_b=link) as host:
                problems += drive(row, host, fleet, releases, [fault])
    finish(row, daemons, problems, started)


def test_grubenv_read_only_at_flip(faults: FaultReport, releases: Releases, tmp_path: Path) -> None:
    """The GRUB environment's directory bind-mounted read-only while the image downloads:
    the flip fails with a verdict, the state does not claim slot b staged and GRUB still
    boots slot a; made writable, the next update verifies slot b again and flips."""
    row = faults.add(Row(fault="device: GRUB env directory read-only at flip time"))
    started = time.perf_counter()
    daemons: list[DaemonProcess] = []
    with (
        slow_nginx(tmp_path, releases) as (fleet, url),
        running(tmp_path / "host", fleet, releases, daemons, url=url) as host,
    ):
        boot = host.grubenv.parent

        def read_only() -> None:
            run("mount", "--bind", str(boot), str(boot))
            run("mount", "-o", "remount,bind,ro", str(boot))

        watcher = WhenDownloading(host, read_only)

        def holds(verdict: dict[str, Any]) -> list[str]:
            problems = [] if watcher.done else ["the env was not made read-only mid-download"]
            record = host.state().get("slots", {}).get("b")
            if record is not None and record["status"] == "staged":
                problems.append(f"the state claims slot b staged: {record}")
            decision = predict_boot(host.boot_state(), {"a": True, "b": True})
            if decision.slot != "a":
                problems.append(f"GRUB would boot slot {decision.slot}, not a: {decision}")
            return problems

        def writable() -> None:
            watcher.join()
            unmount(boot)

        fault = Fault(
            name="GRUB env directory bind-mounted read-only mid-download",
            code="boot-control-error",
            says=(str(host.grubenv), "Read-only file system"),
            apply=watcher.start,
            lift=writable,
            holds=holds,
        )
        try:
            problems = drive(row, host, fleet, releases, [fault])
        finally:
            watcher.join()
            unmount(boot)
    finish(row, daemons, problems, started)
