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
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from uuid import uuid4

import structlog

from organixmd.base.config import Config
from organixmd.base.errors import (
    Busy,
    Cancelled,
    OrganixmError,
    PolicyError,
    SignatureError,
    SlotError,
    SourceChanged,
    SourceError,
    StateError,
)
from organixmd.base.logsetup import get_logger
from organixmd.base.slotname import SlotName, other
from organixmd.host.hostlock import HostLock
from organixmd.host.state import (
    FailedRelease,
    ReleaseRef,
    SlotRecord,
    State,
    StateStore,
    Verdict,
    utcnow,
)
from organixmd.host.state import (
    Progress as Checkpoint,
)
from organixmd.install.blockio import hash_device
from organixmd.install.slots import booted_slot, check_target, slot_paths
from organixmd.release.meta import Release, parse_meta
from organixmd.release.sources import Source, open_source

if TYPE_CHECKING:
    # The idle daemon never needs these: the install pipeline (zstandard) is imported
    # at the first install, minisign (cryptography) only when keys are configured.
    from organixmd.install.delta import DeltaInstaller, LocalSlot
    from organixmd.install.pipeline import Installer, InstallResult, Progress
    from organixmd.release import minisign

#: Verdicts decided by the meta (and what this boot runs) alone: an unchanged meta gives
#: the same answer, so the next poll may ask conditionally. Any other blocked verdict
#: (slot too small, mounted, booted slot unknown) depends on the host, which can be
#: fixed without a new meta: the next check must fetch the meta and decide afresh.
META_ONLY_VERDICTS = frozenset({"up-to-date", "downgrade-refused", "release-failed-before"})


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

    def booted_on_trial(self, booted: SlotName) -> bool:
        """Whether the running slot is still on trial (not yet committed)."""

    def disagreement(self, booted: SlotName) -> str | None:
        """Why the boot environment contradicts the kernel's ``booted`` slot, if it does."""

    def floor(self) -> int:
        """The lowest serial this host may install (the highest it committed)."""

    def raise_floor(self, booted: SlotName, serial: int) -> None:
        """Raise the floor to ``serial`` if ``booted`` is committed (never lowers it)."""

    def stage(self, target: SlotName, tries: int) -> None:
        """Make ``target`` boot next, on trial with ``tries`` tries. One env write."""

    def invalidate(self, target: SlotName) -> None:
        """Mark ``target`` bad before it is overwritten (a half-written slot is never good)."""


@dataclass(frozen=True, slots=True)
class LiveProgress:
    phase: Phase
    bytes_done: int
    bytes_total: int
    rate: float
    #: Compressed bytes fetched so far, and image bytes copied from local slots.
    downloaded: int = 0
    reused: int = 0

    @property
    def eta(self) -> float | None:
        if self.rate <= 0 or self.bytes_done >= self.bytes_total:
            return None
        return (self.bytes_total - self.bytes_done) / self.rate


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


def rollout_bucket(host_id: str, release_uuid: str) -> int:
    """A stable number 0-99 per host and release: hosts below the percentage install."""
    digest = hashlib.sha256(f"{host_id}:{release_uuid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def read_host_id(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or socket.gethostname()


class Engine:
    """Checks for releases and installs them. One operation at a time."""

    def __init__(
        self,
        config: Config,
        store: StateStore,
        state: State,
        *,
        boot: BootPort | None,
        public_keys: list[minisign.PublicKey],
        on_event: EventSink | None = None,
        source_factory: Callable[[], Source] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.boot = boot
        self.public_keys = public_keys
        self.on_event = on_event
        self._source_factory = source_factory or (lambda: open_source(config.source))
        self._lock = asyncio.Lock()
        self._persist_lock = asyncio.Lock()
        self._task: asyncio.Task[Any] | None = None
        self._cancel_requested = False
        self._identified: set[tuple[SlotName, str]] = set()
        self.phase = Phase.IDLE
        self.progress: LiveProgress | None = None
        self.current: ReleaseRef | None = None
        self.last_error: OrganixmError | None = None
        self.counters = Counters()
        self.host_id = read_host_id(config.daemon.host_id_file)
        self.log = get_logger("organixmd.engine")
        self.slots = slot_paths(config.slots)
        #: The host's writer lock, held while this engine lives (set by the composition root).
        self.lock: HostLock | None = None

    # ------------------------------------------------------------------ helpers

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
        return booted_slot(self.config.slots.cmdline)

    async def persist(self) -> None:
        """Write the state file (serialised here, written in a worker thread)."""
        async with self._persist_lock:
            data = self.store.encode(self.state)
            await asyncio.to_thread(self.store.write, data)

    async def try_persist(self) -> StateError | None:
        """Write the state file; a failure (say a full file system) is logged and returned.

        The state stays in memory and the next write carries it; the old file stays
        intact (the write is atomic). For callers that must go on without it.
        """
        try:
            await self.persist()
        except StateError as exc:
            self.log.error("state_unwritable", code=exc.code, error=str(exc))
            return exc
        return None

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, fields)

    def _set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self._emit("phase", phase=phase.value)

    async def _conclude(self, verdict: Verdict, *, keep_etag: str | None = None) -> Verdict:
        self.counters.checks[verdict.outcome] = self.counters.checks.get(verdict.outcome, 0) + 1
        self.state.last_check = verdict.at
        self.state.last_verdict = verdict
        self.state.meta_etag = keep_etag
        unwritable = await self.try_persist()
        if unwritable is not None:
            # The verdict cannot be kept: the check ends in the state error itself (kept
            # in memory for status; the next check writes the state again).
            if verdict.code != unwritable.code:
                verdict = self._verdict(
                    "error",
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
        outcome = "blocked" if isinstance(exc, PolicyError | SignatureError) else "error"
        return await self._conclude(self._verdict(outcome, exc.code, str(exc), self.current))

    @staticmethod
    def _verdict(
        outcome: Any, code: str, message: str, release: ReleaseRef | None = None
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
                    OrganixmError(f"internal error during the check: {type(exc).__name__}: {exc}")
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
            fetched = await source.fetch_meta(reuse_etag)
            if fetched is None and last is not None:
                message = last.message.removeprefix("meta unchanged: ")
                verdict = self._verdict(
                    last.outcome, last.code, f"meta unchanged: {message}", last.release
                )
                return await self._conclude(verdict, keep_etag=reuse_etag)
            if fetched is None:
                fetched = await source.fetch_meta(None)
            assert fetched is not None  # noqa: S101 - unconditional fetch returns data
            await self._check_signature(source, fetched.data)
            release = parse_meta(fetched.data, source=source.meta_url)
            ref = release_ref(release)
            self.current = ref
            decision = await self._decide(release, ref, booted, force)
            if decision is not None:
                keep = fetched.etag if decision.code in META_ONLY_VERDICTS else None
                return await self._conclude(decision, keep_etag=keep)
            self.log.info(
                "update_found",
                version=release.version,
                serial=release.serial,
                target=other(booted) if booted else None,
            )
            if not install:
                return await self._conclude(
                    self._verdict(
                        "available",
                        "update-available",
                        f"{release.describe()} is available; run 'organixctl update' to install",
                        ref,
                    )
                )
            assert booted is not None  # noqa: S101 - _decide refuses an unknown booted slot
            return await self._install(source, release, ref, other(booted))

    async def _check_signature(self, source: Source, meta: bytes) -> None:
        if not self.public_keys:
            return
        signature = await source.fetch_signature()
        if signature is None:
            raise SignatureError(
                f"{source.signature_url}: no signature, and trusted keys are configured; "
                "refusing the unsigned meta"
            )
        from organixmd.release import minisign

        minisign.verify(meta, signature.data, self.public_keys)

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
            if self.boot is not None and not release.legacy:
                await asyncio.to_thread(self.boot.raise_floor, booted, release.serial)

    async def _decide(
        self, release: Release, ref: ReleaseRef, booted: SlotName | None, force: bool
    ) -> Verdict | None:
        """A verdict when nothing is to be installed now; ``None`` to install."""
        if booted is None:
            return self._verdict(
                "blocked",
                "booted-slot-unknown",
                "the kernel command line names no organixm.slot=a|b; writing nothing",
                ref,
            )
        await self._identify_booted(booted, release)
        running = self.state.slots.get(booted)
        if running is not None and running.release.sha256 == release.sha256:
            return self._verdict(
                "up-to-date",
                "up-to-date",
                f"slot {booted} runs {release.describe()}, the published release",
                ref,
            )
        failed = self.state.has_failed(ref)
        if failed is not None and not force:
            return self._verdict(
                "blocked",
                "release-failed-before",
                f"{release.describe()} is remembered as failed since "
                f"{failed.at:%Y-%m-%d %H:%M} UTC ({failed.reason}); not installing it again "
                "until a newer serial is published or an admin forces it "
                "(organixctl update --force)",
                ref,
            )
        floor = self.boot.floor() if self.boot is not None else 0
        if not release.legacy and not force and release.serial < floor:
            return self._verdict(
                "blocked",
                "downgrade-refused",
                f"published serial {release.serial} is lower than this host's floor {floor} "
                "(the highest serial it committed, kept in the GRUB environment as "
                "organixm_floor); refusing a downgrade",
                ref,
            )
        target = other(booted)
        staged = self.state.slots.get(target)
        if (
            staged is not None
            and staged.release.sha256 == release.sha256
            and (
                staged.status == "staged"
                or (
                    staged.status == "verified"
                    and (self.boot is None or not self.config.install.readback)
                )
            )
        ):
            return self._verdict(
                "staged",
                staged.status,
                f"{release.describe()} is {staged.status} in slot {target}"
                + ("; it boots on trial at the next reboot" if staged.status == "staged" else ""),
                ref,
            )
        if (
            running is not None
            and not release.legacy
            and not force
            and release.serial <= running.release.serial
        ):
            return self._verdict(
                "blocked",
                "downgrade-refused",
                f"published serial {release.serial} is not greater than the booted slot's "
                f"serial {running.release.serial} ({running.release.version}); refusing a "
                "downgrade",
                ref,
            )
        disagreement = self.boot.disagreement(booted) if self.boot is not None else None
        if disagreement is not None:
            return self._verdict(
                "blocked",
                "boot-env-disagrees",
                f"{disagreement}; writing neither slot, since the other one may be the only "
                "good slot this host has. Reboot so GRUB boots the slot its environment "
                "chooses, or check organixctl status and docs/operations.md",
                ref,
            )
        if self.boot is not None and self.boot.booted_on_trial(booted):
            return self._verdict(
                "available",
                "waiting-for-commit",
                f"{release.describe()} is available, but the booted slot {booted} is still on "
                f"trial: slot {target} is the fallback and is not overwritten until this boot "
                "is committed (organixctl mark-good)",
                ref,
            )
        bucket = rollout_bucket(self.host_id, release.uuid)
        if bucket >= release.rollout_percent and not force:
            return self._verdict(
                "available",
                "rollout-excluded",
                f"{release.describe()} is rolled out to {release.rollout_percent}% of hosts; "
                f"this host's bucket is {bucket}",
                ref,
            )
        try:
            check_target(
                self.slots[target],
                booted,
                self.slots[booted].path,
                release.size,
                self.config.slots.mountinfo,
            )
        except SlotError as exc:
            return self._verdict("blocked", exc.code, str(exc), ref)
        return None

    # ------------------------------------------------------------------ install

    def _on_progress(self, progress: Progress) -> None:
        self.progress = LiveProgress(
            self.phase,
            progress.bytes_done,
            progress.bytes_total,
            progress.rate,
            progress.downloaded,
            progress.reused,
        )
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
        if self.boot is not None:
            # GRUB must never fall back into a slot that is being written (invariant 3).
            await asyncio.to_thread(self.boot.invalidate, target)
        self.state.progress = checkpoint
        self.state.record("install-started", slot=target, release=ref, detail=f"chunk {start}")
        await self.persist()

        async def on_checkpoint(chunks_done: int, new_etag: str | None) -> None:
            checkpoint.chunks_done = chunks_done
            checkpoint.etag = new_etag
            await self.persist()

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
                await self.persist()
                installer = self._installer(release, target, source, on_checkpoint)
                result = await installer.run(0, None)
        except SourceChanged:
            # Never resume against an object that changed: the next check starts over.
            self.state.progress = None
            await self.persist()
            raise
        except (SourceError, OSError):
            # Progress stays: the next check resumes from the last checkpoint.
            raise
        except OrganixmError:
            # A bad image: the written data is worthless; start over next time.
            self.state.progress = None
            await self.persist()
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
            readback=self.config.install.readback,
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
        if not self.config.install.delta or not self.config.install.readback:
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
            checkpoint_interval=self.config.install.checkpoint_interval,
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
            buffers=self.config.install.buffers,
            readback=self.config.install.readback,
            on_stream_end=lambda: self._set_phase(Phase.VERIFYING),
            on_progress=self._on_progress,
            on_checkpoint=on_checkpoint if release.resumable else None,
            checkpoint_interval=self.config.install.checkpoint_interval,
        )

    async def _stage(
        self, release: Release, ref: ReleaseRef, target: SlotName, log: Any, note: str = ""
    ) -> Verdict:
        """Point GRUB at the verified ``target`` on trial (one env write).

        Only a slot read back from the device is flipped (invariant 2): with
        ``install.readback = false`` (benchmarks, tests) the slot stays unflipped.
        """
        if self.boot is None or not self.config.install.readback:
            why = (
                "boot control is not configured"
                if self.boot is None
                else "install.readback = false, and only a slot read back from the device is "
                "ever booted"
            )
            await self.persist()
            return await self._conclude(
                self._verdict(
                    "staged",
                    "verified",
                    f"{release.describe()} is written and verified in slot {target}; {why}, "
                    "so GRUB was not changed",
                    ref,
                )
            )
        await asyncio.to_thread(self.boot.stage, target, self.config.boot.trial_boots)
        self.state.slots[target] = SlotRecord(release=ref, status="staged", at=utcnow())
        self.state.record("flipped", slot=target, release=ref)
        log.info("flipped", tries=self.config.boot.trial_boots)
        return await self._conclude(
            self._verdict(
                "staged",
                "staged",
                f"{release.describe()} is verified in slot {target} and boots on trial "
                f"({self.config.boot.trial_boots} tries) at the next reboot"
                + (f"; {note}" if note else ""),
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

    # ------------------------------------------------------------------ after boot

    async def record_failed(
        self, slot: SlotName, reason: str, *, event: str | None = "fell-back", persist: bool = True
    ) -> FailedRelease | None:
        """Remember the release in ``slot`` as failed so it is never installed again.

        With ``persist=False`` the caller writes the state file itself.
        """
        record = self.state.slots.get(slot)
        if record is None:
            return None
        failed = FailedRelease(release=record.release, reason=reason, at=utcnow())
        if self.state.has_failed(record.release) is None:
            self.state.failed.append(failed)
        if event is not None:
            self.state.record(event, slot=slot, release=record.release, detail=reason)
        if persist:
            await self.persist()
        return failed


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
