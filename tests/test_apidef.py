"""The control API's one definition (``organixmd.apidef``) against what is documented,
raised and served.

* docs/operations.md's verdict-code table lists exactly the ``VerdictCode`` members,
  each with the outcomes ``VERDICT_OUTCOMES`` gives it;
* every code of the error tree either is a verdict code or is one of the few codes that
  never end a check;
* a real daemon's answers (status, history, the answers of the changes, problems and
  the events of an install) have exactly the keys, and values of the types, of their
  ``TypedDict``, nested ones included: the definition cannot drift from what is served.
"""

from __future__ import annotations

import json
import os
import re
import time
import types
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict

import pytest

from organixctl.client import Client
from organixmd import apidef
from organixmd.apidef import (
    SLOT_NAMES,
    VERDICT_OUTCOMES,
    CancelAnswer,
    CheckAnswer,
    Event,
    EventKind,
    HistoryDoc,
    MarkGoodAnswer,
    Outcome,
    ProblemDoc,
    Route,
    StatusDoc,
    UpdateStarted,
    VerdictCode,
)
from organixmd.base import errors
from tests.support.daemon import REPO, DaemonProcess, Host, make_images, prepare_host, request
from tests.support.nginx import start_nginx
from tests.support.releases import build_release

OPERATIONS = REPO / "docs" / "operations.md"

#: Codes of the error tree that never end a check (so they are no verdict code).
#: The codes only the policy gives (organixmd.host.policy.decide); slot-unusable is both
#: the policy's (the target check) and an error's (a write that fails).
POLICY_CODES = frozenset(
    {
        "up-to-date",
        "update-available",
        "waiting-for-commit",
        "rollout-excluded",
        "staged",
        "verified",
        "downgrade-refused",
        "release-failed-before",
        "booted-slot-unknown",
        "boot-env-disagrees",
    }
)

NEVER_A_VERDICT = frozenset(
    {
        # A control-socket request refused before anything runs: a check or install
        # is already running, a malformed body, a peer that may not change anything.
        "busy",
        "bad-request",
        "permission-denied",
        # organixctl's own commands (keygen, publish) on the admin's machine.
        "key-invalid",
        "publish-failed",
        # The daemon does not start with an invalid configuration.
        "config-invalid",
        # After a check staged its release: the reboot stays pending (status says so).
        "reboot-failed",
        # The base class's code; an error raised on purpose has a code of its own, and a
        # bug that ends a check is an ``internal-error``.
        "organixm-error",
    }
)


# ---------------------------------------------------------------------------- the shape check


def shape_errors(value: object, hint: Any, where: str = "$") -> list[str]:
    """What in the decoded JSON ``value`` does not fit the type ``hint`` (a TypedDict,
    ``X | None``, ``Literal``, ``list``, ``dict``, an enum or a JSON scalar)."""
    if is_typeddict(hint):
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not an object ({hint.__name__})"]
        hints = get_type_hints(hint)
        required: frozenset[str] = hint.__required_keys__
        optional: frozenset[str] = hint.__optional_keys__
        found = []
        missing = required - value.keys()
        extra = value.keys() - required - optional
        if missing:
            found.append(f"{where}: {hint.__name__} keys missing: {sorted(missing)}")
        if extra:
            found.append(f"{where}: keys not in {hint.__name__}: {sorted(extra)}")
        for key in sorted(value.keys() & hints.keys()):
            found += shape_errors(value[key], hints[key], f"{where}.{key}")
        return found
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [option for option in get_args(hint) if option is not type(None)]
        if value is None:
            return [] if len(options) < len(get_args(hint)) else [f"{where}: null"]
        if len(options) == 1:
            return shape_errors(value, options[0], where)
        results = [shape_errors(value, option, where) for option in options]
        if any(not result for result in results):
            return []
        return [f"{where}: {value!r} fits none of {hint}: {results}"]
    if origin is Literal:
        return [] if value in get_args(hint) else [f"{where}: {value!r} not in {hint}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not a list"]
        (item,) = get_args(hint)
        return [e for i, v in enumerate(value) for e in shape_errors(v, item, f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not an object"]
        key_hint, value_hint = get_args(hint)
        found = []
        for key, item in value.items():
            found += shape_errors(key, key_hint, f"{where} key")
            found += shape_errors(item, value_hint, f"{where}.{key}")
        return found
    if isinstance(hint, type) and issubclass(hint, Enum):
        return [] if value in {m.value for m in hint} else [f"{where}: {value!r} not a {hint}"]
    if hint is bool:
        return [] if isinstance(value, bool) else [f"{where}: {value!r} is not a boolean"]
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: {value!r} is not an integer"]
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{where}: {value!r} is not a number"]
    if hint is str:
        return [] if isinstance(value, str) else [f"{where}: {value!r} is not a string"]
    raise AssertionError(f"{where}: the shape check does not know {hint!r}")


def test_the_shape_check_finds_a_missing_an_extra_and_a_mistyped_key() -> None:
    """The checker itself: a planted difference at any depth is reported."""
    verdict = {
        "outcome": "up-to-date",
        "code": "up-to-date",
        "message": "m",
        "release": None,
        "at": "2026-01-01T00:00:00Z",
    }
    assert shape_errors({"verdict": verdict}, CheckAnswer) == []
    assert shape_errors({"verdict": {**verdict, "extra": 1}}, CheckAnswer) == [
        "$.verdict: keys not in VerdictDoc: ['extra']"
    ]
    without_at = {k: v for k, v in verdict.items() if k != "at"}
    assert shape_errors({"verdict": without_at}, CheckAnswer) == [
        "$.verdict: VerdictDoc keys missing: ['at']"
    ]
    assert shape_errors({"verdict": {**verdict, "outcome": "fine"}}, CheckAnswer) == [
        "$.verdict.outcome: 'fine' not a <enum 'Outcome'>"
    ]
    release = {"version": "1", "serial": "1", "uuid": "u", "sha256": "h", "size": 1}
    assert shape_errors({"verdict": {**verdict, "release": release}}, CheckAnswer) == [
        "$.verdict.release: ReleaseDoc keys missing: ['legacy']",
        "$.verdict.release.serial: '1' is not an integer",
    ]
    problem = {"type": "t", "title": "t", "status": 404, "code": "c", "detail": "d"}
    assert shape_errors(problem, ProblemDoc) == []
    assert shape_errors({**problem, "hint": "h"}, ProblemDoc) == []


# ---------------------------------------------------------------------------- docs and errors


def documented_verdicts() -> dict[str, frozenset[str]]:
    """code -> outcomes of the table in operations.md, "Why did my host not update?"."""
    text = OPERATIONS.read_text()
    section = text.split("\n## Why did my host not update?\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, frozenset[str]] = {}
    for code, outcomes in re.findall(r"^\| `([a-z-]+)` \| ([^|]+) \|", section, re.MULTILINE):
        assert code not in rows, f"{code} is listed twice"
        rows[code] = frozenset(re.split(r",\s*|\s+or\s+", outcomes.strip()))
    assert len(rows) > 20, "the table was not found; was the section renamed?"
    return rows


def test_every_verdict_code_has_its_outcomes() -> None:
    assert set(VERDICT_OUTCOMES) == set(VerdictCode)
    assert all(VERDICT_OUTCOMES.values())


def test_the_docs_list_exactly_the_verdict_codes_with_their_outcomes() -> None:
    expected = {
        code.value: frozenset(outcome.value for outcome in outcomes)
        for code, outcomes in VERDICT_OUTCOMES.items()
    }
    assert documented_verdicts() == expected


def _error_classes(base: type[errors.OrganixmError]) -> Iterator[type[errors.OrganixmError]]:
    yield base
    for sub in base.__subclasses__():
        yield from _error_classes(sub)


def test_every_error_code_is_a_verdict_code_or_never_ends_a_check() -> None:
    classes = [c for c in _error_classes(errors.OrganixmError) if c.__module__ == errors.__name__]
    codes = {cls.code for cls in classes}
    assert len(classes) > 20
    verdicts = {code.value for code in VerdictCode}
    assert codes - verdicts - NEVER_A_VERDICT == set()
    # The exceptions are real codes of the tree, and none of them is a verdict code.
    assert NEVER_A_VERDICT - codes == set()
    assert not NEVER_A_VERDICT & verdicts
    # And the other way: every code that is not the policy's is raised by some error class
    # (the policy's codes are checked against the policy in tests/test_policy.py).
    assert verdicts - POLICY_CODES - codes == set()


def test_event_kinds_are_the_event_documents() -> None:
    kinds = [get_args(get_type_hints(doc)["event"]) for doc in get_args(Event)]
    assert sorted(kind for (kind,) in kinds) == sorted(get_args(EventKind))


def test_apidef_imports_the_standard_library_only() -> None:
    """Its imports are enum and typing: organixctl's daemon commands import it."""
    source = Path(apidef.__file__).read_text()
    imports = re.findall(r"^(?:from|import) (\S+)", source, re.MULTILINE)
    assert sorted(imports) == ["enum", "typing"]


# ---------------------------------------------------------------------------- a real daemon


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real ext4 root images (releases 1.0 and 2.0)."""
    return make_images(tmp_path_factory.mktemp("images"), 2)


@pytest.fixture(scope="module")
def up_to_date(tmp_path_factory: pytest.TempPathFactory, images: list[Path]) -> Iterator[Host]:
    """A host on slot a, which holds the published release 1.0."""
    root = tmp_path_factory.mktemp("apidef")
    release = build_release(images[0], root / "pub", version="1.0", serial=1)
    host = prepare_host(root / "host", release.url, installed=images[0])
    daemon = DaemonProcess(host).start()
    try:
        daemon.wait_ready()
        yield host
    finally:
        daemon.stop()
        host.cleanup()


def _call(host: Host, method: str, route: str, body: bytes | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    answer = request(host.socket, method, route, body, headers)
    return answer.status, answer.json()


def test_served_status_has_exactly_the_keys_of_status_doc(up_to_date: Host) -> None:
    status, doc = _call(up_to_date, "GET", Route.STATUS)
    assert status == 200
    assert shape_errors(doc, StatusDoc) == []
    assert tuple(doc["slots"]) == SLOT_NAMES
    # The nested documents this host fills in are checked, not only their nulls.
    assert doc["verdict"] is not None
    assert doc["verdict"]["release"] is not None
    assert doc["slots"]["a"]["release"] is not None
    assert doc["api"] == apidef.API_VERSION


def test_served_history_and_answers_fit_their_documents(up_to_date: Host) -> None:
    status, history = _call(up_to_date, "GET", Route.HISTORY)
    assert (status, shape_errors(history, HistoryDoc)) == (200, [])
    assert history["history"]
    answers = [
        (Route.CHECK, b"{}", 200, CheckAnswer),
        (Route.UPDATE, b'{"wait": true}', 200, CheckAnswer),
        (Route.CANCEL, b"{}", 200, CancelAnswer),
        (Route.MARK_GOOD, b"{}", 200, MarkGoodAnswer),
        # Slot b is bad: a problem with a hint.
        (Route.ROLLBACK, b"{}", 409, ProblemDoc),
        # A problem without a hint.
        ("/v1/nothing", b"{}", 404, ProblemDoc),
        (Route.CHECK, b"[1]", 400, ProblemDoc),
    ]
    for route, body, expected, doc_type in answers:
        status, doc = _call(up_to_date, "POST", route, body)
        assert status == expected, (route, doc)
        assert shape_errors(doc, doc_type) == [], route
    status, started = _call(up_to_date, "POST", Route.UPDATE, b"{}")
    assert (status, shape_errors(started, UpdateStarted)) == (202, [])
    _wait_idle(up_to_date)


def _wait_idle(host: Host, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _call(host, "GET", Route.STATUS)[1]["phase"] != "idle":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _event_types() -> dict[str, Any]:
    return {get_args(get_type_hints(doc)["event"])[0]: doc for doc in get_args(Event)}


def test_the_events_and_status_of_an_install_fit_their_documents(
    tmp_path: Path, images: list[Path]
) -> None:
    """An install from a rate-limited server: every event (status, phases, progress,
    the verdict, stopping) and the status while downloading and once staged fit."""
    pub = tmp_path / "pub"
    build_release(images[0], pub, version="1.0", serial=1)
    server = start_nginx(pub, tmp_path / "nginx", limit_rate="2m")
    host = prepare_host(tmp_path / "host", f"{server.url}/host", installed=images[0])
    try:
        with DaemonProcess(host).start() as daemon:
            daemon.wait_ready()
            meta = pub / "host.meta"
            before = meta.stat().st_mtime
            build_release(images[1], pub, version="2.0", serial=2)
            if int(meta.stat().st_mtime) <= int(before):
                os.utime(meta, (before + 2, before + 2))
            events = Client(str(host.socket), timeout=60).events()
            seen: list[dict[str, Any]] = [json.loads(next(events)[0])]
            assert _call(host, "POST", Route.UPDATE, b"{}")[0] == 202
            statuses: list[dict[str, Any]] = []
            for raw, _ in events:
                event = json.loads(raw)
                seen.append(event)
                if event["event"] == "progress" and len(statuses) < 3:
                    statuses.append(_call(host, "GET", Route.STATUS)[1])
                if event["event"] == "phase" and event["phase"] in ("staged", "error"):
                    break
            statuses.append(_call(host, "GET", Route.STATUS)[1])
            daemon.stop()
            seen += [json.loads(raw) for raw, _ in events]
    finally:
        server.stop()
        host.cleanup()
    kinds = _event_types()
    for event in seen:
        assert shape_errors(event, kinds[event["event"]], event["event"]) == []
    assert {event["event"] for event in seen} == set(kinds)
    verdict = next(event for event in seen if event["event"] == "verdict")
    assert verdict["outcome"] == Outcome.STAGED
    assert any(status["progress"] is not None for status in statuses)
    for status in statuses:
        assert shape_errors(status, StatusDoc) == []
    assert statuses[-1]["slots"]["b"]["status"] == "staged"
