"""The installer end to end: provision a disk image, boot it in real GRUB, update it, boot again."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from organixctl.provisioner import disklayout
from organixctl.provisioner.disklayout import MIB, Partition
from organixctl.provisioner.provision import make_plan
from organixmd.boot.machine import BootControl
from organixmd.release.meta import parse_meta
from tests.support.images import make_ext4_image
from tests.support.qemu import boot_qemu
from tests.support.releases import build_release
from tests.support.tinykernel import make_bootable_image, tiny_kernel

pytestmark = pytest.mark.slow

ORGANIXCTL = [sys.executable, "-m", "organixctl"]


def provision(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ORGANIXCTL, "provision", *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two releases (serial 1 and 2) of real ext4 images, each with a tiny kernel that
    reports its command line, in a local directory."""
    root = tmp_path_factory.mktemp("releases")
    kernel = tiny_kernel()
    first = make_bootable_image(root / "r1.img", 28 * MIB, kernel, payload_bytes=4 * MIB, seed=11)
    second = make_bootable_image(root / "r2.img", 28 * MIB, kernel, payload_bytes=4 * MIB, seed=12)
    one = build_release(first, root / "one", version="1.0", serial=1)
    two = build_release(second, root / "two", version="2.0", serial=2)
    return one.meta_path, two.meta_path


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory, releases: tuple[Path, Path]) -> Path:
    """A disk image file made by `organixctl provision` with release 1.0."""
    disk = tmp_path_factory.mktemp("disk") / "disk.img"
    result = provision("--disk", disk, "--release", releases[0], "--slot-size", "32M", "--yes")
    assert result.returncode == 0, result.stderr
    assert "verified on the device" in result.stdout
    return disk


@contextlib.contextmanager
def loop_device(path: Path, part: Partition) -> Iterator[Path]:
    device = subprocess.run(
        [
            "losetup",
            "--find",
            "--show",
            "--offset",
            str(part.start),
            "--sizelimit",
            str(part.size),
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        yield Path(device)
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)


@contextlib.contextmanager
def mounted(device: Path, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "ext4", str(device), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def layout_of(disk: Path) -> disklayout.DiskLayout:
    """The layout provision used: slots of 32 MiB and the default rw for a new image."""
    return disklayout.plan_layout(slot_size=32 * MIB, rw_size=256 * MIB)


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_provisioned_image_boots_slot_a(provisioned: Path, firmware: str) -> None:
    """GRUB on a freshly provisioned image boots slot a, committed, on BIOS and UEFI."""
    result = boot_qemu(provisioned, firmware)
    assert (result.slot, result.reason) == ("a", "committed")
    assert result.pauses == 0
    assert result.attempts == [("a", "committed")]
    assert result.args.startswith("organixm.slot=a organixm.reason=committed ")


def test_daemon_updates_provisioned_image_then_trial_boots_b(
    provisioned: Path, releases: tuple[Path, Path], tmp_path: Path
) -> None:
    """The daemon installs release 2.0 into slot b of the provisioned disk; GRUB then tries b."""
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(provisioned), str(disk)], check=True)
    boot = boot_qemu(disk, "bios")
    assert boot.cmdline is not None
    layout = layout_of(disk)
    (tmp_path / "cmdline").write_text(boot.cmdline + "\n")
    with (
        loop_device(disk, layout.slot_a) as slot_a,
        loop_device(disk, layout.slot_b) as slot_b,
        loop_device(disk, layout.boot) as boot_part,
        mounted(boot_part, tmp_path / "boot") as boot_root,
    ):
        config = tmp_path / "organixmd.toml"
        config.write_text(
            f"""
[source]
url = "file://{str(releases[1])[: -len(".meta")]}"
[slots]
a = "{slot_a}"
b = "{slot_b}"
cmdline = "{tmp_path / "cmdline"}"
[boot]
grubenv = "{boot_root / "grub/grubenv"}"
[daemon]
state_dir = "{tmp_path / "state"}"
host_id_file = "{tmp_path / "machine-id"}"
"""
        )
        once = subprocess.run(
            [sys.executable, "-m", "organixmd.cli", "--config", str(config), "--once"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert once.returncode == 0, once.stdout + once.stderr
        assert once.stdout.startswith("staged:"), once.stdout
        state = BootControl(boot_root / "grub/grubenv", boot_root / "grub/grubenv.bak").read()
        assert state.order == ("b", "a")
        assert state.b.state == "trial"
    trial = boot_qemu(disk, "bios")
    assert (trial.slot, trial.reason) == ("b", "trial")
    with loop_device(disk, layout.boot) as boot_part, mounted(boot_part, tmp_path / "boot") as root:
        after = BootControl(root / "grub/grubenv", root / "grub/grubenv.bak").read()
    assert (after.booted, after.trial_try) == ("b", 1)


def test_dry_run_changes_nothing(releases: tuple[Path, Path], tmp_path: Path) -> None:
    """--dry-run prints the plan and writes nothing."""
    disk = tmp_path / "disk.img"
    result = provision("--disk", disk, "--release", releases[0], "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "organixm-a" in result.stdout
    assert "dry run: nothing was changed" in result.stdout
    assert not disk.exists()


def test_refuses_without_yes_off_a_terminal(releases: tuple[Path, Path], tmp_path: Path) -> None:
    """Without --yes and without a terminal nothing is erased."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as handle:
        handle.write(b"keep me" * 1000)
        handle.truncate(1024 * MIB)
    result = provision("--disk", disk, "--release", releases[0])
    assert result.returncode == 2
    assert "pass --yes" in result.stderr
    with open(disk, "rb") as handle:
        assert handle.read(7000) == b"keep me" * 1000


def test_disk_too_small_refused(releases: tuple[Path, Path], tmp_path: Path) -> None:
    """A disk that cannot hold the layout is refused with the sizes named."""
    disk = tmp_path / "small.img"
    with open(disk, "wb") as handle:
        handle.truncate(100 * MIB)
    result = provision("--disk", disk, "--release", releases[0], "--yes")
    assert result.returncode == 2
    assert "need at least" in result.stderr
    assert disk.read_bytes()[:512] == bytes(512)


def test_plan_sizes_slots_from_release(releases: tuple[Path, Path], tmp_path: Path) -> None:
    """The default slot size leaves headroom over the image; rw takes the rest of a disk."""
    release = parse_meta(releases[0].read_bytes())
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as handle:
        handle.truncate(2048 * MIB)
    plan = make_plan(disk, release)
    assert plan.layout.slot_a.size >= release.size * 3 // 2
    assert plan.layout.rw is not None
    assert plan.layout.rw.end <= 2048 * MIB - MIB


def test_mounted_target_refused(releases: tuple[Path, Path], tmp_path: Path) -> None:
    """An image file whose file system is mounted through a loop device is refused."""
    disk = tmp_path / "mounted.img"
    make_ext4_image(disk, 300 * MIB, payload_bytes=MIB)
    where = tmp_path / "mnt"
    where.mkdir()
    subprocess.run(["mount", "-o", "loop", str(disk), str(where)], check=True)
    try:
        result = provision("--disk", disk, "--release", releases[0], "--yes")
    finally:
        subprocess.run(["umount", str(where)], check=True)
    assert result.returncode == 2
    assert "in use" in result.stderr


def test_first_disk_refuses_when_not_exactly_one(releases: tuple[Path, Path]) -> None:
    """--first-disk lists the candidates and refuses unless exactly one is usable."""
    from organixctl.provisioner.provision import list_candidates

    usable = [c for c in list_candidates() if c.why_not is None]
    result = provision("--first-disk", "--release", releases[0], "--dry-run")
    if len(usable) == 1:
        assert result.returncode == 0
    else:
        assert result.returncode == 2
        assert "exactly one usable disk" in result.stderr


def test_failed_provision_removes_the_image_file_it_created(
    releases: tuple[Path, Path], tmp_path: Path
) -> None:
    """A provision that fails half-way (here: no GRUB modules) leaves no half-made image file
    and names what to check."""
    disk = tmp_path / "disk.img"
    result = subprocess.run(
        [
            *ORGANIXCTL,
            "provision",
            *("--disk", str(disk), "--release", str(releases[0])),
            *("--slot-size", "32M", "--yes"),
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "ORGANIXM_GRUB_BIOS_DIR": str(tmp_path / "no-grub")},
        check=False,
    )
    assert result.returncode == 2
    assert "grub-mkimage failed" in result.stderr
    assert "holds GRUB's i386-pc modules" in result.stderr
    assert not disk.exists()
