"""Fault row "crash": ``kill -9`` of the real daemon at seeded moments, then a restart.

One host (two file-backed slots, a GRUB environment, a state directory) and one nginx
serve the whole row. Each try publishes what the moment needs, lets the real daemon run
into it and sends SIGKILL there:

- during the meta fetch: the throttling proxy in front of nginx
  (:class:`~tests.support.throttle.Throttle`) sends the meta slowly; killed a seeded
  delay after ``POST /v1/update`` while status still says ``checking``;
- mid-download, decompress and write: the proxy sends the image at a steady rate; killed
  once status reports more than a seeded number of bytes written;
- during the read-back: the daemon runs under ``strace``, which delays every ``preadv2``
  (only device hashing uses it); killed a seeded moment into the ``verifying`` phase;
- during a state-file or GRUB-environment write: under ``strace``, every rename is held
  for a moment before it enters the kernel, so the temporary file a write leaves
  (``.state.json.*``, ``.grubenv.*``, ``.grubenv.bak.*``) is whole and waits beside its
  target; the test reads it, and kills when it is the write the moment names (checkpoint,
  install start, the record after the flip; the invalidation of the slot about to be
  written, the flip; the commit; the mark-bad), before the primary's rename or between
  the primary's and the backup's;
- during ``mark-good`` and ``mark-bad`` of a trial boot (after :meth:`Host.reboot`), at
  the same three writes.

After each kill the environment must not point (good, or trial with tries left, in
either copy) at a slot whose bytes are not a whole published image, and the booted
slot's bytes are what they were. The daemon is restarted on the same directory and must
send ``READY=1``; while it rewrites a slot no copy of the environment may call that slot
bootable; its status must be coherent; its boot-time check must stage the release again,
resuming at the checkpoint the killed run left; an interrupted mark-good or mark-bad
completes when run again; and no temporary file of a killed write is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from organixmd.base.errors import BootError
from organixmd.boot import grubenv
from organixmd.boot.machine import BootState, state_from_env
from organixmd.release.meta import MetaV1
from tests.faults.report import FaultReport, Row, count_tracebacks
from tests.support.daemon import (
    DaemonProcess,
    Host,
    RawAnswer,
    prepare_host,
    request,
    strace_delaying,
)
from tests.support.images import make_ext4_image
from tests.support.nginx import start_nginx
from tests.support.releases import BuiltRelease, build_release
from tests.support.throttle import Throttle
from tests.test_sdnotify import NotifyListener

SEED = 20261202
MiB = 1024 * 1024
IMAGE_SIZE = 8 * MiB
CHUNK = 256 * 1024
#: Seconds a whole image download takes through the throttling proxy.
DOWNLOAD_SECONDS = 0.9
#: Seconds a meta fetch takes when the moment is the meta fetch.
META_SECONDS = 2.5
RENAME_DELAY = 0.15
#: Longer than the rename delay: a checkpoint held at its rename must not be followed
#: at once by the next one (every chunk would then wait for a state write).
CHECKPOINT_INTERVAL = 0.3
READ_DELAY = 0.15
STRACE = strace_delaying({"rename,renameat,renameat2": RENAME_DELAY, "preadv2": READ_DELAY})
WAIT = 60.0
#: What :func:`tempfile.mkstemp` adds to the prefix ``.<target name>.``.
TEMPORARY = re.compile(r"^[a-z0-9_]{8}$")

#: Moments of the install path (booted slot a, installing into b), and of the trial boot.
INSTALL_MOMENTS = [
    *["meta"] * 6,
    *["download"] * 22,
    *["readback"] * 4,
    *("state:install-started", "state:checkpoint", "state:staged") * 2,
    *("env:invalidate:primary", "env:invalidate:backup", "env:flip:primary", "env:flip:backup"),
]
TRIAL_MOMENTS = [
    *("good:primary", "good:backup", "good:state", "good:state"),
    *("bad:primary", "bad:backup", "bad:state", "bad:state"),
]


def digest(path: Path, size: int = IMAGE_SIZE) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read(size)).hexdigest()


def post(host: Host, path: str, body: bytes = b"{}") -> RawAnswer:
    return request(host.socket, "POST", path, body, {"Content-Type": "application/json"})


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


def env_copies(host: Host) -> dict[str, BootState]:
    """The copies of the environment GRUB can read, by name."""
    copies = {}
    for name, path in (("primary", host.grubenv), ("backup", host.grubenv_backup)):
        try:
            copies[name] = state_from_env(grubenv.read(path), source=str(path))
        except BootError:
            continue
    return copies


def bootable(state: BootState, slot: str) -> bool:
    entry = state.slot(slot)  # type: ignore[arg-type]
    return entry.state == "good" or (entry.state == "trial" and entry.tries_left > 0)


def temporaries(host: Host) -> set[Path]:
    """Files a killed atomic write may leave: ``.<name>.XXXXXXXX`` beside its target."""
    found = set()
    for target in (host.grubenv, host.grubenv_backup, host.state_dir / "state.json"):
        if target.parent.is_dir():
            for entry in target.parent.iterdir():
                rest = entry.name.removeprefix(f".{target.name}.")
                if rest != entry.name and TEMPORARY.match(rest):
                    found.add(entry)
    return found


@dataclass
class World:
    host: Host
    proxy: Throttle
    releases: list[BuiltRelease]
    image_rate: float
    meta_rate: float
    rng: random.Random
    row: Row
    serial: int = 10
    published: MetaV1 | None = None
    plain: DaemonProcess | None = None
    #: systemd's end of the plain daemon's NOTIFY_SOCKET, open while it runs.
    listener: NotifyListener | None = None
    #: The daemon under strace that the try is about to kill.
    victim: DaemonProcess | None = None
    starts: int = 0
    checks_while_writing: int = 0
    moments: Counter[str] = field(default_factory=Counter)

    @property
    def images(self) -> dict[str, str]:
        return {r.meta.image.sha256: r.image_path.name for r in self.releases}

    def booted(self) -> str:
        text = self.host.cmdline.read_text()
        return text.split("organixm.slot=", 1)[1].split()[0]

    def publish(self) -> MetaV1:
        """A new serial of an image neither slot holds; the meta replaced atomically."""
        held = {digest(self.host.slots["a"]), digest(self.host.slots["b"])}
        base = next(r for r in self.releases if r.meta.image.sha256 not in held)
        self.serial += 1
        meta = base.meta.model_copy(
            update={"serial": self.serial, "version": f"1.{self.serial}", "uuid": uuid.uuid4()}
        )
        path = self.releases[0].meta_path
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(meta.to_json())
        os.replace(partial, path)
        self.published = meta
        return meta

    # ------------------------------------------------------------------ checks

    def assert_safe(self, where: str, booted_digest: str) -> None:
        """GRUB is pointed only at whole images; the booted slot is untouched."""
        copies = env_copies(self.host)
        if not copies:
            raise AssertionError(f"{where}: no readable copy of the GRUB environment")
        for name, state in copies.items():
            for slot in ("a", "b"):
                if bootable(state, slot) and digest(self.host.slots[slot]) not in self.images:
                    self.row.flips_on_bad_data += 1
                    raise AssertionError(
                        f"{where}: the {name} environment lets GRUB boot slot {slot}, "
                        f"which holds no whole image: {state}"
                    )
        if digest(self.host.slots[self.booted()]) != booted_digest:
            raise AssertionError(f"{where}: the booted slot {self.booted()} was written")

    # ------------------------------------------------------------------ daemons

    def stop_plain(self) -> None:
        if self.plain is not None:
            assert self.plain.stop() == 0, self.plain.output()[-3000:]
            self.plain = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def start_victim(self) -> DaemonProcess:
        self.stop_plain()
        victim = DaemonProcess(self.host, prefix=STRACE)
        self.starts += 1
        return victim.start(wait=False)

    def recover(self, where: str, writing: str | None, settled: bool = True) -> dict[str, Any]:
        """Restart on the same directory; READY=1 must come, and while ``writing`` is
        being rewritten no copy of the environment may call it bootable."""
        self.starts += 1
        path = self.host.socket_dir / f"notify-{self.starts}"
        if self.listener is not None:
            self.listener.close()  # the killed daemon's
        listener = NotifyListener(path, self.host)
        daemon = DaemonProcess(self.host, env={"NOTIFY_SOCKET": str(path)})
        self.plain, self.listener = daemon, listener
        # Twice the victims' rate: slow enough to be watched while it writes.
        self.proxy.rate = self.image_rate * 2
        daemon.start(wait=False)
        daemon.wait_socket(WAIT)
        deadline = time.monotonic() + WAIT
        while not listener.with_key("READY"):
            if time.monotonic() > deadline:
                self.row.stuck += 1
                raise AssertionError(f"{where}: no READY=1 within {WAIT}s after the restart")
            phase = request(self.host.socket, "GET", "/v1/status").json()["phase"]
            if writing is not None and phase == "downloading":
                self.checks_while_writing += 1
                for name, state in env_copies(self.host).items():
                    if bootable(state, writing):
                        self.row.flips_on_bad_data += 1
                        raise AssertionError(
                            f"{where}: slot {writing} is being written while the {name} "
                            f"environment lets GRUB boot it: {state}"
                        )
            time.sleep(0.02)
        self.proxy.rate = self.image_rate
        status: dict[str, Any] = request(self.host.socket, "GET", "/v1/status").json()
        self.assert_coherent(where, status, settled)
        return status

    def assert_coherent(self, where: str, status: dict[str, Any], settled: bool = True) -> None:
        """Status agrees with GRUB and the files; ``settled``: no interrupted command is
        still to be run again (until then, the two env copies may differ)."""
        booted = self.booted()
        problems = []
        if not status["daemon"]["ready"]:
            problems.append("status says not ready after READY=1")
        if status["phase"] not in ("idle", "staged"):
            problems.append(f"phase {status['phase']} with nothing running")
        if status["boot"]["booted"] != booted:
            problems.append(f"booted {status['boot']['booted']}, the kernel says {booted}")
        verdict = status["verdict"]
        if verdict is None or verdict["code"] in ("organixm-error", "internal-error"):
            problems.append(f"verdict {verdict}")
        copies = env_copies(self.host)
        if set(copies) != {"primary", "backup"}:
            problems.append(f"only {sorted(copies)} of the environment copies are readable")
        elif settled and self.host.grubenv.read_bytes() != self.host.grubenv_backup.read_bytes():
            problems.append(f"the two environment copies differ: {copies}")
        failed = {r["release"]["uuid"] for r in self.host.state().get("failed", [])}
        for slot, shown in status["slots"].items():
            if (
                shown["status"] == "staged"
                and shown["release"]["uuid"] not in failed
                and shown["state"] not in ("trial", "good")
            ):
                problems.append(f"slot {slot} shown staged while GRUB has it {shown['state']}")
        running = status["slots"][booted]
        if running["state"] not in ("good", "trial") and (
            running["release"] is None or running["release"]["uuid"] not in failed
        ):
            # Bad only once marked bad, and then its release is remembered as failed.
            problems.append(f"the booted slot {booted} is {running['state']}: {running}")
        left = temporaries(self.host)
        if left:
            problems.append(
                f"temporary files of killed writes left: {sorted(p.name for p in left)}"
            )
        if problems:
            raise AssertionError(f"{where}: " + "; ".join(problems))


# ---------------------------------------------------------------------- kill moments


def wait_for_temporary(
    world: World,
    victim: DaemonProcess,
    which: str,
    matches: Callable[[Any], bool],
    before: set[Path],
) -> Any:
    """Wait until a write's temporary file (``which``: primary, backup or state) is whole
    and ``matches`` its content (a BootState, or the state as JSON); returns the content."""
    host = world.host
    names = {
        "primary": (host.grubenv.parent, f".{host.grubenv.name}."),
        "backup": (host.grubenv_backup.parent, f".{host.grubenv_backup.name}."),
        "state": (host.state_dir, ".state.json."),
    }
    directory, prefix = names[which]
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        victim._check_alive()
        if directory.is_dir():
            for entry in directory.iterdir():
                rest = entry.name.removeprefix(prefix)
                if entry in before or rest == entry.name or not TEMPORARY.match(rest):
                    continue
                with contextlib.suppress(OSError, ValueError, BootError):
                    data = entry.read_bytes()
                    if which == "state":
                        content: Any = json.loads(data)
                    elif len(data) == grubenv.BLOCK_SIZE:
                        content = state_from_env(grubenv.parse(data))
                    else:
                        continue
                    if matches(content):
                        return content
        time.sleep(0.003)
    raise AssertionError(f"no {which} write of the awaited kind within {WAIT}s")


def state_matcher(moment: str, release: MetaV1, target: str) -> Callable[[Any], bool]:
    uid = str(release.uuid)

    def progress(state: Any) -> dict[str, Any] | None:
        found = state.get("progress")
        return found if found and found["release"]["uuid"] == uid else None

    if moment == "state:install-started":
        return lambda s: (p := progress(s)) is not None and p["chunks_done"] == 0
    if moment == "state:checkpoint":
        return lambda s: (p := progress(s)) is not None and p["chunks_done"] > 0
    assert moment == "state:staged", moment
    return lambda s: (
        s["slots"].get(target, {}).get("status") == "staged"
        and s["slots"][target]["release"]["uuid"] == uid
    )


def kill_install(world: World, moment: str, release: MetaV1, target: str) -> str:
    """Run the install of ``release`` into ``target`` into ``moment``, kill; what it was."""
    host, rng = world.host, world.rng
    before = temporaries(host)
    if moment in ("meta", "download"):
        victim = world.plain
        assert victim is not None, "a running daemon gets the update"
        world.plain = None
        if moment == "meta":
            world.proxy.rate = world.meta_rate
        state_before = (host.state_dir / "state.json").read_bytes()
        answer = post(host, "/v1/update")
        assert answer.status == 202, answer.body
        if moment == "meta":
            delay = rng.uniform(0.2, META_SECONDS * 0.7)
            time.sleep(delay)
            phase = request(host.socket, "GET", "/v1/status").json()["phase"]
            victim.kill9()
            world.proxy.rate = world.image_rate
            assert phase == "checking", f"meta moment: phase {phase} at the kill"
            # Killed mid-fetch: nothing was decided, so nothing was written.
            assert (host.state_dir / "state.json").read_bytes() == state_before
            return f"meta +{delay:.2f}s"
        # A seeded byte of the compressed stream (the free space at the image's end
        # compresses to almost nothing); killed once the chunk holding it is written.
        chunks = release.image.chunks
        byte = rng.randrange(chunks[0].length, int(release.image.compressed_size * 0.8))
        index = next(i for i, c in enumerate(chunks) if c.offset + c.length > byte)
        offset = index * release.image.chunk_size
        deadline = time.monotonic() + WAIT
        started = False
        while True:
            status = request(host.socket, "GET", "/v1/status").json()
            done = (status["progress"] or {}).get("bytes_done", 0)
            if status["phase"] == "downloading" and done >= offset:
                victim.kill9()
                return f"download: compressed byte {byte}, {done} of {IMAGE_SIZE} written"
            # The update task may not have begun at the first look.
            running = status["phase"] in ("checking", "downloading")
            assert running or not started, f"the install ended before byte {offset}: {status}"
            started = started or running
            assert time.monotonic() < deadline, "download did not pass its offset"
            time.sleep(0.01)
    # Only a checkpoint needs a slow stream; the other moments come before or after it.
    world.proxy.rate = world.image_rate if moment == "state:checkpoint" else None
    victim = world.victim = world.start_victim()
    pid = victim.daemon_pid()
    if moment == "readback":
        victim.wait_socket(WAIT)
        deadline = time.monotonic() + WAIT
        while request(host.socket, "GET", "/v1/status").json()["phase"] != "verifying":
            assert time.monotonic() < deadline, "no read-back"
            time.sleep(0.005)
        # The read-back takes two held reads; the phase stays "verifying" through the flip.
        delay = rng.uniform(0.0, READ_DELAY)
        time.sleep(delay)
        victim.kill9(pid)
        flipped = [name for name, state in env_copies(host).items() if bootable(state, target)]
        assert not flipped, f"killed after the read-back: {flipped} call slot {target} bootable"
        assert not temporaries(host) - before, "killed after the read-back, during the flip"
        return f"read-back +{delay:.2f}s"
    if moment.startswith("state:"):
        wait_for_temporary(world, victim, "state", state_matcher(moment, release, target), before)
        victim.kill9(pid)
        return moment
    _, kind, copy = moment.split(":")
    want = "bad" if kind == "invalidate" else "trial"
    wait_for_temporary(world, victim, copy, lambda s: s.slot(target).state == want, before)
    victim.kill9(pid)
    return moment


def install_try(world: World, moment: str) -> None:
    host, row = world.host, world.row
    booted = world.booted()
    target = other(booted)
    booted_digest = digest(host.slots[booted])
    release = world.publish()
    what = kill_install(world, moment, release, target)
    world.moments[moment.split(":")[0]] += 1
    where = f"try {row.tries + 1} ({what})"
    row.tries += 1
    world.assert_safe(f"{where}, after the kill", booted_digest)
    saved = host.state().get("progress")
    resume = saved["chunks_done"] if saved and saved["release"]["uuid"] == str(release.uuid) else 0
    status = world.recover(where, writing=target)
    verdict = status["verdict"]
    row.reported[verdict["code"]] += 1
    if verdict["code"] != "staged" or verdict["release"]["uuid"] != str(release.uuid):
        row.stuck += 1
        raise AssertionError(f"{where}: the boot-time check did not stage the release: {verdict}")
    installed = [e for e in host.state()["history"] if e["event"] == "installed"]
    if not installed[-1]["detail"].endswith(f"resumed at chunk {resume}"):
        raise AssertionError(f"{where}: expected a resume at chunk {resume}: {installed[-1]}")
    if status["boot"]["next_slot"] != target or digest(host.slots[target]) != release.image.sha256:
        raise AssertionError(f"{where}: slot {target} is not next with the release: {status}")
    world.assert_safe(f"{where}, after the restart", booted_digest)
    row.recovered += 1


def trial_try(world: World, moment: str) -> None:
    """Kill during mark-good or mark-bad of a trial boot; rerun it after the restart."""
    host, row = world.host, world.row
    if world.plain is None:
        world.plain = DaemonProcess(host).start()
    booted = world.booted()
    copies = env_copies(host)
    if not bootable(copies["primary"], other(booted)) or copies["primary"].next_slot == booted:
        world.publish()
        verdict = post(host, "/v1/update", b'{"wait": true}').json()["verdict"]
        assert verdict["code"] == "staged", verdict
    release = world.published
    assert release is not None
    world.stop_plain()
    host.reboot()
    booted = world.booted()
    assert env_copies(host)["primary"].slot(booted).state == "trial"  # type: ignore[arg-type]
    booted_digest = digest(host.slots[booted])
    before = temporaries(host)
    victim = world.victim = world.start_victim()
    pid = victim.daemon_pid()
    victim.wait_socket(WAIT)
    victim.wait_ready(WAIT)
    op, copy = moment.split(":")
    path = "/v1/mark-good" if op == "good" else "/v1/mark-bad"
    body = b"{}" if op == "good" else b'{"reason": "crash row"}'

    def call() -> None:
        with contextlib.suppress(OSError):
            post(host, path, body)

    caller = threading.Thread(target=call)
    caller.start()
    uid = str(release.uuid)
    want = "good" if op == "good" else "bad"

    def matches(content: Any) -> bool:
        if copy != "state":
            return bool(content.slot(booted).state == want)
        if op == "good":
            return bool(content["slots"].get(booted, {}).get("status") == "installed")
        return uid in {f["release"]["uuid"] for f in content["failed"]}

    wait_for_temporary(world, victim, copy, matches, before)
    victim.kill9(pid)
    caller.join(30)
    where = f"try {row.tries + 1} (mark-{op} {copy})"
    world.moments[f"mark-{op}"] += 1
    row.tries += 1
    world.assert_safe(f"{where}, after the kill", booted_digest)
    world.recover(where, writing=None, settled=False)
    # organixm-mark-good/-bad run again (the admin, or the unit's retry).
    answer = post(host, path, body)
    state = host.state()
    primary = env_copies(host)["primary"]
    if op == "good":
        done = (
            answer.status == 200
            and primary.slot(booted).state == "good"  # type: ignore[arg-type]
            and state["slots"][booted]["status"] == "installed"
        )
    else:
        done = (
            answer.status == 200
            and primary.slot(booted).state == "bad"  # type: ignore[arg-type]
            and uid in {f["release"]["uuid"] for f in state["failed"]}
        )
    if not done:
        row.stuck += 1
        raise AssertionError(
            f"{where}: mark-{op} did not complete after the restart: HTTP {answer.status} "
            f"{answer.body[:300]!r}; GRUB {primary}; state slots {state['slots']}, "
            f"failed {[f['release']['version'] for f in state['failed']]}"
        )
    world.assert_coherent(where, request(host.socket, "GET", "/v1/status").json())
    if op == "good":
        row.reported["committed"] += 1
    else:
        # GRUB boots the good slot; the failed release is never installed again.
        world.stop_plain()
        host.reboot()
        status = world.recover(f"{where}, after the reboot", writing=None)
        row.reported[status["verdict"]["code"]] += 1
        if status["verdict"]["code"] != "release-failed-before":
            raise AssertionError(f"{where}: after the reboot: {status['verdict']}")
    world.assert_safe(f"{where}, after the restart", digest(host.slots[world.booted()]))
    row.recovered += 1


def test_kill9_at_seeded_moments(faults: FaultReport, tmp_path: Path) -> None:
    """≥50 seeded kill -9 moments (meta, download, read-back, state and GRUB env writes,
    mark-good, mark-bad): GRUB never points at an unverified slot, the booted slot is not
    written, the restart sends READY, and the install or the commit completes."""
    start = time.perf_counter()
    rng = random.Random(SEED)
    install_moments = list(INSTALL_MOMENTS)
    rng.shuffle(install_moments)
    # The first install has no staged slot to invalidate.
    install_moments.remove("download")
    install_moments.insert(0, "download")
    trial_moments = list(TRIAL_MOMENTS)
    rng.shuffle(trial_moments)
    print(f"\ncrash row: seed {SEED}: {install_moments} then {trial_moments}")

    images = [
        make_ext4_image(tmp_path / f"root-{n}.img", IMAGE_SIZE, payload_bytes=4 * MiB, seed=n)
        for n in (1, 2, 3)
    ]
    pub = tmp_path / "pub" / "fleet"
    releases = [
        build_release(image, pub, serial=n + 1, chunk_size=CHUNK) for n, image in enumerate(images)
    ]
    # The first release is what slot a runs: it is published first, and identified.
    releases[0].meta_path.write_bytes(releases[0].meta.to_json())
    compressed = max(r.meta.image.compressed_size for r in releases)
    image_rate = compressed / DOWNLOAD_SECONDS
    meta_rate = len(releases[0].meta.to_json()) / META_SECONDS
    nginx = start_nginx(pub.parent, tmp_path / "nginx")
    proxy = Throttle(nginx.port)
    proxy.rate = image_rate
    host = prepare_host(tmp_path / "host", f"{proxy.url}/fleet/host", installed=images[0])
    config = host.config.read_text()
    assert "checkpoint_interval = 0.2\n" in config
    host.config.write_text(
        config.replace("checkpoint_interval = 0.2", f"checkpoint_interval = {CHECKPOINT_INTERVAL}")
    )
    row = faults.add(Row(fault=f"crash: kill -9 at seeded moments (seed {SEED})"))
    world = World(host, proxy, releases, image_rate, meta_rate, rng, row)
    try:
        # Up to date at the start: slot a is identified as the first release.
        world.plain = DaemonProcess(host).start()
        for moment in install_moments:
            install_try(world, moment)
        for moment in trial_moments:
            trial_try(world, moment)
        world.stop_plain()
    finally:
        for daemon in (world.plain, world.victim):
            if daemon is not None:
                daemon.__exit__()
        if world.listener is not None:
            world.listener.close()
        proxy.close()
        nginx.stop()
        host.cleanup()
        row.tracebacks = sum(
            count_tracebacks(log.read_text(errors="replace"))
            for log in host.root.glob("organixmd-*.log")
        )
        row.seconds = time.perf_counter() - start
    print(
        f"{row.tries} kills ({dict(world.moments)}), {row.recovered} recovered, "
        f"{world.starts} daemon starts, "
        f"{world.checks_while_writing} environment checks while a slot was rewritten; "
        f"{dict(row.reported)}; {row.seconds:.1f} s"
    )
    assert row.tries >= 50
    assert row.recovered == row.tries
    assert row.flips_on_bad_data == 0
    assert row.stuck == 0
    assert row.tracebacks == 0
    assert world.checks_while_writing > 0
    assert row.reported == Counter(
        {"staged": len(install_moments), "committed": 4, "release-failed-before": 4}
    )
