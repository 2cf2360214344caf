"""The update engine: one check ends in one verdict, and maybe one verified install.

Policy lives here; every outside system (the release source, the slot devices,
GRUB's environment, the state file) sits behind a small adapter. A check:

1. fetches the meta (conditionally: an unchanged meta costs one small request),
   its signature, and validates both before anything else happens;
2. decides: up to date, blocked (with a reason code), or available — and if
   available, whether it may be installed now (booted slot committed, rollout
   percentage, slot safety);
3. installs into the other slot through :class:`~organixmd.install.pipeline.Installer`,
   resuming a checkpointed install of the same release, verifies the slot by
   reading it back, and only then asks boot control to flip (invariant 2).

Every outcome is one :class:`~organixmd.host.state.Verdict`, kept in the state file,
logged once, and shown by status.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from uuid import uuid4

import structlog

from organixmd.apidef import Outcome, VerdictCode
from organixmd.base.config import InstallConfig, SlotsConfig
from organixmd.base.errors import (
    BootError,
    Busy,
    Cancelled,
    InternalError,
    OrganixmError,
    PolicyError,
    SignatureError,
    SlotError,
    SourceChanged,
    SourceError,
)
from organixmd.base.logsetup import get_logger
from organixmd.base.slotname import SlotName, other
from organixmd.boot.machine import BootState
from organixmd.host import policy
from organixmd.host.state import (
    Checkpoint,
    ReleaseRef,
    SlotRecord,
    State,
    StateKeeper,
    Verdict,
    utcnow,
)
from organixmd.install.blockio import hash_device
from organixmd.install.slots import booted_slot, check_target, slot_paths
from organixmd.release.meta import Release
from organixmd.release.sources import Source
from organixmd.release.trust import fetch_release

if TYPE_CHECKING:
    # The idle daemon never needs these: the install pipeline (zstandard) is imported
    # at the first install, minisign (cryptography) only when keys are configured.
    from organixmd.install.delta import DeltaInstaller, LocalSlot
    from organixmd.install.pipeline import Installer, InstallResult, Progress
    from organixmd.release import minisign


class Phase(StrEnum):
    IDLE = "idle"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    WAITING_REBOOT = "waiting-reboot"
    ERROR = "error"


class BootPort(Protocol):
    """What the engine needs from boot control (GRUB's environment)."""

    def read(self) -> BootState:
        """The environment's state (raises BootError when no copy is readable)."""

    def raise_floor(self, booted: SlotName, serial: int) -> None:
        """Raise the floor to ``serial`` if ``booted`` is committed (never lowers it)."""

    def stage(self, target: SlotName, tries: int) -> None:
        """Make ``target`` boot next, on trial with ``tries`` tries. One env write."""

    def invalidate(self, target: SlotName) -> None:
        """Mark ``target`` bad before it is overwritten (a half-written slot is never good)."""


EventSink = Callable[[str, dict[str, Any]], None]


@dataclass
class Counters:
    """Process-lifetime counters for /metrics."""

    checks: dict[str, int] = field(default_factory=dict)
    bytes_downloaded: int = 0
    #: Bytes of images copied from this host's own slots (delta installs).
    bytes_reused: int = 0
    installs: int = 0
    last_install_seconds: float | None = None
    #: Of the last install: the stream alone, before the read-back.
    last_stream_seconds: float | None = None


def release_ref(release: Release) -> ReleaseRef:
    return ReleaseRef(
        version=release.version,
        serial=release.serial,
        uuid=release.uuid,
        sha256=release.sha256,
        size=release.size,
        legacy=release.legacy,
    )


def read_host_id(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or socket.gethostname()


class Engine:
    """Checks for releases and installs them. One operation at a time.

    Orchestration only: the decision is :func:`organixmd.host.policy.decide`'s, the
    state is the shared :class:`~organixmd.host.state.StateKeeper`'s, the release comes
    through :func:`organixmd.release.trust.fetch_release`, the bytes through the install
    pipeline, and the flip through the boot port.
    """

    def __init__(
        self,
        *,
        slots: SlotsConfig,
        install: InstallConfig,
        trial_boots: int,
        host_id: str,
        keeper: StateKeeper,
        boot: BootPort,
        public_keys: list[minisign.PublicKey],
        source_factory: Callable[[], Source],
        on_event: EventSink,
    ) -> None:
        self.slots_config = slots
        self.install_config = install
        self.trial_boots = trial_boots
        self.host_id = host_id
        self.keeper = keeper
        self.boot = boot
        self.public_keys = public_keys
        self.on_event = on_event
        self._source_factory = source_factory
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[Any] | None = None
        self._cancel_requested = False
        self._identified: set[tuple[SlotName, str]] = set()
        self.phase = Phase.IDLE
        #: The running install's progress (``None`` between installs).
        self.progress: Progress | None = None
        self.current: ReleaseRef | None = None
        self.last_error: OrganixmError | None = None
        self.counters = Counters()
        self.log = get_logger("organixmd.engine")
        self.slots = slot_paths(slots)

    # ------------------------------------------------------------------ helpers

    @property
    def state(self) -> State:
        """The host's state, held by the keeper."""
        return self.keeper.state

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def request_cancel(self) -> bool:
        """Cancel the running check or install; its verdict says ``cancelled``.

        Returns whether anything was running. Safe to call at any time.
        """
        if self._task is None or self._task.done():
            return False
        self._cancel_requested = True
        self._task.cancel()
        return True

    def booted(self) -> SlotName | None:
        return booted_slot(self.slots_config.cmdline)

    def _emit(self, kind: str, **fields: Any) -> None:
        self.on_event(kind, fields)

    def _set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self._emit("phase", phase=phase.value)

    async def _conclude(self, verdict: Verdict, *, keep_etag: str | None = None) -> Verdict:
        self.counters.checks[verdict.outcome] = self.counters.checks.get(verdict.outcome, 0) + 1
        self.state.last_check = verdict.at
        self.state.last_verdict = verdict
        self.state.meta_etag = keep_etag
        unwritable = await self.keeper.try_persist()
        if unwritable is not None:
            # The verdict cannot be kept: the check ends in the state error itself (kept
            # in memory for status; the next check writes the state again).
            if verdict.code != unwritable.code:
                verdict = self._verdict(
                    Outcome.ERROR,
                    unwritable.code,
                    f"{unwritable}; this check's own verdict ({verdict.code}: "
                    f"{verdict.message}) could not be kept",
                    verdict.release,
                )
            self.state.last_verdict = verdict
            self.state.meta_etag = None
            self.last_error = unwritable
            self._set_phase(Phase.ERROR)
        release = verdict.release
        self.log.info(
            "check_done",
            outcome=verdict.outcome,
            code=verdict.code,
            verdict=verdict.message,
            version=release.version if release else None,
            serial=release.serial if release else None,
        )
        self._emit("verdict", **verdict.model_dump(mode="json"))
        return verdict

    async def _fail(self, exc: OrganixmError) -> Verdict:
        self.last_error = exc
        self._set_phase(Phase.ERROR)
        outcome = (
            Outcome.BLOCKED if isinstance(exc, PolicyError | SignatureError) else Outcome.ERROR
        )
        return await self._conclude(self._verdict(outcome, exc.code, str(exc), self.current))

    @staticmethod
    def _verdict(
        outcome: Outcome, code: str, message: str, release: ReleaseRef | None = None
    ) -> Verdict:
        return Verdict(outcome=outcome, code=code, message=message, release=release, at=utcnow())

    # ------------------------------------------------------------------ the check

    async def check(self, *, install: bool = True, force: bool = False) -> Verdict:
        """Run one check (and install, if allowed). Raises Busy if one is running."""
        if self._lock.locked():
            raise Busy("a check or install is already running")
        # Every log line of this check carries its id (structlog contextvars).
        with structlog.contextvars.bound_contextvars(check_id=uuid4().hex[:12]):
            return await self._check_locked(install=install, force=force)

    async def _check_locked(self, *, install: bool, force: bool) -> Verdict:
        async with self._lock:
            self._cancel_requested = False
            self._set_phase(Phase.CHECKING)
            # The check runs in a task of its own, which an admin's cancel targets: the
            # caller (an HTTP handler, the poll loop) is never cancelled by it, so it
            # always gets the verdict. Cancelling the caller (shutdown) cancels this too.
            inner = asyncio.create_task(self._check(install=install, force=force))
            self._task = inner
            try:
                verdict = await inner
            except asyncio.CancelledError:
                caller = asyncio.current_task()
                if not self._cancel_requested or caller is None or caller.cancelling():
                    # Shutdown: a running install saved its checkpoint; the next start resumes.
                    self._set_phase(Phase.IDLE)
                    self.progress = None
                    raise
                # An admin's cancel ends this check (at any phase), not the daemon.
                what = self.current.version if self.current else "the check"
                return await self._fail(
                    Cancelled(f"{what}: cancelled by an admin; the next check resumes")
                )
            except OrganixmError as exc:
                return await self._fail(exc)
            except Exception as exc:
                # A bug, not an outcome: log it with its traceback and still end the
                # check with a verdict, so status and waiting clients learn of it.
                self.log.exception("check_crashed")
                return await self._fail(
                    InternalError(f"internal error during the check: {type(exc).__name__}: {exc}")
                )
            finally:
                self.progress = None
                self._task = None
            if verdict.outcome == "staged":
                self._set_phase(Phase.STAGED)
            elif self.phase is not Phase.ERROR:
                self._set_phase(Phase.IDLE)
            return verdict

    async def _check(self, *, install: bool, force: bool) -> Verdict:
        self.current = None
        booted = self.booted()
        last = self.state.last_verdict
        # A conditional request only when the last answer depended on the meta alone.
        reuse_etag = (
            self.state.meta_etag
            if not force and last is not None and last.outcome in ("up-to-date", "blocked")
            else None
        )
        async with self._source_factory() as source:
            trusted = await fetch_release(source, self.public_keys, if_none_match=reuse_etag)
            if trusted is None:
                assert last is not None  # noqa: S101 - reuse_etag is set only after a verdict
                message = last.message.removeprefix("meta unchanged: ")
                verdict = self._verdict(
                    last.outcome, last.code, f"meta unchanged: {message}", last.release
                )
                return await self._conclude(verdict, keep_etag=reuse_etag)
            release = trusted.release
            ref = release_ref(release)
            self.current = ref
            decision = policy.decide(await self._facts(release, ref, booted, force))
            if not decision.installs or not install:
                return await self._conclude(
                    self._verdict(decision.outcome, decision.code, decision.message, ref),
                    keep_etag=trusted.etag if decision.meta_only else None,
                )
            assert booted is not None  # noqa: S101 - the policy refuses an unknown booted slot
            self.log.info(
                "update_found", version=release.version, serial=release.serial, target=other(booted)
            )
            return await self._install(source, release, ref, other(booted))

    async def _facts(
        self, release: Release, ref: ReleaseRef, booted: SlotName | None, force: bool
    ) -> policy.Facts:
        """What the policy looks at: gathered here, so that deciding is pure."""
        if booted is not None:
            await self._identify_booted(booted, release)
        boot: BootState | BootError
        try:
            boot = await asyncio.to_thread(self.boot.read)
        except BootError as exc:
            boot = exc
        target_problem = None
        if booted is not None:
            try:
                check_target(
                    self.slots[other(booted)],
                    booted,
                    self.slots[booted].path,
                    release.size,
                    self.slots_config.mountinfo,
                )
            except SlotError as exc:
                target_problem = exc
        return policy.Facts(
            release=release,
            booted=booted,
            slots=dict(self.state.slots),
            failed=self.state.has_failed(ref),
            boot=boot,
            bucket=policy.rollout_bucket(self.host_id, release.uuid),
            target_problem=target_problem,
            force=force,
            readback=self.install_config.readback,
        )

    async def _identify_booted(self, booted: SlotName, release: Release) -> None:
        """Learn what the booted slot holds when the state does not say (first boot).

        Hashes the booted slot's first ``release.size`` bytes: if they are the
        release, the slot is recorded as holding it and no update is needed.
        """
        if booted in self.state.slots or (booted, release.sha256) in self._identified:
            return
        # Hash the slot once per release, not at every poll.
        self._identified.add((booted, release.sha256))
        path = self.slots[booted].path
        try:
            digest = await asyncio.to_thread(hash_device, path, release.size)
        except OSError:
            return
        if digest.hexdigest() == release.sha256:
            self.state.slots[booted] = SlotRecord(
                release=release_ref(release), status="installed", at=utcnow()
            )
            self.state.record("identified", slot=booted, release=release_ref(release))
            if not release.legacy:
                await asyncio.to_thread(self.boot.raise_floor, booted, release.serial)

    # ------------------------------------------------------------------ install

    def _on_progress(self, progress: Progress) -> None:
        self.progress = progress
        self._emit(
            "progress",
            bytes_done=progress.bytes_done,
            bytes_total=progress.bytes_total,
            rate=round(progress.rate),
            downloaded=progress.downloaded,
            reused=progress.reused,
        )

    async def _install(
        self, source: Source, release: Release, ref: ReleaseRef, target: SlotName
    ) -> Verdict:
        image_url = source.image_url(release)
        log = self.log.bind(version=release.version, serial=release.serial, slot=target)
        written = self.state.slots.get(target)
        if written is not None and written.status == "verified" and written.release == ref:
            # Written and verified by an earlier run whose flip did not happen (crash,
            # boot control error): verify again from the device, then flip; no download.
            self._set_phase(Phase.VERIFYING)
            from organixmd.install.pipeline import Installer

            await Installer(release, source, self.slots[target].path).verify_on_device()
            return await self._stage(release, ref, target, log)
        start, etag = self._resume_point(release, ref, target, image_url)
        if start == 0:
            self.state.progress = None
        # What the slot held, for a delta install: its blocks may be reused.
        previous = self.state.slots.pop(target, None)
        checkpoint = Checkpoint(
            slot=target,
            release=ref,
            image_url=image_url,
            etag=etag,
            chunk_size=release.image.chunk_size if release.image else 0,
            chunks_done=start,
            started=utcnow(),
        )
        # GRUB must never fall back into a slot that is being written (invariant 3).
        await asyncio.to_thread(self.boot.invalidate, target)
        self.state.progress = checkpoint
        self.state.record("install-started", slot=target, release=ref, detail=f"chunk {start}")
        await self.keeper.persist()

        async def on_checkpoint(chunks_done: int, new_etag: str | None) -> None:
            checkpoint.chunks_done = chunks_done
            checkpoint.etag = new_etag
            await self.keeper.persist()

        self._set_phase(Phase.DOWNLOADING)
        installer = await self._delta_installer(
            release, target, source, on_checkpoint, start, previous, log
        ) or self._installer(release, target, source, on_checkpoint)
        try:
            try:
                result = await installer.run(start, etag)
            except SourceChanged as exc:
                if start == 0:
                    raise
                # The object was replaced since the checkpoint (say a truncated upload
                # was put right): the chunks on the device may belong to the old bytes.
                # Start over from chunk 0 now instead of failing every later check.
                log.warning("resume_refused", detail=str(exc), resumed_from=start)
                start, checkpoint.chunks_done, checkpoint.etag = 0, 0, None
                await self.keeper.persist()
                installer = self._installer(release, target, source, on_checkpoint)
                result = await installer.run(0, None)
        except SourceChanged:
            # Never resume against an object that changed: the next check starts over.
            self.state.progress = None
            await self.keeper.persist()
            raise
        except (SourceError, OSError):
            # Progress stays: the next check resumes from the last checkpoint.
            raise
        except OrganixmError:
            # A bad image: the written data is worthless; start over next time.
            self.state.progress = None
            await self.keeper.persist()
            raise
        self.state.progress = None
        self.state.slots[target] = SlotRecord(release=ref, status="verified", at=utcnow())
        delta_note = delta_summary(result, release.size)
        self.state.record(
            "installed",
            slot=target,
            release=ref,
            detail=f"{result.seconds:.1f}s, resumed at chunk {result.resumed_from}"
            + (f"; {delta_note}" if delta_note else ""),
        )
        self.counters.installs += 1
        self.counters.bytes_downloaded += result.downloaded
        self.counters.bytes_reused += result.reused
        self.counters.last_install_seconds = result.seconds
        self.counters.last_stream_seconds = result.stream_seconds
        log.info(
            "install_done",
            seconds=round(result.seconds, 2),
            stream_seconds=round(result.stream_seconds, 2),
            downloaded=result.downloaded,
            reused=result.reused,
            requests=result.requests,
            resumed_from=result.resumed_from,
            readback=self.install_config.readback,
        )
        return await self._stage(release, ref, target, log, delta_note)

    async def _delta_installer(
        self,
        release: Release,
        target: SlotName,
        source: Source,
        on_checkpoint: Callable[[int, str | None], Awaitable[None]],
        start: int,
        previous: SlotRecord | None,
        log: Any,
    ) -> DeltaInstaller | None:
        """A delta install when the release has an index and this host holds enough of
        the image in its slots (docs/format.md, "Delta updates"); else ``None``."""
        if not self.install_config.delta or not self.install_config.readback:
            return None
        if release.image is None:
            return None
        from organixmd.install import delta
        from organixmd.install.delta import DeltaInstaller

        booted = other(target)
        known = self.state.slots.get(booted)
        stable = await asyncio.to_thread(
            _local_slot, booted, self.slots[booted].path, release.size, known
        )
        # The slot about to be written is read only when it holds a release this host
        # installed (usually the one before the booted one); unknown contents (a fresh
        # host, a cut install) would cost a read of the whole slot for little.
        mine = (
            None
            if previous is None
            else await asyncio.to_thread(
                _local_slot, target, self.slots[target].path, release.size, previous
            )
        )
        prepared = await delta.prepare(
            source, release, self.public_keys, stable=stable, target=mine, start_chunk=start
        )
        if prepared.plan is None:
            log.info("delta_skipped", reason=prepared.reason)
            return None
        plan = prepared.plan
        log.info(
            "delta_planned",
            reused=plan.reused_bytes,
            zeros=plan.zero_bytes,
            fetch_bytes=plan.fetch_bytes,
            requests=plan.requests,
            scan_seconds=round(plan.local.seconds, 2),
        )
        return DeltaInstaller(
            release,
            source,
            self.slots[target].path,
            plan,
            index_bytes=prepared.index_bytes,
            on_verify=lambda: self._set_phase(Phase.VERIFYING),
            on_progress=self._on_progress,
            on_checkpoint=on_checkpoint,
            checkpoint_interval=self.install_config.checkpoint_interval,
        )

    def _installer(
        self,
        release: Release,
        target: SlotName,
        source: Source,
        on_checkpoint: Callable[[int, str | None], Awaitable[None]],
    ) -> Installer:
        from organixmd.install.pipeline import Installer

        return Installer(
            release,
            source,
            self.slots[target].path,
            buffers=self.install_config.buffers,
            readback=self.install_config.readback,
            on_stream_end=lambda: self._set_phase(Phase.VERIFYING),
            on_progress=self._on_progress,
            on_checkpoint=on_checkpoint if release.resumable else None,
            checkpoint_interval=self.install_config.checkpoint_interval,
        )

    async def _stage(
        self, release: Release, ref: ReleaseRef, target: SlotName, log: Any, note: str = ""
    ) -> Verdict:
        """Point GRUB at the verified ``target`` on trial (one env write).

        Only a slot read back from the device is flipped (invariant 2): with
        ``install.readback = false`` (benchmarks) the slot stays unflipped.
        """
        if not self.install_config.readback:
            await self.keeper.persist()
            return await self._conclude(
                self._verdict(
                    Outcome.STAGED,
                    VerdictCode.VERIFIED,
                    f"{release.describe()} is written and verified in slot {target}; "
                    "install.readback = false, and only a slot read back from the device is "
                    "ever booted, so GRUB was not changed",
                    ref,
                )
            )
        await asyncio.to_thread(self.boot.stage, target, self.trial_boots)
        self.state.slots[target] = SlotRecord(release=ref, status="staged", at=utcnow())
        self.state.record("flipped", slot=target, release=ref)
        log.info("flipped", tries=self.trial_boots)
        return await self._conclude(
            self._verdict(
                Outcome.STAGED,
                VerdictCode.STAGED,
                f"{release.describe()} is verified in slot {target} and boots on trial "
                f"({self.trial_boots} tries) at the next reboot" + (f"; {note}" if note else ""),
                ref,
            )
        )

    def _resume_point(
        self, release: Release, ref: ReleaseRef, target: SlotName, image_url: str
    ) -> tuple[int, str | None]:
        progress = self.state.progress
        if (
            progress is None
            or not release.resumable
            or release.image is None
            or progress.slot != target
            or progress.release.sha256 != ref.sha256
            or progress.release.uuid != ref.uuid
            or progress.image_url != image_url
            or progress.chunk_size != release.image.chunk_size
        ):
            return 0, None
        return min(progress.chunks_done, len(release.image.chunks)), progress.etag


def delta_summary(result: InstallResult, size: int) -> str:
    """ "delta: 212 MiB of 1 GiB reused locally, ..." for a delta install, else ""."""
    if not result.reused:
        return ""
    return (
        f"delta: {_mib(result.reused)} of {_mib(size)} reused locally, "
        f"{_mib(result.downloaded)} downloaded in {result.requests} requests"
    )


def _mib(value: int) -> str:
    if value >= 1024**3 and value % 1024**3 == 0:
        return f"{value // 1024**3} GiB"
    return f"{value / 1024**2:.0f} MiB"


def _local_slot(
    name: SlotName, path: Path, image_size: int, record: SlotRecord | None
) -> LocalSlot | None:
    """The part of a slot worth reading for blocks: the release it holds (when known),
    else as much as the new image. ``None`` when it cannot be opened. Blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    from organixmd.install.delta import LocalSlot

    wanted = record.release.size if record is not None else image_size
    return LocalSlot(name=name, path=path, size=min(size, wanted))
