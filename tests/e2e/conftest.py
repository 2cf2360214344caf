"""One guest tree and each release, built once per session for every end-to-end test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import harness


@pytest.fixture(scope="session")
def e2e_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def releases(e2e_work: Path) -> harness.Releases:
    tree = harness.guest_tree(e2e_work)
    return harness.Releases(e2e_work / "releases", tree)
