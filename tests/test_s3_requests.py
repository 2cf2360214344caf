"""The daemon's S3 reads are SigV4-signed plain HTTP GETs: no botocore client is made.

Against moto's real server on 127.0.0.1: a meta fetch, a conditional meta fetch and a
ranged read load neither aiobotocore nor any botocore data file (service model,
endpoint rules); signatures are checked by moto; wrong keys and anonymous requests to
a private bucket are ``source-denied`` naming the bucket and key, never a secret.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from organixmd.base.config import SourceConfig
from organixmd.base.errors import (
    SourceChanged,
    SourceDenied,
    SourceError,
    SourceNotFound,
    SourceUnreachable,
)
from organixmd.release.s3client import (
    configured_endpoint,
    error_answer,
    object_http_url,
    s3_error,
)
from organixmd.release.sources import open_source
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, MotoServer
from tests.test_sources import clean_env, iam_reader, s3_client

REPO = Path(__file__).resolve().parent.parent
#: A key that must be percent-encoded exactly as it is signed.
ODD_KEY = "fleet/images/a b+c~(1).bin"
BODY = bytes(range(256)) * 64

#: Runs in a fresh interpreter: records every botocore data file loaded and every
#: client made, then reads the meta (twice, the second conditional) and a range.
PROBE = r"""
import asyncio, json, sys

import botocore.loaders
import botocore.session

loaded = []
original_load_file = botocore.loaders.JSONFileLoader.load_file
def load_file(self, path, *args, **kwargs):
    loaded.append(str(path))
    return original_load_file(self, path, *args, **kwargs)
botocore.loaders.JSONFileLoader.load_file = load_file
original_service_model = botocore.loaders.Loader.load_service_model
def load_service_model(self, service_name, type_name, *args, **kwargs):
    loaded.append(f"{service_name}/{type_name}")
    return original_service_model(self, service_name, type_name, *args, **kwargs)
botocore.loaders.Loader.load_service_model = load_service_model
clients = []
original_create_client = botocore.session.Session.create_client
def create_client(self, service_name, *args, **kwargs):
    clients.append(service_name)
    return original_create_client(self, service_name, *args, **kwargs)
botocore.session.Session.create_client = create_client

from organixmd.base.config import SourceConfig
from organixmd.release.sources import open_source

url, endpoint, name = sys.argv[1:4]

async def main():
    source = open_source(SourceConfig(url=url, s3_endpoint=endpoint, credentials="env"))
    async with source:
        meta = await source.fetch_meta(None)
        unchanged = await source.fetch_meta(meta.etag)
        part = await source.read_range(name, 3, 5)
    return meta, unchanged, part

meta, unchanged, part = asyncio.run(main())
print(json.dumps({
    "meta": meta.data.decode(),
    "etag": meta.etag,
    "unchanged": unchanged is None,
    "part": list(part),
    "loaded": loaded,
    "clients": clients,
    "aiobotocore": sorted(m for m in sys.modules if m.startswith("aiobotocore")),
}))
"""


def put(endpoint: str, bucket: str) -> None:
    client = s3_client(endpoint)
    client.put_object(Bucket=bucket, Key=ODD_KEY, Body=BODY)
    client.put_object(Bucket=bucket, Key="fleet/host.meta", Body=b'{"probe": true}')


@pytest.mark.parametrize("chain", ["environment", "shared-credentials-file"])
def test_s3_source_makes_no_botocore_client(
    tmp_path: Path, moto: MotoServer, s3_bucket: str, chain: str
) -> None:
    """A meta fetch, a conditional one (304) and a ranged read of a key that needs
    encoding: no aiobotocore, no client, no botocore data file, with credentials from
    the environment or from further down botocore's chain (a shared credentials file)."""
    put(moto.endpoint, s3_bucket)
    if chain == "environment":
        env = clean_env(moto.credentials_env())
    else:
        shared = tmp_path / "aws-credentials"
        shared.write_text(
            f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        )
        env = clean_env(
            {
                "AWS_SHARED_CREDENTIALS_FILE": str(shared),
                "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            f"s3://{s3_bucket}/fleet/host",
            moto.endpoint,
            ODD_KEY.removeprefix("fleet/"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["meta"] == '{"probe": true}'
    assert (
        result["etag"]
        == s3_client(moto.endpoint).head_object(Bucket=s3_bucket, Key="fleet/host.meta")["ETag"]
    )
    assert result["unchanged"] is True
    assert bytes(result["part"]) == BODY[3:8]
    assert result["aiobotocore"] == []
    assert result["clients"] == []
    assert result["loaded"] == []


def source_config(endpoint: str, tmp_path: Path, **settings: object) -> SourceConfig:
    return SourceConfig.model_validate(
        {"url": "s3://fleet-auth/fleet/host", "s3_endpoint": endpoint, "timeout": 10, **settings}
    )


async def test_s3_signatures_checked_wrong_keys_and_anonymous_denied(
    tmp_path: Path, auth_moto: MotoServer
) -> None:
    """With moto checking signatures: the right keys read the meta and a range of a key
    that needs encoding; a wrong secret, an unknown key id and an unsigned request are
    source-denied naming the bucket and key (and S3's code), never the secret."""
    s3_client(auth_moto.endpoint).create_bucket(Bucket="fleet-auth")
    put(auth_moto.endpoint, "fleet-auth")
    key_id, secret = iam_reader(auth_moto.endpoint)
    auth_moto.enable_auth()
    keys = tmp_path / "keys"

    keys.write_text(f"AWS_ACCESS_KEY_ID={key_id}\nAWS_SECRET_ACCESS_KEY={secret}\n")
    config = source_config(auth_moto.endpoint, tmp_path, credentials="file", credentials_file=keys)
    async with open_source(config) as source:
        fetched = await source.fetch_meta(None)
        assert fetched is not None
        assert fetched.data == b'{"probe": true}'
        assert await source.read_range(ODD_KEY.removeprefix("fleet/"), 100, 7) == BODY[100:107]
        # Missing is missing, not denied: the IAM user may list the bucket.
        assert await source.fetch_signature() is None

    wrong = "wrong-secret-Zq8vX3kP0a7"
    for key, code in ((key_id, "SignatureDoesNotMatch"), ("AKIAUNKNOWN0000000", "")):
        keys.write_text(f"AWS_ACCESS_KEY_ID={key}\nAWS_SECRET_ACCESS_KEY={wrong}\n")
        async with open_source(config) as source:
            with pytest.raises(SourceDenied) as denied:
                await source.fetch_meta(None)
        message = str(denied.value)
        assert message.startswith("fetch meta s3://fleet-auth/fleet/host.meta: access denied (")
        assert code in message
        assert "fleet-auth" in denied.value.advice
        assert wrong not in message + denied.value.advice

    anonymous = source_config(auth_moto.endpoint, tmp_path, credentials="anonymous")
    async with open_source(anonymous) as source:
        with pytest.raises(SourceDenied) as denied:
            await source.read_range(ODD_KEY.removeprefix("fleet/"), 0, 4)
    assert str(denied.value).startswith(f"fetch range of s3://fleet-auth/{ODD_KEY}: access denied")


async def test_s3_no_credentials_anywhere_is_denied(
    tmp_path: Path, moto: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """credentials = "env" with nothing in botocore's chain: source-denied naming the
    meta, before any request is made."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    config = SourceConfig(url=f"s3://{s3_bucket}/fleet/host", s3_endpoint=moto.endpoint)
    async with open_source(config) as source:
        with pytest.raises(SourceDenied) as denied:
            await source.fetch_meta(None)
    assert str(denied.value).startswith(
        f"fetch meta s3://{s3_bucket}/fleet/host.meta: no S3 credentials found"
    )


def test_s3_addressing_is_botocore_s() -> None:
    """Path-style against a configured endpoint; on AWS virtual-hosted for a DNS-label
    bucket, path-style otherwise; keys percent-encoded as botocore encodes them (the
    same URLs botocore 1.43's S3 client makes)."""
    assert (
        object_http_url("http://127.0.0.1:9000", "us-east-1", "fleet", "a/b c+d~.meta")
        == "http://127.0.0.1:9000/fleet/a/b%20c%2Bd~.meta"
    )
    assert (
        object_http_url("http://minio.lan:9000/base/", "eu-west-1", "fleet", "a/b")
        == "http://minio.lan:9000/base/fleet/a/b"
    )
    assert (
        object_http_url(None, "us-east-1", "fleet", "a/b c+d~.meta")
        == "https://fleet.s3.amazonaws.com/a/b%20c%2Bd~.meta"
    )
    assert (
        object_http_url(None, "eu-west-1", "fleet", "a/b")
        == "https://fleet.s3.eu-west-1.amazonaws.com/a/b"
    )
    assert (
        object_http_url(None, "eu-west-1", "my.bucket", "a/b")
        == "https://s3.eu-west-1.amazonaws.com/my.bucket/a/b"
    )
    assert (
        object_http_url(None, "us-east-1", "Fleet_X", "a/b")
        == "https://s3.amazonaws.com/Fleet_X/a/b"
    )
    assert (
        object_http_url(None, "cn-north-1", "fleet", "a/b")
        == "https://fleet.s3.cn-north-1.amazonaws.com.cn/a/b"
    )


def test_s3_endpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """source.s3_endpoint first, then AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL, as botocore."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://any.lan:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3.lan:1")
    assert configured_endpoint("http://given:1") == "http://given:1"
    assert configured_endpoint(None) == "http://s3.lan:1"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert configured_endpoint(None) == "http://any.lan:1"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert configured_endpoint(None) is None


def test_s3_error_answer_and_region_hint() -> None:
    """S3's error XML gives the code and message (matched, never parsed); a redirect to
    another region says which region to configure."""
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PermanentRedirect</Code>'
        b"<Message>The bucket you are attempting to access must be addressed using the "
        b"specified endpoint.</Message><Bucket>fleet</Bucket></Error>"
    )
    code, message, region = error_answer(body, 301, {"x-amz-bucket-region": "eu-west-1"})
    assert (code, region) == ("PermanentRedirect", "eu-west-1")
    assert message.startswith("The bucket you are attempting")
    assert error_answer(b"", 503, {}) == ("503", "", "")
    assert error_answer(b"<Code>bad code<script></Code>", 400, {})[0] == "400"
    error = s3_error(code, 301, message, "fetch meta s3://fleet/host.meta", "fleet", region)
    assert type(error) is SourceError
    assert str(error).startswith("fetch meta s3://fleet/host.meta: PermanentRedirect: The bucket")
    assert error.advice == 'the bucket is in region eu-west-1: set source.s3_region = "eu-west-1"'


async def test_s3_server_errors_are_retried_within_the_timeout(
    moto: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5xx for the first two requests: the third answers within one fetch, as botocore's
    standard retries did; 5xx that goes on is source-unreachable after three tries."""
    put(moto.endpoint, s3_bucket)
    for name, value in moto.credentials_env().items():
        monkeypatch.setenv(name, value)
    with FaultProxy("127.0.0.1", int(moto.endpoint.rsplit(":", 1)[1])) as proxy:
        config = SourceConfig.model_validate(
            {
                "url": f"s3://{s3_bucket}/fleet/host",
                "s3_endpoint": proxy.url,
                "timeout": 10,
            }
        )
        async with open_source(config) as source:
            proxy.set_fault(Fault("http", status=503, connections=2))
            fetched = await source.fetch_meta(None)
            assert fetched is not None
            assert fetched.data == b'{"probe": true}'
            assert [c.outcome for c in proxy.connections][:2] == ["http", "http"]
            proxy.set_fault(Fault("http", status=500))
            before = len(proxy.connections)
            with pytest.raises(SourceUnreachable) as failed:
                await source.fetch_meta(None)
            assert len(proxy.connections) - before == 3
    assert str(failed.value).startswith(
        f"fetch meta s3://{s3_bucket}/fleet/host.meta: the S3 server failed"
    )


async def test_s3_image_errors_name_s3s_code(
    moto: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume whose object changed is source-changed (PreconditionFailed) and a missing
    image source-not-found (NoSuchKey): the error answer is read before it is closed."""
    put(moto.endpoint, s3_bucket)
    for name, value in moto.credentials_env().items():
        monkeypatch.setenv(name, value)
    config = SourceConfig(url=f"s3://{s3_bucket}/fleet/host", s3_endpoint=moto.endpoint)
    # A seed-format release names its image by an absolute key; nothing else is read.
    image: Any = SimpleNamespace(object_is_absolute=True, image_object=ODD_KEY)
    missing: Any = SimpleNamespace(object_is_absolute=True, image_object="fleet/none.img")
    async with open_source(config) as source:
        stream = await source.open_image(image, 10, None)
        try:
            assert await stream.read(6) == BODY[10:16]
            etag = stream.etag
        finally:
            await stream.aclose()
        assert etag is not None
        with pytest.raises(SourceChanged) as changed:
            await source.open_image(image, 10, '"0123456789abcdef0123456789abcdef"')
        with pytest.raises(SourceNotFound) as not_found:
            await source.open_image(missing, 0, None)
        resumed = await source.open_image(image, 10, etag)
        await resumed.aclose()
    assert changed.value.message == (
        f"download image s3://{s3_bucket}/{ODD_KEY}: the object changed (PreconditionFailed)"
    )
    assert not_found.value.message == (
        f"download image s3://{s3_bucket}/fleet/none.img: not found (NoSuchKey)"
    )
