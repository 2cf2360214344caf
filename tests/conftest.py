"""Shared fixtures: one real S3 server (moto) per test session, a fresh bucket per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

from tests.support.s3 import REGION, MotoServer, start_moto

if TYPE_CHECKING:
    from tests.test_slots import LoopDevices


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's S3 server on 127.0.0.1, started once and stopped at the end of the session."""
    work: Path = tmp_path_factory.mktemp("moto")
    with pytest.MonkeyPatch.context() as patch:
        # moto's request recorder (off unless a test starts it) writes here, not into
        # the working directory.
        patch.setenv("MOTO_RECORDER_FILEPATH", str(work / "recording.jsonl"))
        server = start_moto(work / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def auth_moto(tmp_path: Path) -> Iterator[MotoServer]:
    """A moto server of this test's own that checks request signatures."""
    server = start_moto(tmp_path / "moto-auth.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto: MotoServer) -> str:
    """The name of a new, empty bucket on the session's moto server."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    env = moto.credentials_env()
    client = boto3.client(
        "s3",
        endpoint_url=moto.endpoint,
        region_name=REGION,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[LoopDevices]:
    """Loop devices (and mounts on them) a test makes; all undone afterwards."""
    from tests.test_slots import LoopDevices

    devices = LoopDevices(tmp_path)
    try:
        yield devices
    finally:
        devices.close()
