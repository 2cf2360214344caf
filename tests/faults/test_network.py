"""Fault rows "network: nginx" and "network: S3": the real daemon through a faulty network.

One real daemon per row sits behind :class:`~tests.support.faultproxy.FaultProxy`,
which forwards to the real nginx (HTTP source) or the real moto server (S3 source)
and breaks connections as each seeded case says: reset (RST) or clean close after
N bytes, a stall longer than ``source.timeout``, a slow link, a link that slows to
a trickle under ``source.low_speed_limit`` mid-image, refused connections, canned
500/503 answers for the first K requests, and an image object replaced while its
download is interrupted. N is drawn by a seeded RNG over the bytes of the meta and
the image, so faults land in the meta, in the image's headers and mid-image.

The host starts up to date on R0; each case publishes R1 or R2 (alternately),
sets the fault, and asks for an update (``POST /v1/update`` with ``wait``) under a
time limit. The answer must be ``source-unreachable`` (the slow link, and 5xx that
stop after K requests, install within the checks) and no flip onto data that was
not verified; then the fault is lifted and the next
update (``organixctl update --wait --json``) must stage the published release,
resuming from the checkpoint when the fault hit mid-image (nginx's access log
shows the Range request; the daemon's history says from which chunk). Each test
asserts its own zeros: flips onto bad data, stuck hosts, tracebacks in the log.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.faults.report import FaultReport, Row, count_tracebacks
from tests.support.daemon import DaemonProcess, Host, organixctl, prepare_host, request
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.images import sha256_file
from tests.support.nginx import Nginx, start_nginx
from tests.support.releases import BuiltRelease, ReleaseSet, build_release_set
from tests.support.s3 import MotoServer
from tests.test_sources import s3_client

NGINX_SEED = 20261202
S3_SEED = 20261203
#: The daemon's source.timeout in these rows: a stall must outlast it.
SOURCE_TIMEOUT = 1.5
#: No check may take longer than this to end in a verdict (a stuck host otherwise).
CHECK_LIMIT = 30.0
#: Every network fault, HTTP or S3, is this verdict (retried with backoff)...
NETWORK_CODE = "source-unreachable"
#: ... except damaged bytes, which are refused by what checks them: the HTTP parser, the
#: meta's schema, a chunk's SHA-256 or the zstd frame; and a wrong Content-Length, which
#: is a stall (too long) or a short or garbled answer (too short).
DAMAGE_CODES = {
    "garbage": {NETWORK_CODE, "source-error", "meta-invalid", "chunk-mismatch", "image-invalid"},
    "length": {NETWORK_CODE, "source-error", "meta-invalid", "chunk-mismatch", "image-invalid"},
}
#: The rows' low-speed limit (B/s over LOW_SPEED_TIME s): a trickle below it must end.
LOW_SPEED_LIMIT = 300_000
LOW_SPEED_TIME = 1.0
#: The [source] settings of both rows.
SOURCE_SETTINGS = (
    f"timeout = {SOURCE_TIMEOUT}\nlow_speed_limit = {LOW_SPEED_LIMIT}\n"
    f"low_speed_time = {LOW_SPEED_TIME}"
)


Releases = ReleaseSet


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> ReleaseSet:
    return build_release_set(tmp_path_factory.mktemp("network"))


@dataclass(frozen=True)
class Case:
    fault: Fault
    #: The image object is replaced while the fault holds (a new ETag; same bytes).
    replace: bool = False

    def describe(self) -> str:
        return self.fault.describe() + (", object replaced" if self.replace else "")


def seeded_cases(
    rng: random.Random, release: BuiltRelease, counts: dict[str, int], statuses: list[int]
) -> list[Case]:
    """The row's cases: N drawn over the meta and the image (some within the meta)."""
    meta = len(release.meta_path.read_bytes())
    image = release.meta.image
    total = meta + image.compressed_size
    # Mid-image: at least two chunks in, so the checkpoint has something to resume.
    mid = (meta + 2 * image.chunks[1].offset + 2 * 1024, total - image.chunks[-1].length)
    cases: list[Case] = []
    for kind in ("reset", "cut", "stall"):
        for n in range(counts[kind]):
            after = rng.randrange(0, meta) if n == 0 else rng.randrange(*mid)
            cases.append(Case(Fault(kind, after=after)))
    cases += [Case(Fault("refuse")) for _ in range(counts["refuse"])]
    cases += [
        Case(Fault("http", status=rng.choice(statuses), connections=k))
        for k in range(1, counts["http"] + 1)
    ]
    # About 2 s for the image (the meta goes first, on the same connection).
    rate = image.compressed_size // 2
    cases += [Case(Fault("drip", rate=rate)) for _ in range(counts["drip"])]
    # A link that slows to a trickle mid-image: bytes keep coming, under the limit.
    cases += [
        Case(Fault("drip", rate=LOW_SPEED_LIMIT // 6, after=rng.randrange(*mid)))
        for _ in range(counts["trickle"])
    ]
    cases += [
        Case(Fault("cut", after=rng.randrange(*mid)), replace=True)
        for _ in range(counts["replace"])
    ]
    cases += [
        Case(Fault("garbage", after=rng.randrange(0, meta) if n == 0 else rng.randrange(*mid)))
        for n in range(counts["garbage"])
    ]
    cases += [
        Case(Fault("length", delta=rng.choice([-1, 1]) * rng.randrange(1, 4096)))
        for _ in range(counts["length"])
    ]
    rng.shuffle(cases)
    return cases


# ---------------------------------------------------------------------------- checks


def update_now(host: Host) -> dict[str, Any]:
    """POST /v1/update with wait: the verdict, within CHECK_LIMIT (TimeoutError otherwise)."""
    answer = request(
        host.socket,
        "POST",
        "/v1/update",
        b'{"wait": true}',
        {"Content-Type": "application/json"},
        timeout=CHECK_LIMIT,
    )
    assert answer.status == 200, answer.body[:300]
    verdict: dict[str, Any] = answer.json()["verdict"]
    return verdict


def update_with_organixctl(host: Host) -> dict[str, Any]:
    """``organixctl update --wait --json``: its last line is the verdict event."""
    try:
        result = organixctl(
            "update", "--wait", "--json", socket_path=host.socket, timeout=CHECK_LIMIT
        )
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"organixctl update --wait: no verdict within {CHECK_LIMIT} s") from exc
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert lines, result.stderr
    verdict: dict[str, Any] = lines[-1]
    assert verdict["event"] == "verdict", lines[-3:]
    expected = 1 if verdict["outcome"] in ("staged", "available") else 2
    assert result.returncode == expected, (result.returncode, verdict)
    return verdict


def flipped_onto_bad_data(host: Host) -> bool:
    """Whether GRUB would boot slot b although b does not hold verified, staged bytes."""
    boot = host.boot_state()
    b = boot.b
    if not (b.state == "good" or (b.state == "trial" and b.tries_left > 0)):
        return False
    record = host.state().get("slots", {}).get("b")
    if record is None or record["status"] != "staged":
        return True
    release = record["release"]
    return bool(sha256_file(host.slots["b"], release["size"]) != release["sha256"])


def staged_problem(
    row: Row, host: Host, verdict: dict[str, Any], target: BuiltRelease
) -> str | None:
    """After the fault is lifted the update must stage ``target`` onto verified bytes; what
    went wrong otherwise (counted in ``row`` as stuck or a flip onto bad data)."""
    if (
        verdict["outcome"] != "staged"
        or verdict["code"] != "staged"
        or verdict["release"]["sha256"] != target.meta.image.sha256
    ):
        row.stuck += 1
        return f"the update after the fault did not stage: {verdict}"
    if flipped_onto_bad_data(host):
        row.flips_on_bad_data += 1
        return "staged slot b does not hold the verified release"
    return None


def installed_since(host: Host, since: datetime) -> str | None:
    """The detail of the last install recorded after ``since`` (None: no install since)."""
    installed = [h for h in host.state()["history"] if h["event"] == "installed"]
    if not installed or datetime.fromisoformat(installed[-1]["at"]) <= since:
        return None
    detail: str = installed[-1]["detail"]
    return detail


@dataclass
class Network:
    """What a row needs of its server: publish a meta, replace an image, its requests."""

    publish: Callable[[BuiltRelease], None]
    replace_image: Callable[[BuiltRelease], None]
    #: nginx's access log (None for S3, whose resumes are read from the daemon's history).
    nginx: Nginx | None = None


@dataclass
class Outcome:
    """A row's problems (empty when every case held) and how its installs went on."""

    problems: list[str] = field(default_factory=list)
    #: Installs that resumed from a checkpoint (chunk > 0) after the fault.
    resumed: int = 0
    #: Installs whose object was replaced while interrupted: started over in the same check.
    restarted: int = 0


def run_row(
    row: Row,
    host: Host,
    daemon: DaemonProcess,
    proxy: FaultProxy,
    network: Network,
    releases: Releases,
    cases: list[Case],
) -> Outcome:
    """Drive every case; returns what went wrong and how the installs went on."""
    outcome = Outcome()
    problems = outcome.problems
    for index, case in enumerate(cases):
        target = releases.target(index)
        network.publish(target)
        logged = len(network.nginx.requests()) if network.nginx else 0
        name = f"case {index} ({case.describe()}, {target.meta.version})"
        row.tries += 1
        began = datetime.now(UTC)
        proxy.set_fault(case.fault)
        started = time.monotonic()
        try:
            verdict = update_now(host)
            # 5xx for the first K requests: the server gets better on its own; the
            # host must install once it has (S3's client retries within one check).
            if case.fault.kind == "http":
                for _ in range(case.fault.connections or 1):
                    if verdict["outcome"] == "staged":
                        break
                    row.reported[verdict["code"]] += 1
                    verdict = update_now(host)
        except TimeoutError:
            row.stuck += 1
            problems.append(f"{name}: no verdict within {CHECK_LIMIT} s")
            break
        finally:
            if case.replace:
                network.replace_image(target)
            proxy.clear()
        seconds = time.monotonic() - started
        print(f"  {name}: {verdict['code']} in {seconds:.1f} s: {verdict['message'][:140]}")
        if flipped_onto_bad_data(host):
            row.flips_on_bad_data += 1
            problems.append(f"{name}: GRUB would boot slot b, which holds no verified release")
        trickle = case.fault.kind == "drip" and case.fault.rate < LOW_SPEED_LIMIT
        if verdict["outcome"] == "staged" and case.fault.kind in ("drip", "http") and not trickle:
            # A slow link, or 5xx that went away: the check itself installs.
            row.reported[f"staged ({case.fault.kind})"] += 1
            if case.fault.kind == "drip" and seconds < 1.8:
                problems.append(f"{name}: the drip did not slow the download ({seconds:.1f} s)")
        elif verdict["outcome"] != "error" or verdict["code"] not in DAMAGE_CODES.get(
            case.fault.kind, {NETWORK_CODE}
        ):
            # Counted as a problem; the recovery below still runs, so later cases start
            # from a host in a known state.
            problems.append(f"{name}: expected a network verdict, got {verdict}")
        else:
            row.reported[verdict["code"]] += 1
            if not verdict["message"]:
                problems.append(f"{name}: a verdict without a message")
            if trickle and "below source.low_speed_limit" not in verdict["message"]:
                problems.append(f"{name}: a trickle should end by the low-speed limit")
        progress = host.state().get("progress")
        resume_at = progress["chunks_done"] if progress and verdict["outcome"] == "error" else 0

        # The fault is lifted: the next update installs, from the checkpoint if any.
        if verdict["outcome"] != "staged":
            try:
                verdict = update_with_organixctl(host)
            except TimeoutError:
                row.stuck += 1
                problems.append(f"{name}: no verdict within {CHECK_LIMIT} s after the fault")
                break
        if (problem := staged_problem(row, host, verdict, target)) is not None:
            problems.append(f"{name}: {problem}")
            continue
        detail = installed_since(host, began)
        expected_resume = 0 if case.replace else resume_at
        if detail is None or not detail.endswith(f"resumed at chunk {expected_resume}"):
            problems.append(f"{name}: expected a resume at chunk {expected_resume}: {detail}")
            continue
        if case.replace and resume_at and "resume_refused" not in daemon.output():
            problems.append(f"{name}: a replaced object was not noticed on resume")
            continue
        if network.nginx is not None and expected_resume:
            offset = target.meta.image.chunks[expected_resume].offset
            if not wait_for_range(network.nginx, logged, f"bytes={offset}-"):
                problems.append(f"{name}: nginx saw no Range request from byte {offset}")
                continue
        row.recovered += 1
        outcome.resumed += 1 if expected_resume else 0
        outcome.restarted += 1 if case.replace else 0
    return outcome


def wait_for_range(server: Nginx, since: int, expected: str, timeout: float = 5.0) -> bool:
    """Whether nginx logs a request for an image with Range ``expected`` (logged at its end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = server.requests()[since:]
        if any(e.path.startswith("/fleet/images/") and e.range == expected for e in entries):
            return True
        time.sleep(0.05)
    return False


def with_source_settings(host: Host, lines: str) -> None:
    """Add ``lines`` to the host configuration's [source] section."""
    text = host.config.read_text()
    host.config.write_text(text.replace("[slots]\n", f"{lines}\n[slots]\n", 1))


def assert_row(row: Row, outcome: Outcome, daemon: DaemonProcess, replaced: int) -> None:
    assert daemon.stop() == 0
    row.tracebacks = count_tracebacks(daemon.output())
    print(
        f"verdicts: {dict(row.reported)}; resumed from a checkpoint {outcome.resumed}, "
        f"started over on a replaced object {outcome.restarted}; {row.seconds:.1f} s"
    )
    assert outcome.problems == [], "\n".join(outcome.problems)
    # Most faults land mid-image (N is drawn over the image's bytes): they must resume.
    assert outcome.resumed >= row.tries // 3, outcome
    assert outcome.restarted == replaced
    assert row.flips_on_bad_data == 0
    assert row.stuck == 0
    assert row.tracebacks == 0, daemon.output()[-3000:]
    assert row.recovered == row.tries


# ---------------------------------------------------------------------------- nginx


@pytest.fixture
def served(releases: Releases, tmp_path: Path) -> Iterator[tuple[Path, Nginx]]:
    """nginx serving fleet/ with all three images and R0's meta."""
    fleet = tmp_path / "serve" / "fleet"
    (fleet / "images").mkdir(parents=True)
    for release in (releases.r0, releases.r1, releases.r2):
        shutil.copy(release.object_path, fleet / "images" / release.object_path.name)
    shutil.copy(releases.r0.meta_path, fleet / "host.meta")
    server = start_nginx(tmp_path / "serve", tmp_path / "nginx")
    try:
        yield fleet, server
    finally:
        server.stop()


def test_nginx_network_faults(
    faults: FaultReport, releases: Releases, served: tuple[Path, Nginx], tmp_path: Path
) -> None:
    """Resets, truncations, stalls, refused connections, 5xx, a slow link and a replaced
    image between the daemon and nginx: each ends in a network verdict without a flip,
    and the next update installs, resuming with a Range request when it can."""
    fleet, server = served
    rng = random.Random(NGINX_SEED)
    counts = {
        "reset": 6,
        "cut": 6,
        "stall": 4,
        "refuse": 2,
        "http": 3,
        "drip": 1,
        "trickle": 2,
        "replace": 2,
        "garbage": 3,
        "length": 2,
    }
    cases = seeded_cases(rng, releases.r1, counts, [403, 404, 500, 503])
    print(f"\nnginx row: seed {NGINX_SEED}, {len(cases)} cases")
    mtime = [time.time() - 3600.0]

    def publish(release: BuiltRelease) -> None:
        partial = fleet / "host.meta.partial"
        partial.write_bytes(release.meta_path.read_bytes())
        # nginx's ETag is mtime and size: R1's and R2's metas have the same size.
        mtime[0] += 10
        os.utime(partial, (mtime[0], mtime[0]))
        os.replace(partial, fleet / "host.meta")

    def replace_image(release: BuiltRelease) -> None:
        path = fleet / "images" / release.object_path.name
        mtime[0] += 10
        os.utime(path, (mtime[0], mtime[0]))

    row = faults.add(Row(fault=f"network: nginx through the fault proxy (seed {NGINX_SEED})"))
    start = time.perf_counter()
    with FaultProxy("127.0.0.1", server.port) as proxy:
        host = prepare_host(
            tmp_path / "host", f"{proxy.url}/fleet/host", installed=releases.images[0]
        )
        try:
            with_source_settings(host, SOURCE_SETTINGS)
            with DaemonProcess(host).start() as daemon:
                assert host.state()["last_verdict"]["code"] == "up-to-date"
                outcome = run_row(
                    row,
                    host,
                    daemon,
                    proxy,
                    Network(publish, replace_image, nginx=server),
                    releases,
                    cases,
                )
                row.seconds = time.perf_counter() - start
                assert_row(row, outcome, daemon, counts["replace"])
        finally:
            host.cleanup()
    assert row.tries >= 20


# ---------------------------------------------------------------------------- S3


def test_s3_network_faults(
    faults: FaultReport, releases: Releases, moto: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    """The same faults between the daemon and moto's S3 server, and an image replaced
    (a new ETag) while its download was interrupted: a network verdict without a flip
    each time, and the next update installs (starting over when the object changed)."""
    client = s3_client(moto.endpoint)
    for release in (releases.r0, releases.r1, releases.r2):
        key = f"fleet/{release.meta.image.object}"
        client.put_object(Bucket=s3_bucket, Key=key, Body=release.object_path.read_bytes())
    rng = random.Random(S3_SEED)
    counts = {
        "reset": 4,
        "cut": 4,
        "stall": 3,
        "refuse": 2,
        "http": 4,
        "drip": 1,
        "trickle": 2,
        "replace": 2,
        "garbage": 3,
        "length": 2,
    }
    cases = seeded_cases(rng, releases.r1, counts, [403, 404, 500, 503])
    print(f"\nS3 row: seed {S3_SEED}, {len(cases)} cases")

    def publish(release: BuiltRelease) -> None:
        meta = release.meta_path.read_bytes()
        client.put_object(Bucket=s3_bucket, Key="fleet/host.meta", Body=meta)

    def replace_image(release: BuiltRelease) -> None:
        """Upload the same bytes again so that the ETag changes: as one part of a
        multipart upload (an ETag that is not the MD5), or, over such an object, with
        one PUT (the MD5 again)."""
        key = f"fleet/{release.meta.image.object}"
        body = release.object_path.read_bytes()
        before = client.head_object(Bucket=s3_bucket, Key=key)["ETag"]
        if "-" in before:
            client.put_object(Bucket=s3_bucket, Key=key, Body=body)
        else:
            upload = client.create_multipart_upload(Bucket=s3_bucket, Key=key)
            part = client.upload_part(
                Bucket=s3_bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=body
            )
            client.complete_multipart_upload(
                Bucket=s3_bucket,
                Key=key,
                UploadId=upload["UploadId"],
                MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
            )
        assert client.head_object(Bucket=s3_bucket, Key=key)["ETag"] != before

    publish(releases.r0)
    port = int(moto.endpoint.rsplit(":", 1)[1])
    row = faults.add(Row(fault=f"network: S3 through the fault proxy (seed {S3_SEED})"))
    start = time.perf_counter()
    env = {k: v for k, v in moto.credentials_env().items() if k != "AWS_ENDPOINT_URL"}
    with FaultProxy("127.0.0.1", port) as proxy:
        host = prepare_host(
            tmp_path / "host", f"s3://{s3_bucket}/fleet/host", installed=releases.images[0]
        )
        try:
            with_source_settings(host, f"{SOURCE_SETTINGS}\ns3_endpoint = {json.dumps(proxy.url)}")
            with DaemonProcess(host, env=env).start() as daemon:
                assert host.state()["last_verdict"]["code"] == "up-to-date"
                outcome = run_row(
                    row, host, daemon, proxy, Network(publish, replace_image), releases, cases
                )
                row.seconds = time.perf_counter() - start
                assert_row(row, outcome, daemon, counts["replace"])
        finally:
            host.cleanup()
    assert row.tries >= 15


def test_refused_port_is_really_refused() -> None:
    """The proxy's ``refuse`` fault closes its listener: a connect gets ECONNREFUSED."""
    with socket.socket() as upstream:
        upstream.bind(("127.0.0.1", 0))
        upstream.listen()
        with FaultProxy("127.0.0.1", upstream.getsockname()[1]) as proxy:
            proxy.set_fault(Fault("refuse"))
            with (
                pytest.raises(ConnectionRefusedError),
                socket.create_connection(("127.0.0.1", proxy.port), timeout=2),
            ):
                pass
            proxy.clear()
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=2):
                pass
