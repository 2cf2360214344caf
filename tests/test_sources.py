"""Installs from each source type through ``organixmd --config ... --once``, a real process.

S3 is moto's server, HTTP is a real nginx, ``file://`` a directory; slots are files,
GRUB's environment a real environment block. Each test asserts the exit code, the
verdict line, the slot's bytes, the state file and that GRUB now boots slot b on trial.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from organixmd.boot.machine import BootControl, BootState
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.images import make_ext4_image, sha256_file
from tests.support.nginx import Nginx, start_nginx
from tests.support.releases import BuiltRelease, build_legacy_release, build_release
from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, MotoServer

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a daemon process: no AWS settings unless a test gives them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class CliHost:
    """A host's files for ``organixmd --once``: two slots, a command line, GRUB env, state."""

    def __init__(
        self,
        root: Path,
        slot_size: int = 40 * MiB,
        *,
        slot_a: Path | None = None,
        slot_b: Path | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.slot_a = slot_a or root / "slot-a.img"
        self.slot_b = slot_b or root / "slot-b.img"
        for slot, given in ((self.slot_a, slot_a), (self.slot_b, slot_b)):
            if given is None:
                with open(slot, "wb") as handle:
                    handle.truncate(slot_size)
        self.cmdline = root / "cmdline"
        self.cmdline.write_text("BOOT_IMAGE=/boot/bzImage organixm.slot=a quiet\n")
        self.grubenv = root / "grubenv"
        self.boot_control().initialize("a")
        self.state_dir = root / "state"
        self.config = root / "organixmd.toml"

    def boot_control(self) -> BootControl:
        return BootControl(self.grubenv, Path(f"{self.grubenv}.bak"))

    def boot_state(self) -> BootState:
        return self.boot_control().read()

    def write_config(self, url: str, source: str = "", extra: str = "") -> Path:
        self.config.write_text(
            f"""
[source]
url = "{url}"
timeout = 5
{source}
[slots]
a = "{self.slot_a}"
b = "{self.slot_b}"
cmdline = "{self.cmdline}"
[boot]
grubenv = "{self.grubenv}"
[daemon]
state_dir = "{self.state_dir}"
socket = "{self.root / "control.sock"}"
host_id_file = "{self.root / "machine-id"}"
{extra}
"""
        )
        return self.config

    def command(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "organixmd.cli",
            "--config",
            str(self.config),
            "--once",
            *args,
        ]

    def run_once(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``organixmd --once`` to the end; stdout holds the verdict line."""
        return subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            env=clean_env(env),
            cwd=REPO,
            timeout=timeout,
            check=False,
        )

    def start_once(self, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start ``organixmd --once`` without waiting (for tests that kill it)."""
        return subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(env),
            cwd=REPO,
        )

    def state_text(self) -> str:
        return (self.state_dir / "state.json").read_text()

    def state(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.state_text())
        return loaded

    def assert_staged(self, done: subprocess.CompletedProcess[str], image: Path) -> None:
        """Exit 0, a 'staged' verdict, slot b holds the image, state and GRUB agree."""
        assert done.returncode == 0, done.stdout + done.stderr
        verdict = done.stdout.strip().splitlines()[-1]
        assert verdict.startswith("staged: "), verdict
        assert "verified in slot b and boots on trial" in verdict
        size = image.stat().st_size
        assert sha256_file(self.slot_b, size) == sha256_file(image)
        state = self.state()
        assert state["slots"]["b"]["status"] == "staged"
        assert state["slots"]["b"]["release"]["sha256"] == sha256_file(image)
        assert state["progress"] is None
        assert state["last_verdict"]["outcome"] == "staged"
        boot = self.boot_state()
        assert boot.order == ("b", "a")
        assert boot.b.state == "trial"
        assert boot.b.tries_left == 3
        assert boot.a.state == "good"
        assert boot.next_slot == "b"


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


def upload_tree(endpoint: str, bucket: str, directory: Path, prefix: str) -> None:
    """Put every file under ``directory`` at ``prefix/relative path``; the meta last."""
    client = s3_client(endpoint)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    files.sort(key=lambda p: p.name.endswith((".meta", ".minisig")))
    for path in files:
        key = f"{prefix}/{path.relative_to(directory)}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 32 MiB ext4 image (mkfs.ext4 -d from generated files)."""
    path = tmp_path_factory.mktemp("rootfs") / "root.img"
    return make_ext4_image(path, 32 * MiB, payload_bytes=20 * MiB, seed=11)


@pytest.fixture(scope="module")
def published(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> BuiltRelease:
    """The rootfs as an organixm release in a directory (1 MiB chunks)."""
    return build_release(rootfs, tmp_path_factory.mktemp("pub") / "fleet", serial=2)


@pytest.fixture
def nginx(published: BuiltRelease, tmp_path: Path) -> Iterator[Nginx]:
    """nginx serving the published release's parent directory."""
    server = start_nginx(published.directory.parent, tmp_path / "nginx")
    try:
        yield server
    finally:
        server.stop()


def test_install_from_s3(
    tmp_path: Path, moto: MotoServer, s3_bucket: str, published: BuiltRelease, rootfs: Path
) -> None:
    """organixmd --once installs a release from S3 (credentials from the environment)."""
    upload_tree(moto.endpoint, s3_bucket, published.directory, "fleet")
    host = CliHost(tmp_path / "host")
    host.write_config(f"s3://{s3_bucket}/fleet/host", f's3_endpoint = "{moto.endpoint}"')
    done = host.run_once(env=moto.credentials_env())
    host.assert_staged(done, rootfs)
    events = [entry["event"] for entry in host.state()["history"]]
    assert events[-3:] == ["install-started", "installed", "flipped"]


def test_install_from_http_nginx(
    tmp_path: Path, nginx: Nginx, published: BuiltRelease, rootfs: Path
) -> None:
    """organixmd --once installs a release served by nginx over HTTP."""
    host = CliHost(tmp_path / "host")
    host.write_config(f"{nginx.url}/fleet/host")
    done = host.run_once()
    host.assert_staged(done, rootfs)
    paths = [(r.path, r.status) for r in nginx.requests()]
    assert ("/fleet/host.meta", 200) in paths
    image = f"/fleet/{published.meta.image.object}"
    assert (image, 200) in paths


def test_install_from_file_url(tmp_path: Path, published: BuiltRelease, rootfs: Path) -> None:
    """organixmd --once installs a release from a local directory (file://, a USB stick)."""
    host = CliHost(tmp_path / "host")
    host.write_config(published.url)
    done = host.run_once()
    host.assert_staged(done, rootfs)


def test_legacy_seed_meta_over_s3(
    tmp_path: Path, moto: MotoServer, s3_bucket: str, rootfs: Path
) -> None:
    """The seed tool's descriptor on S3, its image at the meta key without .meta, installs."""
    seed = tmp_path / "seed"
    build_legacy_release(rootfs, seed / "kiosk", name="host")
    upload_tree(moto.endpoint, s3_bucket, seed / "kiosk", "kiosk")
    host = CliHost(tmp_path / "host")
    host.write_config(f"s3://{s3_bucket}/kiosk/host", f's3_endpoint = "{moto.endpoint}"')
    done = host.run_once(env=moto.credentials_env())
    host.assert_staged(done, rootfs)
    for secret in ("seed-embedded-secret-never-logged", "AKIASEEDEMBEDDEDKEY"):
        assert secret not in done.stdout + done.stderr
        assert secret not in host.state_text()
    assert host.state()["slots"]["b"]["release"]["legacy"] is True


def iam_reader(endpoint: str) -> tuple[str, str]:
    """An IAM user allowed to read S3 on the server; returns its key id and secret.

    With signature checks on, moto accepts only keys that its IAM knows.
    """
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    iam.create_user(UserName="fleet-reader")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(
        UserName="fleet-reader", PolicyName="read", PolicyDocument=json.dumps(policy)
    )
    key = iam.create_access_key(UserName="fleet-reader")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_s3_credentials_file_and_wrong_secret(
    tmp_path: Path, auth_moto: MotoServer, published: BuiltRelease, rootfs: Path
) -> None:
    """Keys from a credentials file are used; a wrong secret is refused and never shown."""
    client = s3_client(auth_moto.endpoint)
    client.create_bucket(Bucket="fleet-auth")
    upload_tree(auth_moto.endpoint, "fleet-auth", published.directory, "fleet")
    key_id, secret = iam_reader(auth_moto.endpoint)
    auth_moto.enable_auth()
    wrong_secret = "wrong-secret-Zq8vX3kP0a7"  # noqa: S105 - a deliberately wrong test secret
    credentials = tmp_path / "s3-credentials"
    credentials.write_text(
        f"# systemd credential\nAWS_ACCESS_KEY_ID={key_id}\nAWS_SECRET_ACCESS_KEY={wrong_secret}\n"
    )
    host = CliHost(tmp_path / "host")
    source = (
        f's3_endpoint = "{auth_moto.endpoint}"\ncredentials = "file"\n'
        f'credentials_file = "{credentials}"'
    )
    host.write_config("s3://fleet-auth/fleet/host", source)
    refused = host.run_once()
    assert refused.returncode == 12, refused.stdout + refused.stderr
    verdict = refused.stdout.strip().splitlines()[-1]
    assert verdict.startswith("error: fetch meta s3://fleet-auth/fleet/host.meta: access denied")
    assert "SignatureDoesNotMatch" in verdict
    assert host.state()["last_verdict"]["code"] == "source-denied"
    for text in (refused.stdout, refused.stderr, host.state_text()):
        assert wrong_secret not in text
    assert sha256_file(host.slot_b) == hashlib.sha256(bytes(40 * MiB)).hexdigest()
    assert host.boot_state().next_slot == "a"

    credentials.write_text(f"AWS_ACCESS_KEY_ID={key_id}\nAWS_SECRET_ACCESS_KEY={secret}\n")
    done = host.run_once()
    host.assert_staged(done, rootfs)
    for text in (done.stdout, done.stderr, host.state_text()):
        assert secret not in text


def test_unchanged_meta_polls_conditionally(
    tmp_path: Path, nginx: Nginx, published: BuiltRelease
) -> None:
    """A second check of an unchanged meta is one conditional request: 304, no image fetch."""
    host = CliHost(tmp_path / "host")
    # The booted slot already runs the release: the first check says up to date.
    host.slot_a.write_bytes(published.image_path.read_bytes())
    host.write_config(f"{nginx.url}/fleet/host")
    first = host.run_once()
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.startswith("up-to-date: slot a runs 1.0 (serial 2)")
    before = len(nginx.requests())
    second = host.run_once()
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.startswith("up-to-date: meta unchanged: slot a runs")
    polled = nginx.requests()[before:]
    assert [(r.path, r.status) for r in polled] == [("/fleet/host.meta", 304)]
    assert polled[0].if_none_match == host.state()["meta_etag"]
    assert not any("/images/" in r.path for r in nginx.requests())


def test_unchanged_meta_on_s3_answers_not_modified(
    tmp_path: Path, moto: MotoServer, s3_bucket: str, published: BuiltRelease
) -> None:
    """On S3 too, an unchanged meta is a conditional GET answered 'not modified'."""
    upload_tree(moto.endpoint, s3_bucket, published.directory, "fleet")
    host = CliHost(tmp_path / "host")
    host.slot_a.write_bytes(published.image_path.read_bytes())
    host.write_config(f"s3://{s3_bucket}/fleet/host", f's3_endpoint = "{moto.endpoint}"')
    first = host.run_once(env=moto.credentials_env())
    assert first.stdout.startswith("up-to-date: slot a runs"), first.stdout + first.stderr
    etag = host.state()["meta_etag"]
    head = s3_client(moto.endpoint).head_object(Bucket=s3_bucket, Key="fleet/host.meta")
    assert etag == head["ETag"]
    second = host.run_once(env=moto.credentials_env())
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.startswith("up-to-date: meta unchanged: slot a runs")
    assert host.state()["meta_etag"] == etag


def test_stalled_s3_download_ends_within_the_source_timeout(
    tmp_path: Path, moto: MotoServer, s3_bucket: str, published: BuiltRelease
) -> None:
    """An S3 image download that stalls mid-body ends in source-unreachable within about
    source.timeout (not botocore's default 60 s read timeout), keeping its checkpoint."""
    upload_tree(moto.endpoint, s3_bucket, published.directory, "fleet")
    half = published.meta.image.compressed_size // 2
    with FaultProxy("127.0.0.1", int(moto.endpoint.rsplit(":", 1)[1])) as proxy:
        proxy.set_fault(Fault("stall", after=half))
        host = CliHost(tmp_path / "host")
        host.write_config(f"s3://{s3_bucket}/fleet/host", f's3_endpoint = "{proxy.url}"')
        text = host.config.read_text().replace("timeout = 5\n", "timeout = 2\n")
        host.config.write_text(text)
        started = time.monotonic()
        done = host.run_once(env=moto.credentials_env(), timeout=90)
        elapsed = time.monotonic() - started
    assert done.returncode != 0, done.stdout
    assert host.state()["last_verdict"]["code"] == "source-unreachable", done.stdout
    assert "broke off" in host.state()["last_verdict"]["message"]
    assert elapsed < 15, f"the stalled download took {elapsed:.1f} s to end (timeout = 2)"
    assert host.state()["progress"]["chunks_done"] > 0
    assert host.boot_state().next_slot == "a"


def test_s3_meta_stalled_mid_body_is_source_unreachable(
    tmp_path: Path, moto: MotoServer, s3_bucket: str, published: BuiltRelease
) -> None:
    """A meta whose body stalls on S3 ends in source-unreachable naming the meta, not in an
    internal error with a traceback; nothing is written."""
    upload_tree(moto.endpoint, s3_bucket, published.directory, "fleet")
    with FaultProxy("127.0.0.1", int(moto.endpoint.rsplit(":", 1)[1])) as proxy:
        # Past the answer's headers, inside the meta's body.
        proxy.set_fault(Fault("stall", after=1500))
        host = CliHost(tmp_path / "host")
        host.write_config(f"s3://{s3_bucket}/fleet/host", f's3_endpoint = "{proxy.url}"')
        text = host.config.read_text().replace("timeout = 5\n", "timeout = 1\n")
        host.config.write_text(text)
        done = host.run_once(env=moto.credentials_env(), timeout=60)
    verdict = host.state()["last_verdict"]
    assert verdict["code"] == "source-unreachable", verdict
    assert "host.meta" in verdict["message"]
    assert "Traceback" not in done.stdout + done.stderr
    assert proxy.connections[0].outcome == "stall"
    assert host.boot_state().next_slot == "a"


@pytest.mark.parametrize("status", [500, 503])
def test_http_server_error_is_source_unreachable_like_s3(
    tmp_path: Path, nginx: Nginx, status: int
) -> None:
    """A web server answering 5xx is a server that is down: source-unreachable with the
    retry hint, as the same answer from S3 is, not a bare source-error."""
    with FaultProxy("127.0.0.1", nginx.port) as proxy:
        proxy.set_fault(Fault("http", status=status))
        host = CliHost(tmp_path / "host")
        host.write_config(f"{proxy.url}/fleet/host")
        host.run_once()
    verdict = host.state()["last_verdict"]
    assert verdict["code"] == "source-unreachable", verdict
    assert f"HTTP {status}" in verdict["message"]
    assert "retries with backoff" in verdict["message"]
    assert host.boot_state().next_slot == "a"


def test_http_meta_trickling_in_ends_within_the_source_timeout(
    tmp_path: Path, nginx: Nginx
) -> None:
    """A meta that trickles in (bytes keep coming, never a pause as long as source.timeout)
    ends in source-unreachable within about source.timeout, as on S3."""
    with FaultProxy("127.0.0.1", nginx.port) as proxy:
        proxy.set_fault(Fault("drip", rate=300))
        host = CliHost(tmp_path / "host")
        host.write_config(f"{proxy.url}/fleet/host")
        host.config.write_text(host.config.read_text().replace("timeout = 5\n", "timeout = 1\n"))
        started = time.monotonic()
        host.run_once(timeout=60)
        elapsed = time.monotonic() - started
    verdict = host.state()["last_verdict"]
    assert verdict["code"] == "source-unreachable", verdict
    assert "fetch meta" in verdict["message"]
    assert elapsed < 8, f"the trickling meta took {elapsed:.1f} s to end (timeout = 1)"


@pytest.mark.parametrize("scheme", ["http", "s3"])
def test_image_trickling_in_below_the_low_speed_limit_ends_and_resumes(
    tmp_path: Path,
    nginx: Nginx,
    moto: MotoServer,
    s3_bucket: str,
    published: BuiltRelease,
    scheme: str,
) -> None:
    """An image arriving slower than source.low_speed_limit for source.low_speed_time ends
    in source-unreachable with its checkpoint kept, although no read ever waits as long
    as source.timeout; once the link is fast again the next run resumes."""
    port = nginx.port if scheme == "http" else int(moto.endpoint.rsplit(":", 1)[1])
    if scheme == "s3":
        upload_tree(moto.endpoint, s3_bucket, published.directory, "fleet")
    with FaultProxy("127.0.0.1", port) as proxy:
        # Fast for the meta and three chunks, then 40 KB/s: 7 MB would take minutes.
        proxy.set_fault(Fault("drip", rate=40_000, after=3 * published.meta.image.chunks[1].offset))
        host = CliHost(tmp_path / "host")
        if scheme == "http":
            host.write_config(
                f"{proxy.url}/fleet/host", "low_speed_limit = 200000\nlow_speed_time = 1.5"
            )
        else:
            host.write_config(
                f"s3://{s3_bucket}/fleet/host",
                f's3_endpoint = "{proxy.url}"\nlow_speed_limit = 200000\nlow_speed_time = 1.5',
            )
        started = time.monotonic()
        host.run_once(env=moto.credentials_env(), timeout=60)
        elapsed = time.monotonic() - started
        verdict = host.state()["last_verdict"]
        assert verdict["code"] == "source-unreachable", verdict
        assert "below source.low_speed_limit" in verdict["message"]
        assert elapsed < 15, f"the trickling image took {elapsed:.1f} s to end"
        chunks = host.state()["progress"]["chunks_done"]
        assert chunks >= 2
        assert host.boot_state().next_slot == "a"
        proxy.clear()
        done = host.run_once(env=moto.credentials_env(), timeout=60)
    host.assert_staged(done, published.image_path)
    installed = [h for h in host.state()["history"] if h["event"] == "installed"]
    assert installed[-1]["detail"].endswith(f"resumed at chunk {chunks}")
