"""Slots as real block devices (loop devices): install, mounted target, too small a target.

Runs as root (``losetup``, ``mount``); every loop device and mount is undone in
teardown. The daemon is a real ``organixmd --once`` process.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.support.images import make_ext4_image, sha256_file
from tests.support.releases import BuiltRelease, build_release
from tests.test_sources import CliHost

MiB = 1024 * 1024


class LoopDevices:
    """Loop devices over backing files, and mounts on them; all undone by :meth:`close`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.devices: list[Path] = []
        self.mounts: list[Path] = []

    def attach(self, name: str, size: int) -> Path:
        backing = self.root / f"{name}.backing"
        with open(backing, "wb") as handle:
            handle.truncate(size)
        done = subprocess.run(
            ["losetup", "--find", "--show", str(backing)],
            capture_output=True,
            text=True,
            check=True,
        )
        device = Path(done.stdout.strip())
        self.devices.append(device)
        return device

    def over(self, backing: Path, offset: int = 0, sizelimit: int = 0) -> Path:
        """A loop device over ``backing`` (a file or another device), from ``offset``."""
        argv = ["losetup", "--find", "--show", "--offset", str(offset)]
        if sizelimit:
            argv += ["--sizelimit", str(sizelimit)]
        done = subprocess.run([*argv, str(backing)], capture_output=True, text=True, check=True)
        device = Path(done.stdout.strip())
        self.devices.append(device)
        return device

    def mount(self, device: Path, where: Path, *, writable: bool = False) -> None:
        """Mount, read-only unless ``writable``: the kernel then writes nothing, so any
        change is the daemon's."""
        where.mkdir(parents=True, exist_ok=True)
        options = "rw" if writable else "ro"
        subprocess.run(["mount", "-o", options, str(device), str(where)], check=True)
        self.mounts.append(where)

    def close(self) -> None:
        for where in reversed(self.mounts):
            subprocess.run(["umount", str(where)], check=False)
        for device in reversed(self.devices):
            subprocess.run(["losetup", "-d", str(device)], check=False)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> BuiltRelease:
    """A real 24 MiB ext4 image as a release in a directory."""
    root = tmp_path_factory.mktemp("slots")
    image = make_ext4_image(root / "root.img", 24 * MiB, payload_bytes=14 * MiB, seed=31)
    return build_release(image, root / "pub" / "fleet", serial=4)


def device_hash(device: Path) -> str:
    """SHA-256 of a whole device, read with O_DIRECT (what is on it, not the page cache)."""
    done = subprocess.run(
        ["dd", f"if={device}", "bs=4M", "iflag=direct", "status=none"],
        capture_output=True,
        check=True,
    )
    return hashlib.sha256(done.stdout).hexdigest()


def test_install_into_loop_device_slot(
    tmp_path: Path, loops: LoopDevices, release: BuiltRelease
) -> None:
    """A release is written to a real block device slot with O_DIRECT and verified."""
    slot_a = loops.attach("a", 32 * MiB)
    slot_b = loops.attach("b", 32 * MiB)
    host = CliHost(tmp_path / "host", slot_a=slot_a, slot_b=slot_b)
    host.write_config(release.url)
    done = host.run_once()
    host.assert_staged(done, release.image_path)
    size = release.meta.image.size
    # What is on the device itself (O_DIRECT), not what a cache says.
    on_device = subprocess.run(
        ["dd", f"if={slot_b}", "bs=1M", f"count={size // MiB}", "iflag=direct", "status=none"],
        capture_output=True,
        check=True,
    ).stdout
    assert hashlib.sha256(on_device).hexdigest() == release.meta.image.sha256
    assert device_hash(slot_a) == hashlib.sha256(bytes(32 * MiB)).hexdigest()


def test_mounted_target_refused(tmp_path: Path, loops: LoopDevices, release: BuiltRelease) -> None:
    """A target slot that is mounted is refused, naming the mount point; nothing is written."""
    slot_a = loops.attach("a", 32 * MiB)
    slot_b = loops.attach("b", 32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(slot_b)], check=True)
    where = tmp_path / "mnt" / "slot b"
    loops.mount(slot_b, where)
    before = device_hash(slot_b)
    assert (where / "lost+found").is_dir()
    host = CliHost(tmp_path / "host", slot_a=slot_a, slot_b=slot_b)
    host.write_config(release.url)
    done = host.run_once()
    assert done.returncode == 11, done.stdout + done.stderr
    verdict = done.stdout.strip()
    assert verdict.startswith(f"blocked: slot b ({slot_b}) is mounted at {where}")
    assert f"unmount {where} first" in verdict
    assert host.state()["last_verdict"]["code"] == "slot-unusable"
    assert host.state()["history"] == []
    assert device_hash(slot_b) == before
    assert host.boot_state().next_slot == "a"


def test_mounted_file_slot_refused(
    tmp_path: Path, loops: LoopDevices, release: BuiltRelease
) -> None:
    """A file slot mounted through a loop device is refused too (the loop's backing file)."""
    host = CliHost(tmp_path / "host", slot_size=32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(host.slot_b)], check=True)
    done = subprocess.run(
        ["losetup", "--find", "--show", str(host.slot_b)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    loops.devices.append(Path(done.stdout.strip()))
    where = tmp_path / "mnt"
    loops.mount(Path(done.stdout.strip()), where)
    before = sha256_file(host.slot_b)
    host.write_config(release.url)
    refused = host.run_once()
    assert refused.returncode == 11, refused.stdout + refused.stderr
    assert f"is mounted at {where}; refusing to overwrite it" in refused.stdout
    assert sha256_file(host.slot_b) == before


def test_image_larger_than_loop_slot_refused(
    tmp_path: Path, loops: LoopDevices, release: BuiltRelease
) -> None:
    """An image larger than the target block device is refused before any byte is written."""
    slot_a = loops.attach("a", 16 * MiB)
    slot_b = loops.attach("b", 16 * MiB)
    before = device_hash(slot_b)
    host = CliHost(tmp_path / "host", slot_a=slot_a, slot_b=slot_b)
    host.write_config(release.url)
    done = host.run_once()
    assert done.returncode == 11, done.stdout + done.stderr
    size = release.meta.image.size
    assert done.stdout.strip().startswith(
        f"blocked: the image ({size} bytes) is larger than slot b ({slot_b}, {16 * MiB} bytes)"
    )
    assert host.state()["last_verdict"]["code"] == "slot-unusable"
    assert device_hash(slot_b) == before
    assert host.boot_state().next_slot == "a"


def _alias_cases(host_root: Path, loops: LoopDevices) -> dict[str, tuple[Path, Path, bool]]:
    """(slot a, slot b, whether b overlaps a) for each way a slot can alias another."""
    host_root.mkdir(parents=True, exist_ok=True)
    file_a = host_root / "slot-a.img"
    with open(file_a, "wb") as handle:
        handle.truncate(32 * MiB)
    disk = host_root / "disk.img"
    with open(disk, "wb") as handle:
        handle.truncate(96 * MiB)
    part_a = loops.over(disk, 0, 48 * MiB)
    loop_a = loops.over(file_a)
    return {
        "loop over slot a's file": (file_a, loops.over(file_a), True),
        "loop over slot a's file, from an offset": (file_a, loops.over(file_a, 8 * MiB), True),
        "loop over the loop device that is slot a": (loop_a, loops.over(loop_a), True),
        "overlapping ranges of one disk file": (part_a, loops.over(disk, 40 * MiB), True),
        "ranges of one disk file that do not overlap": (
            part_a,
            loops.over(disk, 48 * MiB, 48 * MiB),
            False,
        ),
    }


def test_slot_that_reaches_the_booted_slot_through_loop_devices_is_refused(
    tmp_path: Path, loops: LoopDevices, release: BuiltRelease
) -> None:
    """Slot b resolving to slot a's bytes (a loop device over a's file, at any offset; a
    loop over a's loop device; an overlapping range of one disk file) is refused naming
    what they share, and a's bytes stay as they were; ranges that do not overlap install."""
    cases = _alias_cases(tmp_path / "devices", loops)
    for index, (label, (slot_a, slot_b, overlaps)) in enumerate(cases.items()):
        host = CliHost(tmp_path / f"host{index}", slot_a=slot_a, slot_b=slot_b)
        host.write_config(release.url)
        before = device_hash(slot_a) if slot_a.is_block_device() else sha256_file(slot_a)
        done = host.run_once()
        after = device_hash(slot_a) if slot_a.is_block_device() else sha256_file(slot_a)
        if overlaps:
            assert done.returncode == 11, f"{label}: {done.stdout}{done.stderr}"
            assert "shares bytes with the booted slot" in done.stdout, label
            assert host.state()["last_verdict"]["code"] == "slot-unusable", label
            assert host.boot_state().next_slot == "a", label
            assert after == before, f"{label}: slot a was written"
        else:
            host.assert_staged(done, release.image_path)
            assert after == before, f"{label}: slot a was written"


def test_mounted_range_of_a_shared_disk_file_blocks_the_slot_it_overlaps(
    tmp_path: Path, loops: LoopDevices, release: BuiltRelease
) -> None:
    """A loop device over part of slot b's disk-file range that is mounted makes slot b
    mounted (it used to be written under the mounted file system)."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as handle:
        handle.truncate(160 * MiB)
    slot_a = loops.over(disk, 0, 48 * MiB)
    slot_b = loops.over(disk, 48 * MiB, 48 * MiB)
    inner = loops.over(disk, 64 * MiB, 16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(inner)], check=True)
    where = tmp_path / "mnt"
    loops.mount(inner, where)
    host = CliHost(tmp_path / "host", slot_a=slot_a, slot_b=slot_b)
    host.write_config(release.url)
    before = device_hash(inner)
    done = host.run_once()
    assert done.returncode == 11, done.stdout + done.stderr
    assert f"is mounted at {where}; refusing to overwrite it" in done.stdout
    assert device_hash(inner) == before
