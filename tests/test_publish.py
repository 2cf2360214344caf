"""``organixctl publish`` against a real S3 server (moto) and a local directory."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import zstandard

from organixctl import cmd_publish
from organixctl.exitcodes import Exit
from organixmd.errors import ConfigError, MetaError, SourceNotFound
from organixmd.image import read_seek_table
from organixmd.meta import parse_meta
from organixmd.minisign import PublicKey, SecretKey, verify
from organixmd.s3client import (
    S3Settings,
    load_credentials_file,
    open_client,
    parse_s3_url,
    s3_errors,
)
from tests.support.images import make_ext4_image
from tests.support.s3 import REGION, MotoServer, free_port, start_moto

MiB = 1024 * 1024


def publish_cli(*argv: str | Path) -> int:
    """Run ``organixctl publish`` in this process, as the command line would."""
    parser = argparse.ArgumentParser(prog="organixctl publish")
    cmd_publish.add_arguments(parser)
    return cmd_publish.run(parser.parse_args([str(a) for a in argv]))


@pytest.fixture
def aws_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """Point the AWS credential chain at the test server and nowhere else."""
    for name, value in moto.credentials_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return moto


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An unencrypted key pair made by the stock minisign tool: (secret, public)."""
    work = tmp_path_factory.mktemp("keys")
    secret, public = work / "release.key", work / "release.pub"
    subprocess.run(
        ["minisign", "-G", "-W", "-f", "-p", str(public), "-s", str(secret)],
        check=True,
        capture_output=True,
    )
    return secret, public


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 24 MiB ext4 image, big enough for a multipart upload of its compressed form."""
    work = tmp_path_factory.mktemp("image")
    return make_ext4_image(work / "root.img", 24 * MiB, payload_bytes=14 * MiB, seed=11)


def s3(server: MotoServer) -> Any:
    env = server.credentials_env()
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=REGION,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


class Recorder:
    """moto's own record of the requests it received, in arrival order."""

    def __init__(self, server: MotoServer) -> None:
        self.base = f"{server.endpoint}/moto-api/recorder"

    def _post(self, action: str) -> None:
        urllib.request.urlopen(
            urllib.request.Request(f"{self.base}/{action}", data=b""), timeout=10
        ).read()

    def start(self) -> None:
        self._post("reset-recording")
        self._post("start-recording")

    def stop(self) -> list[tuple[str, str]]:
        """Stop and return (method, path?query) of every recorded request."""
        self._post("stop-recording")
        text = urllib.request.urlopen(f"{self.base}/download-recording", timeout=10).read()
        self._post("reset-recording")
        requests = []
        for line in text.decode().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                # moto appends each request from its own thread; the records of parts
                # uploaded in parallel (megabytes of base64 each) can interleave. The
                # requests these tests look at are never concurrent with another.
                continue
            url = entry["url"].split("://", 1)[-1]
            requests.append((entry["method"], "/" + url.split("/", 1)[1]))
        return requests


@pytest.fixture
def recorder(moto: MotoServer) -> Iterator[Recorder]:
    rec = Recorder(moto)
    yield rec
    rec._post("stop-recording")


def writes(requests: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(m, p) for m, p in requests if m in ("PUT", "POST", "DELETE")]


def check_object(blob: bytes, image: Path, meta_bytes: bytes) -> None:
    """The object decompresses to the image, frame by frame and as a whole."""
    release = parse_meta(meta_bytes)
    assert release.image is not None
    table = release.image
    plain = image.read_bytes()
    assert table.size == len(plain)
    assert table.sha256 == hashlib.sha256(plain).hexdigest()
    assert table.compressed_size == len(blob)
    assert release.image_object == f"images/{hashlib.sha256(blob).hexdigest()}.img.zst"
    whole = hashlib.sha256()
    with zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True) as reader:
        while data := reader.read(4 * MiB):
            whole.update(data)
    assert whole.hexdigest() == table.sha256
    for index, chunk in enumerate(table.chunks):
        frame = blob[chunk.offset : chunk.offset + chunk.length]
        got = zstandard.ZstdDecompressor().decompress(frame)
        start = index * table.chunk_size
        assert got == plain[start : start + table.chunk_plain_size(index)]
        assert hashlib.sha256(got).hexdigest() == chunk.sha256


def unsigned_layout(image_file: Path) -> list[str]:
    """What an unsigned publish leaves in images/: the image, its delta index and the
    one frames object the index names."""
    frames = sorted(p.name for p in image_file.parent.glob("*.frames.zst"))
    assert len(frames) == 1, frames
    return sorted([image_file.name, f"{image_file.name}.delta", frames[0]])


def test_publish_to_s3_round_trip(
    aws_env: MotoServer, s3_bucket: str, small_image: Path, keypair: tuple[Path, Path]
) -> None:
    """A signed release on S3 downloads, verifies and decompresses to the exact image."""
    secret, public = keypair
    code = publish_cli(
        small_image,
        "--to",
        f"s3://{s3_bucket}/fleet/web",
        "--version",
        "24.05.1",
        "--serial",
        "7",
        "--secret-key",
        secret,
        "--chunk-size",
        "1M",
        "--param",
        "console=ttyS0",
    )
    assert code == Exit.OK
    client = s3(aws_env)
    meta_bytes = client.get_object(Bucket=s3_bucket, Key="fleet/web.meta")["Body"].read()
    signature = client.get_object(Bucket=s3_bucket, Key="fleet/web.meta.minisig")["Body"].read()
    release = parse_meta(meta_bytes)
    assert (release.version, release.serial) == ("24.05.1", 7)
    assert release.boot.params == ["console=ttyS0"]
    assert release.boot.kernel == "/boot/bzImage"
    blob = client.get_object(Bucket=s3_bucket, Key=f"fleet/{release.image_object}")["Body"].read()
    check_object(blob, small_image, meta_bytes)
    verified = verify(meta_bytes, signature, [PublicKey.load(public)])
    assert verified.trusted_comment == (
        f"organixm version=24.05.1 serial=7 sha256={release.sha256}"
    )
    keys = sorted(item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    image_key = f"fleet/{release.image_object}"
    frames = [key for key in keys if key.endswith(".frames.zst")]
    assert len(frames) == 1, keys
    # The meta, its signature, the image, its delta index and signature, the frames.
    assert keys == sorted(
        [
            "fleet/web.meta",
            "fleet/web.meta.minisig",
            image_key,
            f"{image_key}.delta",
            f"{image_key}.delta.minisig",
            frames[0],
        ]
    )


def test_signature_verifies_with_stock_minisign(
    tmp_path: Path, small_image: Path, keypair: tuple[Path, Path]
) -> None:
    """`minisign -V` accepts the published .meta.minisig over the exact meta bytes."""
    secret, public = keypair
    out = tmp_path / "mirror"
    out.mkdir()
    code = publish_cli(
        small_image, "--to", out / "web", "--version", "1", "--serial", "1", "--secret-key", secret
    )
    assert code == Exit.OK
    result = subprocess.run(
        ["minisign", "-V", "-p", str(public), "-m", str(out / "web.meta")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "organixm version=1 serial=1" in result.stdout


def test_meta_is_written_last(
    aws_env: MotoServer, s3_bucket: str, tmp_path: Path, recorder: Recorder
) -> None:
    """The server receives the image (completed), then the signature, then the meta."""
    secret = SecretKey.generate()
    key_path = tmp_path / "order.key"
    secret.save(key_path, None)
    # Incompressible, so the object is over one 8 MiB part and goes up as a multipart upload.
    image = tmp_path / "random.img"
    image.write_bytes(random.Random(4).randbytes(12 * MiB))
    recorder.start()
    code = publish_cli(
        image,
        "--to",
        f"s3://{s3_bucket}/web",
        "--version",
        "1",
        "--serial",
        "1",
        "--secret-key",
        key_path,
    )
    requests = writes(recorder.stop())
    assert code == Exit.OK
    paths = [path for _, path in requests]
    image_writes = [i for i, p in enumerate(paths) if ".img.zst?" in p]
    # Compressed, the image is over 8 MiB: create (POST ?uploads), parts, then the
    # completion (POST ?uploadId=) that makes the object visible.
    assert paths[image_writes[0]].endswith("?uploads")
    assert requests[image_writes[-1]][0] == "POST"
    assert "uploadId=" in paths[image_writes[-1]]
    frames = [i for i, p in enumerate(paths) if ".frames.zst" in p]
    index = [i for i, p in enumerate(paths) if p.endswith(".img.zst.delta")]
    index_sig = [i for i, p in enumerate(paths) if p.endswith(".img.zst.delta.minisig")]
    sig = paths.index(f"/{s3_bucket}/web.meta.minisig")
    meta = paths.index(f"/{s3_bucket}/web.meta")
    # The image, the frames the index names, the index, its signature; then the
    # meta's signature and, last, the meta.
    assert image_writes[-1] < frames[0], paths
    assert frames[-1] < index[0], paths
    assert len(index) == 1, paths
    assert index_sig == [index[0] + 1], paths
    assert index_sig[0] < sig < meta == len(paths) - 1


def test_republishing_the_same_image_uploads_nothing_new(
    aws_env: MotoServer, s3_bucket: str, small_image: Path, recorder: Recorder
) -> None:
    """A second publish of the same image writes only the new meta, not the image."""
    target = f"s3://{s3_bucket}/web"
    common = ["--version", "1.0", "--allow-unsigned", "--level", "1"]
    assert publish_cli(small_image, "--to", target, "--serial", "1", *common) == Exit.OK
    client = s3(aws_env)
    first = parse_meta(client.get_object(Bucket=s3_bucket, Key="web.meta")["Body"].read())
    recorder.start()
    assert publish_cli(small_image, "--to", target, "--serial", "2", *common) == Exit.OK
    requests = writes(recorder.stop())
    second = parse_meta(client.get_object(Bucket=s3_bucket, Key="web.meta")["Body"].read())
    assert second.serial == 2
    assert second.image_object == first.image_object
    assert [p for _, p in requests if "/images/" in p] == []
    assert ("PUT", f"/{s3_bucket}/web.meta") in requests


def test_local_directory_target(tmp_path: Path, small_image: Path) -> None:
    """A directory target gets the same layout; republishing keeps the image file as is."""
    out = tmp_path / "usb"
    out.mkdir()
    args = ["--version", "2", "--allow-unsigned", "--chunk-size", "256K"]
    assert publish_cli(small_image, "--to", out / "web", "--serial", "3", *args) == Exit.OK
    meta_bytes = (out / "web.meta").read_bytes()
    release = parse_meta(meta_bytes)
    image_file = out / release.image_object
    check_object(image_file.read_bytes(), small_image, meta_bytes)
    with image_file.open("rb") as handle:
        assert len(read_seek_table(handle)) == len(release.image.chunks) if release.image else 0
    assert sorted(p.name for p in (out / "images").iterdir()) == unsigned_layout(image_file)
    assert not (out / "web.meta.minisig").exists()
    stat_before = image_file.stat()
    time.sleep(0.01)
    assert publish_cli(small_image, "--to", f"file://{out}/web", "--serial", "4", *args) == 0
    stat_after = image_file.stat()
    assert (stat_after.st_ino, stat_after.st_mtime_ns) == (
        stat_before.st_ino,
        stat_before.st_mtime_ns,
    )
    assert parse_meta((out / "web.meta").read_bytes()).serial == 4
    assert sorted(p.name for p in (out / "images").iterdir()) == unsigned_layout(image_file)


def test_unsigned_refused_without_allow_unsigned(
    tmp_path: Path, small_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --secret-key the publisher refuses and writes nothing, naming the way out."""
    out = tmp_path / "mirror"
    out.mkdir()
    code = publish_cli(small_image, "--to", out / "web", "--version", "1", "--serial", "1")
    assert code == Exit.USAGE
    assert "--allow-unsigned" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_encrypted_key_with_password_file(
    tmp_path: Path, small_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An encrypted key is used with --password-file; a wrong password is refused clearly."""
    secret = SecretKey.generate()
    key_path = tmp_path / "enc.key"
    secret.save(key_path, b"correct horse", kdf_opslimit=1 << 10, kdf_memlimit=1 << 20)
    good, bad = tmp_path / "good.pw", tmp_path / "bad.pw"
    good.write_text("correct horse\n")
    bad.write_text("wrong\n")
    out = tmp_path / "mirror"
    out.mkdir()
    common: list[str | Path] = [small_image, "--to", out / "web", "--version", "1", "--serial", "1"]
    assert publish_cli(*common, "--secret-key", key_path, "--password-file", bad) == Exit.ERROR
    assert "wrong password" in capsys.readouterr().err
    assert not (out / "web.meta").exists()
    assert publish_cli(*common, "--secret-key", key_path, "--password-file", good) == Exit.OK
    verify(
        (out / "web.meta").read_bytes(),
        (out / "web.meta.minisig").read_bytes(),
        [secret.public_key()],
    )


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--version", "1 0", "--version '1 0': must start with a letter or digit"),
        ("--version", "-rc1", "--version '-rc1'"),
        ("--serial", "-1", "--serial -1: Input should be greater than or equal to 0"),
        ("--serial", str(2**63), "--serial 9223372036854775808"),
        ("--kernel", "boot/bzImage", "--kernel 'boot/bzImage': must be an absolute path"),
        ("--initrd", "/boot/init rd", "--initrd '/boot/init rd'"),
        ("--param", "a'b", '--param "a\'b"'),
        (
            "--param",
            "organixm.slot=b",
            "--param 'organixm.slot=b': organixm.* kernel parameters are set by GRUB",
        ),
        ("--chunk-size", "3000", "--chunk-size: chunk size 3000 bytes"),
        ("--chunk-size", "128M", "--chunk-size: chunk size 134217728 bytes"),
        ("--rollout-percent", "101", "--rollout-percent 101"),
        ("--uuid", "not-a-uuid", "--uuid 'not-a-uuid': not a UUID"),
        ("--level", "30", "--level 30"),
    ],
)
def test_bad_options_are_named(
    tmp_path: Path,
    option: str,
    value: str,
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each invalid option value is refused with a message naming the option."""
    image = tmp_path / "img"
    image.write_bytes(b"\0" * 65536)
    argv: list[str | Path] = [image, "--to", tmp_path / "web", "--allow-unsigned"]
    values = {"--version": "1", "--serial": "1", option: value}
    # --name=value, so values that start with "-" reach our validation, not argparse's.
    argv += [f"{name}={given}" for name, given in values.items()]
    assert publish_cli(*argv) == Exit.USAGE
    err = capsys.readouterr().err
    assert expected in err
    assert not (tmp_path / "web.meta").exists()


def test_missing_bucket_fails_before_compressing(
    aws_env: MotoServer, small_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bucket that does not exist is reported by name, with no work done first."""
    started = time.monotonic()
    code = publish_cli(
        small_image,
        "--to",
        "s3://no-such-bucket-here/web",
        "--version",
        "1",
        "--serial",
        "1",
        "--allow-unsigned",
    )
    assert code == Exit.ERROR
    err = capsys.readouterr().err
    assert "s3://no-such-bucket-here" in err
    assert "not found" in err
    assert time.monotonic() - started < 10


def test_wrong_credentials_refused_naming_the_bucket(
    tmp_path: Path,
    small_image: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With signature checks on, a wrong secret is refused; the error names the bucket only."""
    server = start_moto(tmp_path / "auth-moto.log")
    try:
        s3(server).create_bucket(Bucket="guarded")
        server.enable_auth()
        wrong_secret = "definitely-not-the-secret-0000"  # noqa: S105 - test value
        env = server.credentials_env()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", env["AWS_ACCESS_KEY_ID"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        code = publish_cli(
            small_image,
            "--to",
            "s3://guarded/web",
            "--version",
            "1",
            "--serial",
            "1",
            "--allow-unsigned",
            "--endpoint",
            server.endpoint,
            "--region",
            REGION,
        )
    finally:
        server.stop()
    assert code == Exit.ERROR
    err = capsys.readouterr().err
    assert "s3://guarded" in err
    assert "access denied" in err
    assert "'guarded'" in err
    assert wrong_secret not in err
    assert env["AWS_ACCESS_KEY_ID"] not in err


def test_credentials_file(
    aws_env: MotoServer,
    s3_bucket: str,
    tmp_path: Path,
    small_image: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--credentials-file supplies the keys when the environment has none."""
    env = aws_env.credentials_env()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    creds = tmp_path / "s3.env"
    creds.write_text(
        "# publisher keys\n"
        f"AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']}\n"
        f"AWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    code = publish_cli(
        small_image,
        "--to",
        f"s3://{s3_bucket}/web",
        "--version",
        "1",
        "--serial",
        "1",
        "--allow-unsigned",
        "--credentials-file",
        creds,
        "--level",
        "1",
    )
    assert code == Exit.OK
    assert s3(aws_env).head_object(Bucket=s3_bucket, Key="web.meta")["ContentLength"] > 0


#: Runs ``organixctl publish`` in a fresh interpreter and reports its peak memory.
#: VmHWM, not getrusage: ru_maxrss survives exec and so counts the parent's pages.
_PUBLISH_AND_MEASURE = """
import argparse, re, sys
from organixctl import cmd_publish
parser = argparse.ArgumentParser()
cmd_publish.add_arguments(parser)
code = cmd_publish.run(parser.parse_args(sys.argv[1:]))
status = open("/proc/self/status").read()
print("maxrss_kib", re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.slow
def test_large_ext4_image_round_trip(
    aws_env: MotoServer,
    s3_bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 256 MiB ext4 image publishes in bounded memory and comes back bit for bit."""
    image = make_ext4_image(tmp_path / "big.img", 256 * MiB, payload_bytes=180 * MiB, seed=5)
    started = time.monotonic()
    result = subprocess.run(
        [
            *(sys.executable, "-c", _PUBLISH_AND_MEASURE, str(image)),
            *("--to", f"s3://{s3_bucket}/fleet/big", "--version", "2.0", "--serial", "20"),
            "--allow-unsigned",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == Exit.OK, result.stderr
    peak_mib = int(result.stderr.split("maxrss_kib")[1].split()[0]) / 1024
    client = s3(aws_env)
    meta_bytes = client.get_object(Bucket=s3_bucket, Key="fleet/big.meta")["Body"].read()
    release = parse_meta(meta_bytes)
    assert release.image is not None
    assert len(release.image.chunks) == 64
    blob = client.get_object(Bucket=s3_bucket, Key=f"fleet/{release.image_object}")["Body"].read()
    check_object(blob, image, meta_bytes)
    ratio = release.size / len(blob)
    with capsys.disabled():
        print(
            f"\npublish of a {release.size / MiB:.0f} MiB ext4 image to moto: "
            f"{release.size / elapsed / 1e6:.0f} MB/s with interpreter start, ratio "
            f"{ratio:.2f}, peak RSS {peak_mib:.0f} MiB; {result.stdout.strip()}"
        )
    assert ratio > 1.5
    # Interpreter and aiobotocore (~80 MiB), chunks in flight, and four 8 MiB upload
    # parts that the HTTP stack may copy once: bounded by parts, not by the image.
    assert peak_mib < 224
    # To a directory, without aiobotocore: ~50 MiB of interpreter plus the chunks in
    # flight. Holding the compressed object (75 MiB), let alone the image, breaks this.
    local = tmp_path / "mirror"
    local.mkdir()
    result = subprocess.run(
        [
            *(sys.executable, "-c", _PUBLISH_AND_MEASURE, str(image)),
            *("--to", str(local / "big"), "--version", "2.0", "--serial", "20"),
            "--allow-unsigned",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == Exit.OK, result.stderr
    local_peak_mib = int(result.stderr.split("maxrss_kib")[1].split()[0]) / 1024
    with capsys.disabled():
        print(f"publish to a directory: peak RSS {local_peak_mib:.0f} MiB")
    assert local_peak_mib < 110


def test_format_doc_example_is_valid_and_signed() -> None:
    """docs/format.md's complete example parses, and its signature verifies over its bytes."""
    text = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    example = text[text.index("## Complete example") :]
    meta_text = example.split("```json\n", 1)[1].split("```", 1)[0]
    blocks = example.split("```")
    minisig = blocks[3].lstrip("\n")
    public = example.split("public half is `", 1)[1].split("`", 1)[0]
    meta_bytes = meta_text.encode()
    release = parse_meta(meta_bytes)
    assert release.image is not None
    assert release.image.chunk_plain_size(3) == 33392
    last = release.image.chunks[-1]
    assert release.image.compressed_size == last.offset + last.length + 8 * 4 + 17
    verified = verify(meta_bytes, minisig.encode(), [PublicKey.parse(public)])
    assert verified.trusted_comment.startswith("organixm version=24.11.3 serial=1732600000")


def test_damaged_object_of_the_same_name_is_replaced(tmp_path: Path, small_image: Path) -> None:
    """An image file whose length is wrong is written again, not trusted by its name."""
    out = tmp_path / "mirror"
    out.mkdir()
    args: list[str | Path] = [
        small_image,
        "--to",
        out / "web",
        "--version",
        "1",
        "--allow-unsigned",
    ]
    assert publish_cli(*args, "--serial", "1") == Exit.OK
    meta_bytes = (out / "web.meta").read_bytes()
    image_file = out / parse_meta(meta_bytes).image_object
    good = image_file.read_bytes()
    image_file.write_bytes(good[: len(good) // 2])
    assert publish_cli(*args, "--serial", "2") == Exit.OK
    assert image_file.read_bytes() == good
    assert sorted(p.name for p in (out / "images").iterdir()) == unsigned_layout(image_file)


def test_unreachable_endpoint_is_reported(
    tmp_path: Path,
    small_image: Path,
    aws_env: MotoServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An S3 endpoint nobody listens on gives an 'unreachable' error naming the bucket."""
    code = publish_cli(
        small_image,
        "--to",
        "s3://somewhere/web",
        "--version",
        "1",
        "--serial",
        "1",
        "--allow-unsigned",
        "--endpoint",
        f"http://127.0.0.1:{free_port()}",
    )
    assert code == Exit.ERROR
    err = capsys.readouterr().err
    assert "s3://somewhere" in err
    assert "EndpointConnectionError" in err


def test_progress_bar_draws_plain_text_lines() -> None:
    """The terminal progress bar redraws one line per phase and ends it with a newline."""
    stream = io.StringIO()
    bar = cmd_publish._ProgressBar(stream)
    bar("compress", 50 * MiB, 100 * MiB)
    bar("compress", 100 * MiB, 100 * MiB)
    bar("upload", 30 * MiB, 30 * MiB)
    bar.close()
    lines = stream.getvalue().split("\n")
    assert lines[0].startswith("\rcompress")
    assert " 50% " in lines[0]
    assert lines[0].rstrip().split("\r")[-1].startswith("compress  [")
    assert "100%" in lines[0].split("\r")[-1]
    assert "upload" in lines[1]
    assert "100%" in lines[1]
    assert lines[2] == ""


def test_parse_s3_url() -> None:
    """s3:// URLs split into bucket and key; other forms are refused with the URL named."""
    assert parse_s3_url("s3://bucket/a/b") == ("bucket", "a/b")
    assert parse_s3_url("s3://bucket", require_key=False) == ("bucket", "")
    for bad in ("https://bucket/a", "s3://bucket", "s3:///a", "s3://bu cket/a", "s3://b/a//c"):
        with pytest.raises(ConfigError, match="s3"):
            parse_s3_url(bad)


def test_credentials_file_errors_never_show_values(tmp_path: Path) -> None:
    """Malformed credential files are refused by line number, without echoing secrets."""
    path = tmp_path / "creds"
    path.write_text("AWS_ACCESS_KEY_ID=AKIDEXAMPLE\nAWS_SECRET=hunter2hunter2\n")
    with pytest.raises(ConfigError, match="line 2") as caught:
        load_credentials_file(path)
    assert "hunter2" not in str(caught.value)
    path.write_text("AWS_ACCESS_KEY_ID=AKIDEXAMPLE\n")
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY missing"):
        load_credentials_file(path)
    path.write_text("export AWS_ACCESS_KEY_ID='AKIDEXAMPLE'\nAWS_SECRET_ACCESS_KEY=s3cr3t\n")
    keys = load_credentials_file(path)
    assert keys.access_key_id.get_secret_value() == "AKIDEXAMPLE"
    assert "s3cr3t" not in repr(keys)
    with pytest.raises(ConfigError, match="cannot read"):
        load_credentials_file(tmp_path / "missing")


async def test_anonymous_client_and_error_mapping(moto: MotoServer, s3_bucket: str) -> None:
    """An unsigned client reaches the server; missing objects and buckets map to our errors."""
    settings = S3Settings(endpoint=moto.endpoint, region=REGION, credentials="anonymous")
    async with open_client(settings) as client:
        with s3_errors(s3_bucket, "", "list"):
            listing = await client.list_objects_v2(Bucket=s3_bucket)
        assert listing["KeyCount"] == 0
        with (
            pytest.raises(SourceNotFound, match=f"fetch s3://{s3_bucket}/nope: not found"),
            s3_errors(s3_bucket, "nope", "fetch"),
        ):
            await client.get_object(Bucket=s3_bucket, Key="nope")
        with (
            pytest.raises(SourceNotFound, match="NoSuchBucket") as caught,
            s3_errors("no-such-bucket-x", "k", "fetch"),
        ):
            await client.get_object(Bucket="no-such-bucket-x", Key="k")
        assert caught.value.__cause__ is not None


def test_missing_target_directory_is_refused(
    tmp_path: Path, small_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory target that does not exist is named in the error and not created."""
    target = tmp_path / "no" / "such" / "web"
    code = publish_cli(
        small_image, "--to", target, "--version", "1", "--serial", "1", "--allow-unsigned"
    )
    assert code == Exit.ERROR
    assert f"target directory {target.parent} does not exist" in capsys.readouterr().err
    assert not target.parent.exists()


def test_target_naming_the_meta_is_refused(
    tmp_path: Path, small_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--to must name the release, not its .meta file (the same rule as the daemon's URL)."""
    code = publish_cli(
        small_image,
        "--to",
        tmp_path / "web.meta",
        "--version",
        "1",
        "--serial",
        "1",
        "--allow-unsigned",
    )
    assert code == Exit.USAGE
    assert "without '.meta'" in capsys.readouterr().err
    assert not (tmp_path / "web.meta").exists()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real full disk for the compressed image."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_reported_and_leaves_nothing(
    tiny_fs: Path, small_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Running out of space while compressing is a clear error; no partial file remains."""
    code = publish_cli(
        small_image,
        "--to",
        tiny_fs / "web",
        "--version",
        "1",
        "--serial",
        "1",
        "--allow-unsigned",
    )
    assert code == Exit.ERROR
    err = capsys.readouterr().err
    assert "No space left on device" in err
    assert "check free space" in err
    assert list((tiny_fs / "images").iterdir()) == []
    assert not (tiny_fs / "web.meta").exists()


def test_lower_serial_than_published_is_refused(
    aws_env: MotoServer,
    s3_bucket: str,
    small_image: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A serial below the published one is refused before any upload; an equal one is not."""
    common: list[str | Path] = [small_image, "--to", f"s3://{s3_bucket}/web"]
    common += ["--version", "1", "--allow-unsigned", "--level", "1"]
    assert publish_cli(*common, "--serial", "5") == Exit.OK
    client = s3(aws_env)
    before = client.get_object(Bucket=s3_bucket, Key="web.meta")["Body"].read()
    capsys.readouterr()
    assert publish_cli(*common, "--serial", "4") == Exit.ERROR
    err = capsys.readouterr().err
    assert "--serial 4 is lower than the serial 5" in err
    assert "--serial 6 or higher" in err
    assert client.get_object(Bucket=s3_bucket, Key="web.meta")["Body"].read() == before
    assert publish_cli(*common, "--serial", "5") == Exit.OK


def test_meta_whose_params_set_the_slot_is_refused(tmp_path: Path, small_image: Path) -> None:
    """A meta made by another tool that carries organixm.slot= in its kernel parameters is
    meta-invalid: it could make the initrd mount another slot than GRUB chose."""
    code = publish_cli(
        small_image, "--to", tmp_path / "web", "--allow-unsigned", "--version=1", "--serial=1"
    )
    assert code == Exit.OK
    meta = json.loads((tmp_path / "web.meta").read_bytes())
    meta["boot"]["params"] = ["console=ttyS0", "organixm.slot=b"]
    with pytest.raises(MetaError, match=r"boot\.params\.1.*organixm\.\* kernel parameters"):
        parse_meta(json.dumps(meta).encode())
