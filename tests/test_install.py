"""The install engine against real files, real ext4 images and the real pipeline."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard

from organixmd.base.config import parse_config
from organixmd.base.errors import ImageError, ImageMismatch
from organixmd.boot.port import GrubBootPort
from organixmd.host.engine import Engine, read_host_id
from organixmd.host.state import StateKeeper, StateStore
from organixmd.install.pipeline import Installer
from organixmd.install.slots import booted_slot
from organixmd.release.meta import Release, parse_meta
from organixmd.release.minisign import SecretKey
from organixmd.release.sources import ByteStream, FileSource, Source, open_source
from organixmd.release.trust import load_public_keys
from organixmd.service.compose import unobserved
from tests.support.images import make_ext4_image, sha256_file
from tests.support.releases import build_legacy_release, build_release

MiB = 1024 * 1024


class _SlowStream:
    def __init__(self, inner: ByteStream, delay: float) -> None:
        self._inner = inner
        self._delay = delay
        self.etag = inner.etag

    async def read(self, n: int) -> bytes:
        await asyncio.sleep(self._delay)
        return await self._inner.read(min(n, 64 * 1024))

    async def aclose(self) -> None:
        await self._inner.aclose()


class SlowFileSource(FileSource):
    """A file source behind a slow link: each read waits and returns at most 64 KiB."""

    def __init__(self, url: str, timeout: float, delay: float) -> None:
        super().__init__(url, timeout)
        self._delay = delay

    async def open_image(self, release: Release, start: int, if_match: str | None) -> ByteStream:
        return _SlowStream(await super().open_image(release, start, if_match), self._delay)


class Host:
    """A host's files: two file-backed slots, a kernel command line, a state dir."""

    def __init__(self, root: Path, slot_size: int = 48 * MiB, booted: str = "a") -> None:
        self.root = root
        self.slot_a = root / "slot-a.img"
        self.slot_b = root / "slot-b.img"
        for slot in (self.slot_a, self.slot_b):
            with open(slot, "wb") as handle:
                handle.truncate(slot_size)
        self.cmdline = root / "cmdline"
        self.cmdline.write_text(f"BOOT_IMAGE=/x organixm.slot={booted} quiet\n")
        self.state_dir = root / "state"

    def config_text(self, url: str, extra_source: str = "", extra: str = "") -> str:
        return f"""
[source]
url = "{url}"
{extra_source}
[slots]
a = "{self.slot_a}"
b = "{self.slot_b}"
cmdline = "{self.cmdline}"
[boot]
grubenv = "{self.root / "grubenv"}"
[daemon]
state_dir = "{self.state_dir}"
socket = "{self.root / "control.sock"}"
host_id_file = "{self.root / "machine-id"}"
{extra}
"""

    def engine(
        self, url: str, extra_source: str = "", extra: str = "", slow: float = 0.0
    ) -> Engine:
        """The engine as the composition root builds it, without taking the host lock
        (a test may build several engines for one host), over a GRUB environment that
        commits the booted slot, as a provisioned host's does."""
        config = parse_config(self.config_text(url, extra_source, extra))
        store = StateStore(config.daemon.state_dir)
        state, _ = store.load()
        booted = booted_slot(config.slots.cmdline)
        port = GrubBootPort(config.boot.grubenv, config.boot.grubenv_copy, booted)
        if not config.boot.grubenv.exists():
            port.repair(booted or "a")

        def factory() -> Source:
            if slow:
                return SlowFileSource(url, 5, slow)
            return open_source(config.source)

        return Engine(
            slots=config.slots,
            install=config.install,
            trial_boots=config.boot.trial_boots,
            host_id=read_host_id(config.daemon.host_id_file),
            keeper=StateKeeper(store, state),
            boot=port,
            public_keys=load_public_keys(config),
            source_factory=factory,
            on_event=unobserved,
        )

    def state(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.state_dir / "state.json").read_text())
        return loaded


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 24 MiB ext4 image built with mkfs.ext4 -d."""
    path = tmp_path_factory.mktemp("rootfs") / "root.img"
    return make_ext4_image(path, 24 * MiB, payload_bytes=12 * MiB, seed=7)


@pytest.fixture(scope="module")
def rootfs2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rootfs2") / "root.img"
    return make_ext4_image(path, 24 * MiB, payload_bytes=12 * MiB, seed=8)


async def test_file_source_install_verifies_slot_b(tmp_path: Path, rootfs: Path) -> None:
    """A newer release lands in the inactive slot b, byte for byte, is verified and flipped."""
    host = Host(tmp_path)
    release = build_release(rootfs, tmp_path / "pub", version="1.0", serial=1)
    verdict = await host.engine(release.url).check()
    assert verdict.outcome == "staged", verdict.message
    assert verdict.code == "staged"
    size = release.meta.image.size
    assert sha256_file(host.slot_b, size) == sha256_file(rootfs)
    state = host.state()
    assert state["slots"]["b"]["status"] == "staged"
    assert state["progress"] is None
    # The booted slot a was never touched: still all zeros.
    assert sha256_file(host.slot_a, size) == hashlib.sha256(bytes(size)).hexdigest()


async def test_second_check_is_staged_not_reinstalled(tmp_path: Path, rootfs: Path) -> None:
    """After staging, a new check reports the staged release instead of writing again."""
    host = Host(tmp_path)
    release = build_release(rootfs, tmp_path / "pub")
    engine = host.engine(release.url)
    await engine.check()
    mtime = host.slot_b.stat().st_mtime_ns
    verdict = await engine.check()
    assert (verdict.outcome, verdict.code) == ("staged", "staged")
    assert host.slot_b.stat().st_mtime_ns == mtime


async def test_booted_slot_identified_as_up_to_date(tmp_path: Path, rootfs: Path) -> None:
    """A host whose booted slot already holds the release (first boot) is up to date."""
    host = Host(tmp_path)
    host.slot_a.write_bytes(rootfs.read_bytes())
    release = build_release(rootfs, tmp_path / "pub")
    verdict = await host.engine(release.url).check()
    assert (verdict.outcome, verdict.code) == ("up-to-date", "up-to-date")
    assert sha256_file(host.slot_b) == hashlib.sha256(bytes(48 * MiB)).hexdigest()


async def test_booted_b_writes_a(tmp_path: Path, rootfs: Path) -> None:
    """With slot b booted the engine writes slot a, never b."""
    host = Host(tmp_path, booted="b")
    release = build_release(rootfs, tmp_path / "pub")
    verdict = await host.engine(release.url).check()
    assert verdict.outcome == "staged"
    assert sha256_file(host.slot_a, release.meta.image.size) == sha256_file(rootfs)
    assert sha256_file(host.slot_b) == hashlib.sha256(bytes(48 * MiB)).hexdigest()


async def test_unknown_booted_slot_writes_nothing(tmp_path: Path, rootfs: Path) -> None:
    """Without organixm.slot= on the command line nothing is written."""
    host = Host(tmp_path)
    host.cmdline.write_text("BOOT_IMAGE=/x quiet\n")
    release = build_release(rootfs, tmp_path / "pub")
    verdict = await host.engine(release.url).check()
    assert (verdict.outcome, verdict.code) == ("blocked", "booted-slot-unknown")
    for slot in (host.slot_a, host.slot_b):
        assert sha256_file(slot) == hashlib.sha256(bytes(48 * MiB)).hexdigest()


async def test_downgrade_refused(tmp_path: Path, rootfs: Path, rootfs2: Path) -> None:
    """A release whose serial is not above the booted one is refused with a reason."""
    host = Host(tmp_path)
    host.slot_a.write_bytes(rootfs.read_bytes())
    first = build_release(rootfs, tmp_path / "pub", serial=5)
    engine = host.engine(first.url)
    assert (await engine.check()).code == "up-to-date"
    build_release(rootfs2, tmp_path / "pub", version="0.9", serial=5)
    verdict = await engine.check()
    assert (verdict.outcome, verdict.code) == ("blocked", "downgrade-refused")
    assert "serial 5 is not greater" in verdict.message
    assert sha256_file(host.slot_b) == hashlib.sha256(bytes(48 * MiB)).hexdigest()


async def test_image_larger_than_slot_refused(tmp_path: Path, rootfs: Path) -> None:
    """An image that does not fit the target slot is refused before any byte is written."""
    host = Host(tmp_path, slot_size=8 * MiB)
    release = build_release(rootfs, tmp_path / "pub")
    verdict = await host.engine(release.url).check()
    assert (verdict.outcome, verdict.code) == ("blocked", "slot-unusable")
    assert "larger than slot b" in verdict.message
    assert sha256_file(host.slot_b) == hashlib.sha256(bytes(8 * MiB)).hexdigest()


async def test_signed_meta_installs_unsigned_refused(tmp_path: Path, rootfs: Path) -> None:
    """With trusted keys, a signed meta installs; an unsigned or foreign-signed one is refused."""
    key = SecretKey.generate()
    trusted = f'public_keys = ["{key.public_key().to_base64()}"]'
    host = Host(tmp_path)
    unsigned = build_release(rootfs, tmp_path / "unsigned")
    verdict = await host.engine(unsigned.url, extra_source=trusted).check()
    assert (verdict.outcome, verdict.code) == ("blocked", "signature-invalid")
    assert "no signature" in verdict.message
    foreign = build_release(rootfs, tmp_path / "foreign", key=SecretKey.generate())
    verdict = await host.engine(foreign.url, extra_source=trusted).check()
    assert (verdict.outcome, verdict.code) == ("blocked", "signature-invalid")
    assert sha256_file(host.slot_b) == hashlib.sha256(bytes(48 * MiB)).hexdigest()
    signed = build_release(rootfs, tmp_path / "signed", key=key)
    verdict = await host.engine(signed.url, extra_source=trusted).check()
    assert verdict.outcome == "staged", verdict.message


async def test_tampered_signed_meta_refused(tmp_path: Path, rootfs: Path) -> None:
    """A meta changed after signing (one byte) is refused and nothing is written."""
    key = SecretKey.generate()
    host = Host(tmp_path)
    release = build_release(rootfs, tmp_path / "pub", key=key)
    data = release.meta_path.read_bytes().replace(b'"version": "1.0"', b'"version": "1.1"')
    release.meta_path.write_bytes(data)
    trusted = f'public_keys = ["{key.public_key().to_base64()}"]'
    verdict = await host.engine(release.url, extra_source=trusted).check()
    assert verdict.code == "signature-invalid"
    assert sha256_file(host.slot_b) == hashlib.sha256(bytes(48 * MiB)).hexdigest()


async def test_legacy_seed_meta_installs(tmp_path: Path, rootfs: Path) -> None:
    """The seed tool's descriptor and single zstd stream install and verify."""
    host = Host(tmp_path)
    build_legacy_release(rootfs, tmp_path / "seed", name="pos")
    verdict = await host.engine(f"file://{tmp_path / 'seed' / 'pos'}").check()
    assert verdict.outcome == "staged", verdict.message
    assert sha256_file(host.slot_b, rootfs.stat().st_size) == sha256_file(rootfs)
    state_text = (host.state_dir / "state.json").read_text()
    assert "seed-embedded-secret" not in state_text
    assert "AKIASEEDEMBEDDEDKEY" not in state_text


@pytest.mark.parametrize("readback", ["true", "false"])
async def test_corrupted_chunk_stops_install(tmp_path: Path, rootfs: Path, readback: str) -> None:
    """A chunk whose bytes differ from the meta stops the install; the state never says staged
    (with and without read-back, where the chunk check runs in different threads)."""
    host = Host(tmp_path)
    release = build_release(rootfs, tmp_path / "pub")
    # The largest frame holds data (not zeros) and has room for the replacement.
    index, chunk = max(enumerate(release.meta.image.chunks), key=lambda item: item[1].length)
    # Re-compress other data into the same frame slot so the frame is valid zstd
    # but its content is wrong.
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(
        bytes(release.meta.image.chunk_size)
    )
    blob = bytearray(release.object_path.read_bytes())
    pad = chunk.length - len(frame) - 8
    assert pad >= 0
    # Fill the rest of the frame's place with a zstd skippable frame: valid zstd.
    skippable = (0x184D2A50).to_bytes(4, "little") + pad.to_bytes(4, "little") + bytes(pad)
    blob[chunk.offset : chunk.offset + chunk.length] = frame + skippable
    release.object_path.write_bytes(bytes(blob))
    verdict = await host.engine(release.url, extra=f"[install]\nreadback = {readback}").check()
    assert (verdict.outcome, verdict.code) == ("error", "chunk-mismatch")
    assert f"chunk {index} " in verdict.message
    state = host.state()
    assert state["slots"] == {}
    assert state["progress"] is None


async def test_decompression_bomb_refused(tmp_path: Path, rootfs: Path) -> None:
    """A frame that decompresses to more than its chunk is refused, not swallowed."""
    release = build_release(rootfs, tmp_path / "pub")
    image = release.meta.image
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(
        bytes(64 * image.chunk_size)
    )
    blob = bytearray(release.object_path.read_bytes())
    # The largest frame has room for the ~2 KB bomb whatever the random image holds.
    first = max(image.chunks, key=lambda chunk: chunk.length)
    assert len(bomb) <= first.length
    blob[first.offset : first.offset + first.length] = bomb + bytes(first.length - len(bomb))
    release.object_path.write_bytes(bytes(blob))
    meta = parse_meta(release.meta_path.read_bytes())
    slot = tmp_path / "slot.img"
    slot.write_bytes(bytes(48 * MiB))
    source = FileSource(release.url, 5)
    with pytest.raises(ImageError, match="decompression bomb"):
        await Installer(meta, source, slot).run()


async def test_resume_after_interruption(tmp_path: Path, rootfs: Path) -> None:
    """An install cancelled half-way resumes at its checkpoint and the result verifies."""
    host = Host(tmp_path)
    release = build_release(rootfs, tmp_path / "pub", chunk_size=256 * 1024)
    done = await _interrupted_install(host, release, chunks=20)
    assert done < len(release.meta.image.chunks)
    verdict = await host.engine(release.url).check()
    assert verdict.outcome == "staged", verdict.message
    history = host.state()["history"]
    installed = [e for e in history if e["event"] == "installed"]
    assert installed[-1]["detail"].endswith(f"resumed at chunk {done}")
    assert sha256_file(host.slot_b, release.meta.image.size) == sha256_file(rootfs)


async def test_admin_cancel_ends_install_with_verdict(tmp_path: Path, rootfs: Path) -> None:
    """An admin's cancel ends the install with a 'cancelled' verdict and keeps the checkpoint."""
    host = Host(tmp_path)
    release = build_release(rootfs, tmp_path / "pub", chunk_size=256 * 1024)
    engine = host.engine(release.url, extra="[install]\ncheckpoint_interval = 0.0", slow=0.002)
    task = asyncio.create_task(engine.check())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        if engine.state.progress is not None and engine.state.progress.chunks_done >= 10:
            break
    assert engine.request_cancel()
    verdict = await task
    assert (verdict.outcome, verdict.code) == ("error", "cancelled")
    assert "resumes" in verdict.message
    assert host.state()["progress"] is not None
    assert not engine.request_cancel()
    assert engine.phase.value == "error"


async def test_target_marked_bad_while_written_then_flipped(tmp_path: Path, rootfs: Path) -> None:
    """GRUB never sees the slot being written as good; once verified it is flipped to trial."""
    from organixmd.boot import grubenv
    from organixmd.boot.machine import BootControl
    from organixmd.boot.port import GrubBootPort

    host = Host(tmp_path)
    control = BootControl(tmp_path / "grubenv", tmp_path / "grubenv.bak")
    control.initialize("a")
    # A previous commit of b left both slots good: b would be GRUB's fallback.
    for path in (tmp_path / "grubenv", tmp_path / "grubenv.bak"):
        variables = grubenv.updated(grubenv.read(path), {"organixm_b_state": "good"})
        grubenv.write_block(path, grubenv.render(variables))
    assert control.read().b.state == "good"
    release = build_release(rootfs, tmp_path / "pub", chunk_size=256 * 1024)
    engine = host.engine(release.url, slow=0.002)
    engine.boot = GrubBootPort(tmp_path / "grubenv", tmp_path / "grubenv.bak", "a")
    task = asyncio.create_task(engine.check())
    seen: set[str] = set()
    while not task.done():
        await asyncio.sleep(0.01)
        if engine.phase.value == "downloading":
            seen.add(control.read().b.state)
    verdict = await task
    assert verdict.code == "staged", verdict.message
    assert seen == {"bad"}
    after = control.read()
    assert (after.order, after.b.state, after.b.tries_left) == (("b", "a"), "trial", 3)


async def test_invalidation_cut_between_its_renames_is_redone_before_the_write(
    tmp_path: Path, rootfs: Path
) -> None:
    """Killed between the primary's rename and the backup's, an invalidation left the backup
    calling slot b bootable; the next install marks b bad in both copies before writing it."""
    from organixmd.boot import grubenv
    from organixmd.boot.machine import BootControl, state_from_env
    from organixmd.boot.port import GrubBootPort

    host = Host(tmp_path)
    primary, backup = tmp_path / "grubenv", tmp_path / "grubenv.bak"
    control = BootControl(primary, backup)
    control.initialize("a")
    # What the cut leaves: the primary already says b bad, the backup still b good.
    variables = grubenv.updated(grubenv.read(backup), {"organixm_b_state": "good"})
    grubenv.write_block(backup, grubenv.render(variables))
    release = build_release(rootfs, tmp_path / "pub", chunk_size=256 * 1024)
    engine = host.engine(release.url, slow=0.002)
    engine.boot = GrubBootPort(primary, backup, "a")
    task = asyncio.create_task(engine.check())
    seen: set[tuple[str, str]] = set()
    while not task.done():
        await asyncio.sleep(0.01)
        if engine.phase.value == "downloading":
            for path in (primary, backup):
                seen.add((path.name, state_from_env(grubenv.read(path)).b.state))
    verdict = await task
    assert verdict.code == "staged", verdict.message
    assert seen == {("grubenv", "bad"), ("grubenv.bak", "bad")}


async def test_readback_catches_what_the_device_lost(tmp_path: Path, rootfs: Path) -> None:
    """Data that differs on the device after the stream (a lost write) fails the read-back."""
    release = build_release(rootfs, tmp_path / "pub")
    meta = parse_meta(release.meta_path.read_bytes())
    slot = tmp_path / "slot.img"
    slot.write_bytes(bytes(48 * MiB))

    def lose_a_write() -> None:
        # The fault a failing device produces: a block that never reached the medium.
        with open(slot, "r+b") as handle:
            handle.seek(3 * MiB)
            handle.write(b"\xa5" * 4096)
            os.fsync(handle.fileno())

    installer = Installer(meta, FileSource(release.url, 5), slot, on_verify=lose_a_write)
    with pytest.raises(ImageMismatch, match="read back"):
        await installer.run()
    # Without the fault the same install verifies, and reports the device's hash.
    result = await Installer(meta, FileSource(release.url, 5), slot).run()
    assert result.sha256 == meta.sha256


async def test_readback_runs_inside_the_stream(tmp_path: Path, rootfs: Path) -> None:
    """The device is read back while chunks still arrive, not in a second pass after the
    stream: reads of durable chunks happen before the last chunk is written, and the
    whole-image hash the install reports is that of the bytes read back."""
    release = build_release(rootfs, tmp_path / "pub", chunk_size=256 * 1024)
    meta = parse_meta(release.meta_path.read_bytes())
    assert meta.image is not None
    slot = tmp_path / "slot.img"
    slot.write_bytes(bytes(48 * MiB))
    events: list[str] = []

    installer = Installer(
        meta,
        SlowFileSource(release.url, 5, 0.002),
        slot,
        on_verify=lambda: events.append("read back"),
        on_stream_end=lambda: events.append("stream ended"),
    )
    result = await installer.run()
    assert result.sha256 == meta.sha256
    assert "stream ended" in events
    before_end = events[: events.index("stream ended")]
    # Several rounds of read-back while the stream still ran (96 chunks in all).
    assert before_end.count("read back") >= 2, events
    assert sha256_file(slot, meta.size) == meta.sha256


async def test_no_flip_without_readback(tmp_path: Path, rootfs: Path) -> None:
    """With install.readback = false the slot is written and stream-verified but never flipped."""
    from organixmd.boot.machine import BootControl
    from organixmd.boot.port import GrubBootPort

    host = Host(tmp_path)
    control = BootControl(tmp_path / "grubenv", tmp_path / "grubenv.bak")
    control.initialize("a")
    release = build_release(rootfs, tmp_path / "pub")
    engine = host.engine(release.url, extra="[install]\nreadback = false")
    engine.boot = GrubBootPort(tmp_path / "grubenv", tmp_path / "grubenv.bak", "a")
    verdict = await engine.check()
    assert (verdict.outcome, verdict.code) == ("staged", "verified")
    assert "only a slot read back from the device is ever booted" in verdict.message
    assert control.read().next_slot == "a"
    assert sha256_file(host.slot_b, release.meta.image.size) == sha256_file(rootfs)
    again = await engine.check()
    assert again.code == "verified"


async def test_seed_format_install_ends_when_the_image_is_missing(
    tmp_path: Path, rootfs: Path
) -> None:
    """A seed-format install whose image cannot be opened ends in a verdict at once (it
    used to leave the decompressor waiting forever: no verdict, no READY, no SIGTERM)."""
    host = Host(tmp_path)
    build_legacy_release(rootfs, tmp_path / "seed", name="pos")
    (tmp_path / "seed" / "pos").unlink()
    async with asyncio.timeout(30):
        verdict = await host.engine(f"file://{tmp_path / 'seed' / 'pos'}").check()
    assert (verdict.outcome, verdict.code) == ("error", "source-not-found"), verdict.message


async def test_seed_format_install_ends_when_the_stream_breaks(
    tmp_path: Path, rootfs: Path
) -> None:
    """A seed-format stream cut short ends the check with a clear verdict, never a hang."""
    host = Host(tmp_path)
    build_legacy_release(rootfs, tmp_path / "seed", name="pos")
    image = tmp_path / "seed" / "pos"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    async with asyncio.timeout(30):
        verdict = await host.engine(f"file://{image}").check()
    assert verdict.outcome == "error"
    assert verdict.code in ("image-invalid", "image-mismatch"), verdict.message
    assert "internal error" not in verdict.message


@pytest.mark.parametrize("damage", ["flipped-byte", "zeros"])
async def test_damaged_frame_is_image_invalid_naming_the_chunk(
    tmp_path: Path, rootfs: Path, damage: str
) -> None:
    """One flipped byte or 4 KiB of zeros in a frame: verdict image-invalid (or the chunk's
    mismatch) naming the chunk, never 'internal error ... BufferError'."""
    host = Host(tmp_path)
    release = build_release(rootfs, tmp_path / "pub")
    index, chunk = max(enumerate(release.meta.image.chunks), key=lambda item: item[1].length)
    blob = bytearray(release.object_path.read_bytes())
    if damage == "flipped-byte":
        blob[chunk.offset + 5] ^= 0xFF
    else:
        blob[chunk.offset : chunk.offset + 4096] = bytes(4096)
    release.object_path.write_bytes(bytes(blob))
    verdict = await host.engine(release.url).check()
    assert verdict.outcome == "error"
    assert verdict.code in ("image-invalid", "chunk-mismatch"), verdict.message
    assert f"chunk {index}" in verdict.message
    assert "internal error" not in verdict.message
    assert host.state()["slots"] == {}


async def _interrupted_install(host: Host, release: Any, chunks: int = 10) -> int:
    """Start an install, cancel it after ``chunks`` chunks (a shutdown: the engine goes back
    to idle); return the checkpoint's chunks_done."""
    engine = host.engine(release.url, extra="[install]\ncheckpoint_interval = 0.0", slow=0.002)
    task = asyncio.create_task(engine.check())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        progress = engine.state.progress
        if progress is not None and progress.chunks_done >= chunks:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.phase.value == "idle"
    done: int = host.state()["progress"]["chunks_done"]
    assert done > 0
    return done


async def test_resume_progress_survives_an_image_that_cannot_be_opened(
    tmp_path: Path, rootfs: Path
) -> None:
    """With read-back on, a resumed download whose image is missing keeps its checkpoint."""
    host = Host(tmp_path)
    release = build_release(rootfs, tmp_path / "pub", chunk_size=256 * 1024)
    done = await _interrupted_install(host, release)
    aside = release.object_path.with_name("aside")
    release.object_path.rename(aside)
    verdict = await host.engine(release.url).check()
    assert verdict.code == "source-not-found", verdict.message
    assert host.state()["progress"]["chunks_done"] == done
    aside.rename(release.object_path)
    verdict = await host.engine(release.url).check()
    assert verdict.outcome == "staged", verdict.message


async def test_replaced_object_on_resume_starts_over_instead_of_sticking(
    tmp_path: Path, rootfs: Path
) -> None:
    """A resume against an object that changed (new ETag) starts over in the same check and
    installs; it used to answer source-changed at every later check, for good."""
    host = Host(tmp_path)
    release = build_release(rootfs, tmp_path / "pub", chunk_size=256 * 1024)
    await _interrupted_install(host, release)
    # The same bytes put back (a restored upload): a new mtime, so a new ETag.
    data = release.object_path.read_bytes()
    release.object_path.unlink()
    release.object_path.write_bytes(data)
    os.utime(release.object_path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    verdict = await host.engine(release.url).check()
    assert verdict.outcome == "staged", verdict.message
    installed = [e for e in host.state()["history"] if e["event"] == "installed"]
    assert installed[-1]["detail"].endswith("resumed at chunk 0")
    assert sha256_file(host.slot_b, release.meta.image.size) == sha256_file(rootfs)


async def test_blocked_by_a_small_slot_rechecks_once_the_slot_grew(
    tmp_path: Path, rootfs: Path
) -> None:
    """'image larger than the slot' does not keep the meta's ETag: after the slot grows the
    next check installs instead of replaying the old verdict."""
    host = Host(tmp_path)
    release = build_release(rootfs, tmp_path / "pub")
    os.truncate(host.slot_b, 1 * MiB)
    verdict = await host.engine(release.url).check()
    assert verdict.outcome == "blocked", verdict.message
    assert host.state()["meta_etag"] is None
    os.truncate(host.slot_b, 48 * MiB)
    verdict = await host.engine(release.url).check()
    assert verdict.outcome == "staged", verdict.message


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"organixm_a_state": "good", "organixm_b_state": "bad"}, "marks slot b bad"),
        (
            {"organixm_a_state": "good", "organixm_b_state": "good", "organixm_booted": "a"},
            "names slot a",
        ),
    ],
)
async def test_cmdline_and_env_disagreeing_writes_neither_slot(
    tmp_path: Path, rootfs: Path, env: dict[str, str], why: str
) -> None:
    """organixm.slot=b while the env says b is bad (or GRUB booted a): nothing is written."""
    from organixmd.boot import grubenv
    from organixmd.boot.machine import BootControl
    from organixmd.boot.port import GrubBootPort

    host = Host(tmp_path, booted="b")
    primary, backup = tmp_path / "grubenv", tmp_path / "grubenv.bak"
    BootControl(primary, backup).initialize("a")
    for path in (primary, backup):
        grubenv.write_block(path, grubenv.render(grubenv.updated(grubenv.read(path), env)))
    before = primary.read_bytes()
    release = build_release(rootfs, tmp_path / "pub")
    engine = host.engine(release.url)
    engine.boot = GrubBootPort(primary, backup, "b")
    verdict = await engine.check()
    assert (verdict.outcome, verdict.code) == ("blocked", "boot-env-disagrees"), verdict.message
    assert why in verdict.message
    assert "writing neither slot" in verdict.message
    for slot in (host.slot_a, host.slot_b):
        assert sha256_file(slot) == hashlib.sha256(bytes(48 * MiB)).hexdigest()
    assert primary.read_bytes() == before
