"""Fault row "bad input: fuzzed metas": every malformed descriptor is a clear MetaError.

A seeded fuzzer makes metas of both formats (docs/format.md): structured
mutations of a valid ``organixm.meta/1`` document and of a seed descriptor
(wrong types, out-of-range numbers, missing and unknown keys, traversal and
absolute URLs in object names, chunk tables that do not add up, unicode
oddities), byte-level damage to their serialised forms, random bytes, and huge
or deeply nested JSON. Each one goes through :func:`organixmd.release.meta.parse_meta`,
which must either parse it or raise :class:`MetaError`: any other exception is
a failure. A seeded sample is then signed and published as the meta of a real
daemon's file source, and ``POST /v1/check`` must answer a verdict with a clear
code, without a flip of the GRUB environment or a traceback in the log.

The seeds are fixed and printed; a failing case names its seed and index, and
:func:`fuzzed_meta` rebuilds it.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from organixmd.base.errors import MetaError
from organixmd.boot.machine import BootControl
from organixmd.release.meta import MAX_META_BYTES, MAX_META_DEPTH, parse_meta
from organixmd.release.minisign import SecretKey
from tests.faults.report import FaultReport, Row, count_tracebacks
from tests.support.daemon import DaemonProcess, Host, make_images, prepare_host, request
from tests.support.releases import BuiltRelease, build_release

SEED = 20260901
PARSE_CASES = 12_000
CHECK_SEED = 4242
CHECK_CASES = 40

SHA = "ab" * 32
V1: dict[str, Any] = {
    "schema": "organixm.meta/1",
    "version": "1.0",
    "serial": 7,
    "uuid": "9d8f1c7e-2f4b-4b7a-9c55-0f6f3f3d2a11",
    "created": "2026-01-01T00:00:00Z",
    "image": {
        "object": "images/abc.img.zst",
        "format": "zstd-seekable",
        "size": 3 * 1024 * 1024 - 5,
        "sha256": SHA,
        "compressed_size": 900_000,
        "chunk_size": 1024 * 1024,
        "chunks": [
            {"offset": 0, "length": 300_000, "sha256": SHA},
            {"offset": 300_000, "length": 300_000, "sha256": SHA},
            {"offset": 600_000, "length": 300_000, "sha256": SHA},
        ],
    },
    "boot": {
        "kernel": "/boot/vmlinuz",
        "initrd": "/boot/initrd",
        "init": "/sbin/init",
        "params": ["quiet"],
    },
    "rollout_percent": 100,
}
SEED_META: dict[str, Any] = {
    "sha256": SHA,
    "size": 32 * 1024 * 1024,
    "format": "raw+zstd",
    "internal": {
        "uuid": "ABCD-EFGH-IJKL-MNOPQR-SOMETHING",
        "object_path": "kiosk/host",
        "der_bzimage": "/nix/store/aaaa-linux/bzImage",
        "der_init": "/nix/store/bbbb-nixos-system/init",
        "der_initrd": "/nix/store/cccc-initrd/initrd",
        "region": "us-east-1",
        "bucket": "myorganixms",
        "access_key": "AKIASEEDEMBEDDEDKEY",
        "secret_key": "seed-embedded-secret-never-logged",
    },
}

TRAVERSAL = [
    "../images/x.img.zst",
    "images/../../etc/shadow",
    "/etc/passwd",
    "//host/share/x",
    "http://evil.example/x.img.zst",
    "https://127.0.0.1:1/x",
    "s3://other-bucket/x",
    "file:///etc/shadow",
    "images/./x",
    "images//x",
    "..",
    ".",
    "images/..",
    "..\\..\\windows",
    "images/%2e%2e/%2e%2e/x",
    "~root/.ssh/id_rsa",
    "images/x\nimages/y",
    "images/x\x00.zst",
    "images/\u202ex.zst",
    "",
]
UNICODE = [
    "\u202e1.0",
    "\uff11.\uff10",
    "\u0661\u0662",
    "e\u0301",
    "\ufeff1.0",
    "\U0001f4a5",
    "\x00",
    "\x7f",
    "a\u200bb",
    "\ud800",
    "\udfff\ud800",
    "\uffff",
    "İ",
]


def _values(rng: random.Random) -> Any:
    """A value of a random wrong type or range."""
    choice = rng.randrange(24)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([-1, 0, 1, 4095, 4096, 65535, 65536])
    if choice == 3:
        return rng.choice([2**31, 2**50, 2**50 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1])
    if choice == 4:
        return 10 ** rng.randrange(20, 400)
    if choice == 5:
        return rng.choice([0.5, -0.0, 1e308, 1e-308, 3.0, float("inf"), float("nan")])
    if choice == 6:
        return ""
    if choice == 7:
        return "x" * rng.choice([65, 257, 513, 1025, 70_000])
    if choice == 8:
        return rng.choice(UNICODE)
    if choice == 9:
        return rng.choice(TRAVERSAL)
    if choice == 10:
        return []
    if choice == 11:
        return {}
    if choice == 12:
        return [rng.randrange(10) for _ in range(rng.randrange(1, 5))]
    if choice == 13:
        return {"nested": {"deeper": [1, 2, {"x": None}]}}
    if choice == 14:
        return rng.choice(["1", "1.0", "true", "null", "0x10", "1e3", " 7 ", "-1"])
    if choice == 15:
        return rng.choice(["2026-01-01T00:00:00", "2026-13-01T00:00:00Z", "yesterday", "0"])
    if choice == 16:
        return rng.choice(["AB" * 32, "ab" * 31, "ab" * 33, "zz" * 32, SHA + "\n"])
    if choice == 17:
        return rng.choice(["organixm.meta/2", "organixm.meta/1 ", "ORGANIXM.META/1", None])
    if choice == 18:
        return rng.choice(["zstd", "raw+zstd", "zstd-seekable ", "gzip"])
    if choice == 19:
        return rng.choice(["boot/vmlinuz", "/boot/vm linuz", "/a;reboot", "/a'b", "/${x}"])
    if choice == 20:
        return rng.choice(["organixm.slot=b", "init=/bin/sh", "a b", "", "x" * 300])
    if choice == 21:
        return rng.choice(["not-a-uuid", "9d8f1c7e2f4b4b7a9c550f6f3f3d2a11", 12345])
    if choice == 22:
        return rng.getrandbits(64) - 2**63
    return rng.choice([101, -5, 100, 0, 50.5])


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every location (key path) in a JSON document."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _parent(document: Any, path: tuple[Any, ...]) -> tuple[Any, Any]:
    node = document
    for part in path[:-1]:
        node = node[part]
    return node, path[-1]


def _mutate_structure(rng: random.Random, document: dict[str, Any]) -> Any:
    """One to three random edits at random places of a valid document."""
    doc: Any = copy.deepcopy(document)
    for _ in range(rng.randrange(1, 4)):
        locations = [p for p in _paths(doc) if p]
        if not isinstance(doc, dict) or not locations:
            break
        path = rng.choice(locations)
        parent, key = _parent(doc, path)
        edit = rng.randrange(6)
        if edit == 0:
            del parent[key]
        elif edit in (1, 2):
            parent[key] = _values(rng)
        elif edit == 3 and isinstance(parent, dict):
            parent[rng.choice(["extra", "Schema", "image ", "__proto__", "ßchema"])] = _values(rng)
        elif edit == 4 and isinstance(parent[key], list) and parent[key]:
            items = parent[key]
            action = rng.randrange(3)
            if action == 0:
                items.pop(rng.randrange(len(items)))
            elif action == 1:
                items.append(copy.deepcopy(rng.choice(items)))
            else:
                rng.shuffle(items)
        else:
            parent[key] = _values(rng)
    return doc


def _chunk_table(rng: random.Random) -> Any:
    """A v1 meta whose chunk table does not add up (or is absurdly large)."""
    doc: Any = copy.deepcopy(V1)
    image = doc["image"]
    kind = rng.randrange(7)
    if kind == 0:
        image["size"] += image["chunk_size"]
    elif kind == 1:
        image["chunks"][rng.randrange(3)]["offset"] += rng.choice([-1, 1, 4096])
    elif kind == 2:
        image["compressed_size"] = rng.randrange(1, 900_000)
    elif kind == 3:
        image["chunk_size"] = rng.choice([4096, 65536 + 1, 2**27, 1024 * 1024 + 4096])
    elif kind == 4:
        image["chunks"][rng.randrange(3)]["length"] = rng.choice([0, -1, 2**60])
    elif kind == 5:
        count = rng.choice([10_000, 20_000])
        image["chunks"] = [{"offset": i * 10, "length": 10, "sha256": SHA} for i in range(count)]
        image["size"] = count * image["chunk_size"]
        image["compressed_size"] = count * 10
    else:
        image["chunks"] = []
    return doc


def _deep(rng: random.Random) -> bytes:
    depth = rng.choice([MAX_META_DEPTH + 1, 100, 1000, 10_000, 100_000, 400_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    inner = opener * depth + b"1" + closer * depth
    where = rng.randrange(3)
    if where == 0:
        return inner
    base = copy.deepcopy(V1 if where == 1 else SEED_META)
    text = json.dumps(base).encode()
    # The deep value replaces one field: a signed meta that is valid but for its depth.
    return text.replace(b'"1.0"' if where == 1 else b'"us-east-1"', inner, 1)


def _damage_bytes(rng: random.Random, data: bytes) -> bytes:
    raw = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        if not raw:
            break
        position = rng.randrange(len(raw))
        action = rng.randrange(4)
        if action == 0:
            raw[position] = rng.randrange(256)
        elif action == 1:
            del raw[position : position + rng.randrange(1, 40)]
        elif action == 2:
            raw[position:position] = rng.choice(
                [b"\xff", b"\x00", b'"', b"{", b"]", b",", b"\\u0000", b"\\ud800", b"\xc3("]
            )
        else:
            del raw[position:]
    return bytes(raw)


def _dumps(rng: random.Random, document: Any) -> bytes:
    """Serialise as the fuzzed document demands; NaN and lone surrogates kept."""
    text = json.dumps(document, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def fuzzed_meta(seed: int, index: int) -> tuple[str, bytes]:
    """Case ``index`` of the fuzzer seeded with ``seed``: (kind, bytes)."""
    rng = random.Random(seed * 1_000_003 + index)
    kind = rng.choices(
        [
            "v1",
            "seed",
            "chunks",
            "traversal",
            "bytes-v1",
            "bytes-seed",
            "random",
            "numbers",
            "deep",
            "huge",
        ],
        weights=[30, 15, 8, 6, 12, 8, 10, 4, 6, 5],
    )[0]
    if kind == "v1":
        return kind, _dumps(rng, _mutate_structure(rng, V1))
    if kind == "seed":
        return kind, _dumps(rng, _mutate_structure(rng, SEED_META))
    if kind == "chunks":
        return kind, _dumps(rng, _chunk_table(rng))
    if kind == "traversal":
        if rng.random() < 0.5:
            doc: Any = copy.deepcopy(V1)
            doc["image"]["object"] = rng.choice(TRAVERSAL)
        else:
            doc = copy.deepcopy(SEED_META)
            doc["internal"]["object_path"] = rng.choice(TRAVERSAL)
        return kind, _dumps(rng, doc)
    if kind == "bytes-v1":
        return kind, _damage_bytes(rng, _dumps(rng, V1))
    if kind == "bytes-seed":
        return kind, _damage_bytes(rng, _dumps(rng, SEED_META))
    if kind == "random":
        alphabet = rng.choice([None, b'{}[]":,0123456789.eE-+ truefalsn\\u\n'])
        size = rng.choice([0, 1, 2, 16, 256, 4096])
        if alphabet is None:
            return kind, rng.randbytes(size)
        return kind, bytes(rng.choice(alphabet) for _ in range(size))
    if kind == "numbers":
        # Numbers json.dumps would never write: 5,000 digits (past Python's int
        # conversion limit), huge exponents, signs and forms JSON does not allow.
        number = rng.choice(
            [b"1" * 5000, b"1e99999", b"-1e-99999", b"NaN", b"-Infinity", b"01", b"+1", b"0x7"]
        )
        text = _dumps(rng, V1 if rng.random() < 0.5 else SEED_META)
        return kind, text.replace(b": 7,", b": " + number + b",", 1).replace(
            b'"size": ', b'"size": ' + number + b"0", 1
        )
    if kind == "deep":
        return kind, _deep(rng)
    # huge: just over the limit, or just under it with a padding field
    doc = copy.deepcopy(V1 if rng.random() < 0.5 else SEED_META)
    pad = MAX_META_BYTES + rng.choice([1, 100]) - len(json.dumps(doc))
    if rng.random() < 0.5:
        pad -= 200
    doc["padding"] = "p" * pad
    return kind, _dumps(rng, doc)


def _valid_as_published(release: BuiltRelease) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(release.meta_path.read_bytes())
    return document


def test_fuzzed_metas_are_parsed_or_refused_by_name(faults: FaultReport) -> None:
    """≥10,000 fuzzed metas (seed printed): each parses or raises MetaError, nothing else."""
    print(f"\nmeta fuzzer: seed {SEED}, {PARSE_CASES} cases")
    row = faults.add(Row(fault=f"bad input: {PARSE_CASES} fuzzed metas (parse, seed {SEED})"))
    kinds: Counter[str] = Counter()
    others: list[str] = []
    start = time.perf_counter()
    for index in range(PARSE_CASES):
        kind, data = fuzzed_meta(SEED, index)
        kinds[kind] += 1
        row.tries += 1
        where = f"seed {SEED} index {index} ({kind})"
        try:
            release = parse_meta(data)
        except MetaError as exc:
            row.reported[exc.code] += 1
            if "Value error" in exc.message or "Traceback" in exc.message:
                others.append(f"{where}: unclear message: {exc.message[:200]}")
        except Exception as exc:
            # Every other exception is the failure this row counts.
            others.append(f"{where}: {type(exc).__name__}: {exc}"[:300])
        else:
            row.reported["parsed"] += 1
            # What parses is safe to use: the object name is relative, inside the release.
            assert not release.image_object.startswith("/")
            assert ".." not in release.image_object.split("/")
            assert "://" not in release.image_object
    row.seconds = time.perf_counter() - start
    row.recovered = row.tries - len(others)
    print(f"kinds: {dict(kinds)}; outcomes: {dict(row.reported)}; {row.seconds:.1f} s")
    assert others == [], "\n".join(others[:20])
    assert row.reported["meta-invalid"] > PARSE_CASES // 2
    assert row.reported["parsed"] > 0
    assert row.tries >= 10_000


@pytest.fixture(scope="module")
def signed_host(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Host, BuiltRelease, SecretKey]]:
    """An up-to-date host trusting one key; its file source's meta is replaced per case."""
    root = tmp_path_factory.mktemp("bad-input")
    (image,) = make_images(root / "images", 1)
    key = SecretKey.generate()
    release = build_release(image, root / "pub", version="1.0", serial=1, key=key)
    host = prepare_host(root / "host", release.url, installed=image)
    public = json.dumps(key.public_key().to_base64())
    text = host.config.read_text()
    host.config.write_text(text.replace("[slots]\n", f"public_keys = [{public}]\n[slots]\n", 1))
    try:
        yield host, release, key
    finally:
        host.cleanup()


def _publish(release: BuiltRelease, key: SecretKey, data: bytes) -> None:
    """Replace the meta and its signature (each file atomically, signature first)."""
    for path, content in (
        (release.meta_path.with_name(release.meta_path.name + ".minisig"), key.sign(data, "fuzz")),
        (release.meta_path, data),
    ):
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(content)
        os.replace(partial, path)


def test_fuzzed_metas_through_a_real_check(
    faults: FaultReport, signed_host: tuple[Host, BuiltRelease, SecretKey]
) -> None:
    """A seeded sample of fuzzed metas, signed and published, then checked by the real
    daemon: a verdict with a clear code each time, no flip, no traceback, daemon alive."""
    host, release, key = signed_host
    rng = random.Random(CHECK_SEED)
    picks = sorted(rng.sample(range(PARSE_CASES), CHECK_CASES))
    print(f"\nreal checks: seed {CHECK_SEED}, cases {picks} of meta seed {SEED}")
    original = release.meta_path.read_bytes()
    cases = [(f"fuzz {i}", fuzzed_meta(SEED, i)[1]) for i in picks]
    # The defect as reported: a signed meta, valid but for one field nested 1,000 deep.
    nested = b"[" * 1000 + b"]" * 1000
    cases.append(
        (
            "deep 1000",
            json.dumps(_valid_as_published(release)).encode().replace(b'"1.0"', nested, 1),
        )
    )
    cases.append(("valid", original))
    row = faults.add(Row(fault=f"bad input: fuzzed metas through a real check (seed {CHECK_SEED})"))
    unclear: list[str] = []
    start = time.perf_counter()
    with DaemonProcess(host).start() as daemon:
        # What GRUB would boot (the daemon's own start may raise organixm_floor).
        choice_before = _grub_choice(host)
        for name, data in cases:
            _publish(release, key, data)
            answer = request(
                host.socket, "POST", "/v1/check", b"{}", {"Content-Type": "application/json"}
            )
            row.tries += 1
            if answer.status != 200:
                unclear.append(f"{name}: HTTP {answer.status} {answer.body[:200]!r}")
                continue
            verdict = answer.json()["verdict"]
            row.reported[verdict["code"]] += 1
            if verdict["code"] != "meta-invalid":
                print(f"  {name}: {verdict['code']}: {verdict['message'][:160]}")
            if verdict["code"] in ("organixm-error", "internal-error") or not verdict["message"]:
                unclear.append(f"{name}: {verdict['code']}: {verdict['message']}")
            if name == "deep 1000":
                assert verdict["code"] == "meta-invalid", verdict
                assert f"nests deeper than {MAX_META_DEPTH} levels" in verdict["message"]
            if name == "valid":
                assert verdict["code"] == "up-to-date", verdict
            if _grub_choice(host) != choice_before:
                row.flips_on_bad_data += 1
                choice_before = _grub_choice(host)
        status = request(host.socket, "GET", "/v1/status")
        assert status.status == 200
        row.recovered = row.tries if row.reported["up-to-date"] >= 1 else 0
        assert daemon.stop() == 0
        row.tracebacks = count_tracebacks(daemon.output())
    row.seconds = time.perf_counter() - start
    print(f"verdicts: {dict(row.reported)}; {row.seconds:.1f} s")
    assert unclear == [], "\n".join(unclear)
    assert row.flips_on_bad_data == 0
    assert row.tracebacks == 0
    assert row.recovered == row.tries


def _grub_choice(host: Host) -> tuple[object, ...]:
    """What both copies of the GRUB env offer (order and slot states), the decision record
    and the floor aside."""
    choice: list[object] = []
    for path in (host.grubenv, host.grubenv_backup):
        state = BootControl(path, path).read()
        choice += [state.order, state.a, state.b]
    return tuple(choice)
