"""organixmd.grubenv against the real ``grub-editenv``, byte for byte."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from organixmd import grubenv
from organixmd.boot import BootControl
from organixmd.errors import BootError
from tests.test_slots import LoopDevices

NAMES = ["organixm_order", "organixm_a_state", "organixm_b_tries", "x", "long_name_" * 3]
ODD_VALUES = ["", "b a", "xxx", "back\\slash", "two\nlines", "trail\\", "=eq=", "é ü", "#hash"]


def editenv(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["grub-editenv", str(path), *args], capture_output=True, text=True, check=False
    )


def test_create_matches_grub_editenv(tmp_path: Path) -> None:
    """An empty block is byte-identical to what grub-editenv create writes."""
    theirs = tmp_path / "theirs"
    assert editenv(theirs, "create").returncode == 0
    ours = tmp_path / "ours"
    grubenv.create(ours)
    assert ours.read_bytes() == theirs.read_bytes()
    assert len(ours.read_bytes()) == grubenv.BLOCK_SIZE


@pytest.mark.parametrize("seed", range(12))
def test_random_set_unset_sequences_match_grub_editenv(tmp_path: Path, seed: int) -> None:
    """Random set/unset sequences give the same bytes as grub-editenv, and parse back."""
    rng = random.Random(seed)
    theirs = tmp_path / "theirs"
    editenv(theirs, "create")
    model: dict[str, str] = {}
    for _ in range(25):
        name = rng.choice(NAMES)
        if rng.random() < 0.3:
            assert editenv(theirs, "unset", name).returncode == 0
            model = grubenv.updated(model, unset=[name])
        else:
            value = rng.choice(ODD_VALUES) + "x" * rng.choice([0, 3, 40, 250])
            result = editenv(theirs, "set", f"{name}={value}")
            try:
                block = grubenv.render(grubenv.updated(model, {name: value}))
            except BootError:
                assert result.returncode != 0
                assert "environment block too small" in result.stderr
                continue
            assert result.returncode == 0, result.stderr
            model = grubenv.updated(model, {name: value})
            assert block == theirs.read_bytes()
        assert grubenv.parse(theirs.read_bytes()) == model


def test_block_too_small_is_a_boot_error(tmp_path: Path) -> None:
    """A value that cannot fit is refused like grub-editenv refuses it."""
    theirs = tmp_path / "theirs"
    editenv(theirs, "create")
    big = "y" * 1000
    result = editenv(theirs, "set", f"big={big}")
    assert result.returncode != 0
    assert "environment block too small" in result.stderr
    with pytest.raises(BootError, match="environment block too small"):
        grubenv.render({"big": big})


def test_our_block_is_read_by_grub_editenv(tmp_path: Path) -> None:
    """grub-editenv lists exactly the variables we wrote, escapes included."""
    path = tmp_path / "env"
    variables = {"organixm_order": "b a", "odd": "a\\b", "multi": "one\ntwo"}
    grubenv.write(path, variables)
    listed = editenv(path, "list")
    assert listed.returncode == 0
    assert listed.stdout == "organixm_order=b a\nodd=a\\b\nmulti=one\ntwo\n"


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        (b"", "exactly 1024"),
        (b"\0" * 1024, "signature"),
        (b"# GRUB Environment Block\n" + b"#" * 10, "exactly 1024"),
    ],
)
def test_corrupt_blocks_are_refused(block: bytes, reason: str) -> None:
    """Blocks GRUB would refuse (size, signature) raise BootError naming the cause."""
    with pytest.raises(BootError, match=reason):
        grubenv.parse(block)


def test_missing_file_is_a_boot_error(tmp_path: Path) -> None:
    """Reading a missing env names the path and what the daemon will do."""
    with pytest.raises(BootError, match="cannot read"):
        grubenv.read(tmp_path / "absent")


def test_write_replaces_atomically_and_leaves_no_temporary(tmp_path: Path) -> None:
    """A write leaves exactly the target file: new inode, 1024 bytes, no stray temp file."""
    path = tmp_path / "grubenv"
    grubenv.write(path, {"a": "1"})
    first_inode = os.stat(path).st_ino
    grubenv.write(path, {"a": "2"})
    assert os.stat(path).st_ino != first_inode
    assert grubenv.read(path) == {"a": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grubenv"]


def test_write_into_missing_directory_is_a_boot_error(tmp_path: Path) -> None:
    """An unwritable location raises BootError, not OSError."""
    with pytest.raises(BootError, match="cannot write"):
        grubenv.write(tmp_path / "no" / "grubenv", {"a": "1"})


def grub_reads(image: Path, path: str) -> dict[str, str]:
    """What GRUB's own ext4 driver reads from ``image`` (``grub-fstest``): no journal
    replay, the blocks as they are on the disk."""
    done = subprocess.run(["grub-fstest", str(image), "cat", path], capture_output=True, check=True)
    return grubenv.parse(done.stdout)


def test_grub_sees_every_write_at_once(loops: LoopDevices, tmp_path: Path) -> None:
    """GRUB replays no ext4 journal: each rename is checkpointed, so GRUB's ext4 driver,
    reading the disk while it is still mounted, sees what Linux sees. (Without the
    checkpoint it sees the old file for seconds, or no file at all.)"""
    device = loops.attach("boot", 64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(device)], check=True)
    root = tmp_path / "boot"
    loops.mount(device, root, writable=True)
    (root / "grub").mkdir()
    image = tmp_path / "boot.backing"

    grubenv.write(root / "grub" / "grubenv", {"organixm_order": "a b"})
    assert grub_reads(image, "/grub/grubenv") == {"organixm_order": "a b"}

    control = BootControl(root / "grub" / "grubenv", root / "grub" / "grubenv.bak", booted="a")
    control.initialize("a")
    flipped = control.flip("b", 3)
    for name in ("grubenv", "grubenv.bak"):
        seen = grub_reads(image, f"/grub/{name}")
        assert seen == grubenv.read(root / "grub" / name), name
        assert seen["organixm_order"] == " ".join(flipped.order) == "b a", name
