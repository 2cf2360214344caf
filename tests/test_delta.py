"""Delta updates through the real daemon: local blocks reused, the rest fetched by Range.

Release 1.0 is a real ext4 image built with ``mkfs.ext4 -d``; release 2.0 is rebuilt
from the same tree with 5 % of its files changed (placement may move). The host runs
1.0 from slot a; 2.0 is published with ``organixctl publish``'s own code (delta index
and frames object included) to a directory, to nginx and to S3 (moto).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from organixctl.publisher.publish import PublishRequest, publish
from organixmd.base.config import SourceConfig
from organixmd.base.errors import ImageError
from organixmd.base.objectnames import delta_index_name
from organixmd.install import delta
from organixmd.release import delta as delta_format
from organixmd.release.meta import MetaV1, parse_meta
from organixmd.release.minisign import SecretKey
from organixmd.release.s3client import S3Settings
from organixmd.release.sources import open_source
from tests.support.daemon import (
    SLOT_SIZE,
    DaemonProcess,
    Host,
    organixctl,
    prepare_host,
    request,
)
from tests.support.images import make_ext4_image, populate_tree
from tests.support.nginx import Nginx, start_nginx
from tests.support.s3 import MotoServer

MiB = 1024 * 1024
IMAGE = 40 * MiB
CHUNK = 1 * MiB


@dataclass(frozen=True)
class Images:
    old: Path
    new: Path
    #: ``new`` with every file changed: nothing of it is on the host.
    unrelated: Path


def _change(tree: Path, share: float, seed: int) -> None:
    files = sorted(p for p in tree.rglob("*") if p.is_file() and "organixm" not in p.parts)
    rng = random.Random(seed)
    for path in rng.sample(files, max(1, int(len(files) * share))):
        data = bytearray(path.read_bytes())
        at = rng.randrange(max(1, len(data) - 16))
        data[at : at + 16] = rng.randbytes(16)
        path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    work = tmp_path_factory.mktemp("delta-images")
    tree = work / "tree"
    tree.mkdir()
    populate_tree(tree, 24 * MiB, seed=11)
    old = make_ext4_image(work / "old.img", IMAGE, tree=tree)
    _change(tree, 0.05, seed=12)
    new = make_ext4_image(work / "new.img", IMAGE, tree=tree)
    other = work / "other"
    other.mkdir()
    populate_tree(other, 24 * MiB, seed=99)
    unrelated = make_ext4_image(work / "unrelated.img", IMAGE, tree=other)
    return Images(old=old, new=new, unrelated=unrelated)


def publish_release(
    image: Path,
    target: str,
    version: str,
    serial: int,
    *,
    key: Path | None = None,
    s3: S3Settings | None = None,
    with_delta: bool = True,
) -> MetaV1:
    request_ = PublishRequest(
        image=image,
        target=target,
        version=version,
        serial=serial,
        secret_key=key,
        allow_unsigned=key is None,
        chunk_size=CHUNK,
        s3=s3 or S3Settings(),
        delta=with_delta,
    )
    return asyncio.run(publish(request_)).meta


def digest(path: Path, length: int) -> str:
    with path.open("rb") as handle:
        return hashlib.sha256(handle.read(length)).hexdigest()


def installed_entry(host: Host) -> dict[str, Any]:
    entries = [e for e in host.state()["history"] if e["event"] == "installed"]
    assert entries, host.state()["history"]
    return dict(entries[-1])


def run_boot_check(host: Host, **extra: Any) -> tuple[dict[str, Any], str]:
    """Start the daemon (its boot-time check installs what is published), wait for
    READY; the status then (with the metrics text under "metrics") and the daemon's log."""
    with DaemonProcess(host, **extra).start(timeout=120) as daemon:
        status = request(host.socket, "GET", "/v1/status").json()
        status["metrics"] = request(host.socket, "GET", "/metrics").body.decode()
        daemon.stop()
        return status, daemon.output()


def metric(status: dict[str, Any], name: str) -> float:
    for line in status["metrics"].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def log_events(output: str, event: str) -> list[dict[str, Any]]:
    found = []
    for line in output.splitlines():
        with_event = line.strip()
        if with_event.startswith("{"):
            record = json.loads(with_event)
            if record.get("event") == event:
                found.append(record)
    return found


@pytest.fixture
def local_host(tmp_path: Path, images: Images) -> Iterator[Host]:
    """A host on slot a (1.0), its releases in a directory (a USB stick, file://)."""
    pub = tmp_path / "pub"
    pub.mkdir()
    publish_release(images.old, str(pub / "host"), "1.0", 1)
    host = prepare_host(tmp_path / "host", f"file://{pub}/host", installed=images.old)
    try:
        yield host
    finally:
        host.cleanup()


def assert_delta_installed(
    host: Host, images: Images, meta: MetaV1, status: dict[str, Any], output: str
) -> int:
    """Slot b holds 2.0, flipped; the install reused most of it; returns bytes downloaded."""
    assert digest(host.slots["b"], IMAGE) == digest(images.new, IMAGE)
    assert status["verdict"]["code"] == "staged", status["verdict"]
    message = status["verdict"]["message"]
    assert "delta: " in message, message
    assert "reused locally" in message, message
    detail = installed_entry(host)["detail"]
    assert "delta: " in detail, detail
    state = host.boot_state()
    assert (state.order, state.b.state) == (("b", "a"), "trial")
    done = log_events(output, "install_done")
    assert len(done) == 1, output[-3000:]
    downloaded = int(done[0]["downloaded"])
    assert 0 < downloaded < 0.4 * meta.image.compressed_size, (downloaded, meta.image)
    assert int(done[0]["reused"]) > IMAGE // 3, done
    assert metric(status, "organixm_reused_bytes_total") == int(done[0]["reused"])
    assert metric(status, "organixm_downloaded_bytes_total") == downloaded
    return downloaded


def test_delta_from_a_local_directory(local_host: Host, images: Images) -> None:
    """From a directory: most of 2.0 comes from slot a, the rest from the frames file."""
    pub = local_host.root.parent / "pub"
    meta = publish_release(images.new, str(pub / "host"), "2.0", 2)
    status, output = run_boot_check(local_host)
    assert_delta_installed(local_host, images, meta, status, output)


@pytest.fixture
def nginx_host(tmp_path: Path, images: Images) -> Iterator[tuple[Host, Nginx, Path]]:
    pub = tmp_path / "www"
    pub.mkdir()
    publish_release(images.old, str(pub / "host"), "1.0", 1)
    server = start_nginx(pub, tmp_path / "nginx")
    host = prepare_host(tmp_path / "host", f"{server.url}/host", installed=images.old)
    try:
        yield host, server, pub
    finally:
        host.cleanup()
        server.stop()


def test_delta_over_http_uses_range_requests(
    nginx_host: tuple[Host, Nginx, Path], images: Images
) -> None:
    """Over HTTP: the index, then ranged GETs of the frames object; the full image
    object is never fetched."""
    host, server, pub = nginx_host
    meta = publish_release(images.new, str(pub / "host"), "2.0", 2)
    status, output = run_boot_check(host)
    downloaded = assert_delta_installed(host, images, meta, status, output)
    requests = server.requests()
    frames = [r for r in requests if r.path.endswith(".frames.zst")]
    assert frames, requests
    assert all(r.status == 206 and r.range for r in frames), frames
    assert not [r for r in requests if r.path.endswith(meta.image.object.split("/")[-1])]
    assert [r for r in requests if r.path.endswith(".img.zst.delta")]
    served = sum(r.body_bytes for r in requests if "/images/" in r.path)
    assert served == downloaded, (served, downloaded)


def test_delta_from_s3(tmp_path: Path, images: Images, moto: MotoServer, s3_bucket: str) -> None:
    """From S3: the same, through aiobotocore's ranged GETs."""
    env = moto.credentials_env()
    settings = S3Settings(endpoint=moto.endpoint, region="us-east-1", credentials="env")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        publish_release(images.old, f"s3://{s3_bucket}/fleet/host", "1.0", 1, s3=settings)
        meta = publish_release(images.new, f"s3://{s3_bucket}/fleet/host", "2.0", 2, s3=settings)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    host = prepare_host(tmp_path / "host", f"s3://{s3_bucket}/fleet/host", installed=images.old)
    try:
        host.config.write_text(
            host.config.read_text().replace(
                "[slots]", f's3_endpoint = "{moto.endpoint}"\ncredentials = "env"\n[slots]', 1
            )
        )
        status, output = run_boot_check(host, env=env)
        assert_delta_installed(host, images, meta, status, output)
    finally:
        host.cleanup()


def test_corrupted_local_block_is_refetched_never_trusted(tmp_path: Path, images: Images) -> None:
    """A block of slot a damaged after the scan found it: the chunk's SHA-256 does not
    match, the chunk comes from the image object; the slot is still exactly 2.0."""
    pub = tmp_path / "pub"
    pub.mkdir()
    publish_release(images.old, str(pub / "host"), "1.0", 1)
    meta_v2 = publish_release(images.new, str(pub / "host"), "2.0", 2)
    slot_a = tmp_path / "a.img"
    shutil.copyfile(images.old, slot_a)
    slot_b = tmp_path / "b.img"
    with slot_b.open("wb") as handle:
        handle.truncate(SLOT_SIZE)
    release = parse_meta((pub / "host.meta").read_bytes(), source="host.meta")

    async def install() -> tuple[delta.DeltaInstaller, int]:
        source = open_source(SourceConfig(url=f"file://{pub}/host"))
        async with source:
            prepared = await delta.prepare(
                source,
                release,
                [],
                stable=delta.LocalSlot("a", slot_a, IMAGE),
                target=delta.LocalSlot("b", slot_b, IMAGE),
                start_chunk=0,
            )
            plan = prepared.plan
            assert plan is not None, prepared.reason
            # Damage a block the plan copies from slot a (a non-zero one).
            local = plan.local
            victim = next(
                n
                for n in range(local.index.blocks)
                if (found := local.source(n)) and found[0].name == "a"
            )
            found = local.source(victim)
            assert found is not None
            with slot_a.open("r+b") as handle:
                handle.seek(found[1] * delta_format.BLOCK_SIZE)
                handle.write(os.urandom(delta_format.BLOCK_SIZE))
            installer = delta.DeltaInstaller(release, source, slot_b, plan)
            await installer.run(0, None)
            return installer, victim

    installer, victim = asyncio.run(install())
    assert installer.refetched_chunks == 1, victim
    assert digest(slot_b, IMAGE) == meta_v2.image.sha256


def test_killed_delta_install_resumes(tmp_path: Path) -> None:
    """kill -9 in the middle of a delta install (the frames come slowly through nginx):
    the next start resumes at the checkpoint, still as a delta, and ends with 2.0."""
    # Incompressible releases, so what is fetched takes its time: 1.0, and 2.0 = 1.0
    # with its second quarter replaced. The delta copies three quarters from slot a.
    rng = random.Random(31)
    quarter = IMAGE // 4
    one = rng.randbytes(IMAGE)
    two = one[:quarter] + rng.randbytes(quarter) + one[2 * quarter :]
    old, mixed = tmp_path / "one.img", tmp_path / "two.img"
    old.write_bytes(one)
    mixed.write_bytes(two)
    pub = tmp_path / "www"
    pub.mkdir()
    publish_release(old, str(pub / "host"), "1.0", 1)
    meta = publish_release(mixed, str(pub / "host"), "2.0", 2)
    # 256 KiB/s per connection, four at a time: 10 s for the new quarter.
    server = start_nginx(pub, tmp_path / "nginx", limit_rate="256k")
    host = prepare_host(tmp_path / "host", f"{server.url}/host", installed=old)
    try:
        victim = DaemonProcess(host).start(ready=False)
        deadline = time.monotonic() + 60
        # Killed once the first quarter (copied) is checkpointed: the frames of the
        # second are on their way (the first request of 4 MiB takes 16 s).
        while True:
            progress = host.state().get("progress")
            live = request(host.socket, "GET", "/v1/status").json()["progress"]
            if progress and progress["chunks_done"] >= quarter // CHUNK and live:
                break
            assert time.monotonic() < deadline, victim.output()[-3000:]
            time.sleep(0.05)
        shown = organixctl("status", socket_path=host.socket)
        victim.kill9()
        # The first quarter of 2.0 came from slot a.
        assert live["reused"] >= quarter, live
        assert "reused locally" in shown.stdout, shown.stdout
        checkpoint = host.state()["progress"]["chunks_done"]
        assert 0 < checkpoint < len(meta.image.chunks)
        # The rest comes at full speed.
        server.stop()
        server = start_nginx(pub, tmp_path / "nginx", port=server.port)
        status, _ = run_boot_check(host)
        assert digest(host.slots["b"], IMAGE) == digest(mixed, IMAGE)
        assert status["verdict"]["code"] == "staged", status["verdict"]
        detail = installed_entry(host)["detail"]
        assert f"resumed at chunk {checkpoint}" in detail, detail
        assert "delta: " in detail, detail
    finally:
        host.cleanup()
        server.stop()


def test_release_without_index_and_host_without_delta_install_the_full_image(
    nginx_host: tuple[Host, Nginx, Path], images: Images
) -> None:
    """A release published with --no-delta installs whole; so does a host with
    install.delta = false (as a host from before delta updates would): its meta is the
    same organixm.meta/1, and it never asks for an index."""
    host, server, pub = nginx_host
    meta = publish_release(images.new, str(pub / "host"), "2.0", 2, with_delta=False)
    status, output = run_boot_check(host)
    assert status["verdict"]["code"] == "staged"
    assert "delta" not in status["verdict"]["message"]
    assert log_events(output, "delta_skipped"), output[-3000:]
    image_requests = [r for r in server.requests() if r.path.endswith(".img.zst")]
    assert image_requests, server.requests()
    assert image_requests[-1].body_bytes == meta.image.compressed_size

    # A host that does not do delta updates, and a release that offers one.
    host.reboot()
    assert host.boot_control().commit("b").b.state == "good"
    meta3 = publish_release(images.old, str(pub / "host"), "3.0", 3)
    parse_meta((pub / "host.meta").read_bytes(), source="host.meta")  # strict v1 still
    host.config.write_text(host.config.read_text().replace("[install]", "[install]\ndelta = false"))
    before = len(server.requests())
    status, _ = run_boot_check(host)
    assert status["verdict"]["code"] == "staged", status["verdict"]
    assert digest(host.slots["a"], IMAGE) == meta3.image.sha256
    later = server.requests()[before:]
    assert not [r for r in later if r.path.endswith((".delta", ".frames.zst"))], later


def test_unsigned_index_is_not_used_when_keys_are_trusted(tmp_path: Path, images: Images) -> None:
    """With trusted keys, an index whose signature is missing is not used: full install."""
    key_path = tmp_path / "k.key"
    secret = SecretKey.generate()
    secret.save(key_path, None)
    pub = tmp_path / "pub"
    pub.mkdir()
    publish_release(images.old, str(pub / "host"), "1.0", 1, key=key_path)
    meta = publish_release(images.new, str(pub / "host"), "2.0", 2, key=key_path)
    index = pub / delta_index_name(meta.image.object)
    (index.parent / (index.name + ".minisig")).unlink()
    host = prepare_host(tmp_path / "host", f"file://{pub}/host", installed=images.old)
    try:
        text = host.config.read_text().replace(
            "[slots]", f"public_keys = [{json.dumps(secret.public_key().to_base64())}]\n[slots]", 1
        )
        host.config.write_text(text)
        status, output = run_boot_check(host)
        assert status["verdict"]["code"] == "staged", status["verdict"]
        assert "delta" not in status["verdict"]["message"]
        skipped = log_events(output, "delta_skipped")
        assert skipped, output[-3000:]
        assert "not signed" in json.dumps(skipped), skipped
        assert digest(host.slots["b"], IMAGE) == digest(images.new, IMAGE)
    finally:
        host.cleanup()


def test_index_for_another_image_or_damaged_is_refused(tmp_path: Path, images: Images) -> None:
    """parse_index names what is wrong: another image, a cut table, an unknown field."""
    pub = tmp_path / "pub"
    pub.mkdir()
    v1 = publish_release(images.old, str(pub / "host"), "1.0", 1)
    v2 = publish_release(images.new, str(pub / "host"), "2.0", 2)
    data = (pub / delta_index_name(v2.image.object)).read_bytes()
    parsed = delta_format.parse_index(data, v2.image, source="i")
    assert parsed.blocks == IMAGE // delta_format.BLOCK_SIZE
    with pytest.raises(ImageError, match="not the meta's"):
        delta_format.parse_index(data, v1.image, source="i")
    import zstandard

    payload = zstandard.ZstdDecompressor().decompress(data)
    cut = zstandard.ZstdCompressor().compress(payload[:-8])
    with pytest.raises(ImageError, match="bytes of tables"):
        delta_format.parse_index(cut, v2.image, source="i")
    head, _, rest = payload.partition(b"\n")
    header, _, tables = rest.partition(b"\n")
    extra = json.loads(header) | {"more": 1}
    odd = zstandard.ZstdCompressor().compress(
        head + b"\n" + json.dumps(extra).encode() + b"\n" + tables
    )
    with pytest.raises(ImageError, match="header fields"):
        delta_format.parse_index(odd, v2.image, source="i")


def test_the_slot_being_written_is_a_source_only_before_it_is_overwritten(
    tmp_path: Path,
) -> None:
    """A block of the slot about to be written serves a block of the new image only when
    it sits in the same chunk or a later one (chunks are written in order); the booted
    slot serves any."""
    from organixctl.publisher.delta import build_delta

    rng = random.Random(21)
    chunk = 256 * 1024
    blocks = [rng.randbytes(delta_format.BLOCK_SIZE) for _ in range(4 * chunk // 4096)]
    image = tmp_path / "new.img"
    image.write_bytes(b"".join(blocks))
    with (tmp_path / "frames").open("wb") as out:
        built = build_delta(image, out, size=image.stat().st_size, image_sha256="0" * 64)
    per_chunk = chunk // delta_format.BLOCK_SIZE
    # The target slot holds block 0 of the new image in chunk 2, and block 3 * per_chunk
    # (chunk 3) in chunk 1; the stable slot holds block 5.
    target = bytearray(len(blocks) * delta_format.BLOCK_SIZE)
    target_path = tmp_path / "b.img"

    def put(buffer: bytearray, at: int, number: int) -> None:
        buffer[at * 4096 : (at + 1) * 4096] = blocks[number]

    put(target, 2 * per_chunk, 0)
    put(target, 1 * per_chunk, 3 * per_chunk)
    target_path.write_bytes(bytes(target))
    stable = bytearray(len(target))
    put(stable, 7, 5)
    stable_path = tmp_path / "a.img"
    stable_path.write_bytes(bytes(stable))
    local = delta.LocalBlocks(
        built.index,
        chunk,
        stable=delta.LocalSlot("a", stable_path, len(stable)),
        target=delta.LocalSlot("b", target_path, len(target)),
    )
    local.scan()
    assert local.source(5) == (local.stable, 7)
    # Chunk 2 of the slot is still old when chunk 0 of the image is assembled.
    assert local.source(0) == (local.target, 2 * per_chunk)
    # Chunk 1 of the slot is new by the time chunk 3 is assembled.
    assert local.source(3 * per_chunk) is None
    assert local.source(1) is None


def test_a_host_holding_nothing_of_the_image_samples_instead_of_scanning(
    tmp_path: Path, images: Images
) -> None:
    """Slot a holds an unrelated image: a sample of 256 pieces finds (almost) none of its
    blocks in the new image, so the slots are not read whole and the full image is
    streamed; a slot holding the image itself samples well above the bar."""
    pub = tmp_path / "pub"
    pub.mkdir()
    publish_release(images.old, str(pub / "host"), "1.0", 1)
    publish_release(images.unrelated, str(pub / "host"), "2.0", 2)
    release = parse_meta((pub / "host.meta").read_bytes(), source="host.meta")
    assert release.image is not None
    stable = delta.LocalSlot("a", images.old, IMAGE)

    async def run() -> tuple[delta.Prepared, float, float]:
        async with open_source(SourceConfig(url=f"file://{pub}/host")) as source:
            prepared = await delta.prepare(
                source, release, [], stable=stable, target=None, start_chunk=0
            )
            index, _, reason = await delta_format.fetch_index(source, release, [])
        assert index is not None, reason
        elsewhere = delta.LocalBlocks(index, CHUNK, stable=stable, target=None)
        holding_it = delta.LocalBlocks(
            index, CHUNK, stable=delta.LocalSlot("a", images.unrelated, IMAGE), target=None
        )
        low, high = elsewhere.sample(), holding_it.sample()
        assert elsewhere.scanned_bytes == 0
        assert elsewhere.sampled_bytes > 0
        return prepared, low, high

    prepared, low, high = asyncio.run(run())
    assert prepared.plan is None
    assert prepared.reason.startswith("a sample of the local slots"), prepared.reason
    assert low < delta_format.SAMPLE_MIN_SHARE < high, (low, high)
