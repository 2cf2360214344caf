"""After boot: reconcile what GRUB did with the daemon's state, commit or fail the trial.

At start the daemon asks GRUB's environment what happened at this boot:

* the booted slot is on trial → a trial boot; ``mark-good`` (run by
  ``organixm-mark-good.service`` after ``boot-complete.target``) commits it, and a
  deadline marks it bad if nothing did;
* GRUB recorded a fallback (tries ran out, the slot was unusable or its kernel
  failed to load) → the release in the other slot failed its trial: it is
  remembered as failed and never installed again (invariant 4);
* the environment is torn or missing → it is recreated with the running slot
  as the committed one (it booted, so it is good enough to fall back to).

Writes to the environment block on fsync and run in worker threads.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from organixmd.apidef import Outcome, VerdictCode
from organixmd.base.config import BootConfig
from organixmd.base.errors import BootError, PolicyError, RebootError, SlotError
from organixmd.base.logsetup import get_logger
from organixmd.base.slotname import SlotName, other
from organixmd.boot.machine import BootState
from organixmd.boot.port import GrubBootPort
from organixmd.host.state import SlotRecord, StateKeeper, Verdict, utcnow


@dataclass(frozen=True, slots=True)
class BootReport:
    """Why this slot is running, in words an admin reads in ``organixctl status``."""

    booted: SlotName | None
    reason: str | None
    trial_try: int | None
    on_trial: bool
    explanation: str


def explain(
    state: BootState | None, booted: SlotName | None, *, unmounted: Path | None = None
) -> BootReport:
    if booted is None:
        return BootReport(
            None, None, None, False, "not booted through organixm's GRUB (no organixm.slot=)"
        )
    if unmounted is not None:
        return BootReport(
            booted,
            None,
            None,
            False,
            f"the GRUB environment's directory {unmounted} does not exist: is the boot "
            "partition mounted? Updates cannot be flipped until it is (mount it, then "
            "restart organixm-update.service)",
        )
    if state is None:
        return BootReport(booted, None, None, False, "the GRUB environment is unreadable")
    on_trial = state.slot(booted).state == "trial"
    reason = state.reason if state.booted == booted else None
    texts = {
        "committed": f"slot {booted} is the committed slot",
        "trial": f"slot {booted} is on trial (try {state.trial_try or '?'}), waiting for "
        "boot-complete.target to commit it",
        "fallback-tries-exhausted": f"fell back to slot {booted}: slot {other(booted)} used up "
        "its trial boots without being committed",
        "fallback-unusable": f"fell back to slot {booted}: slot {other(booted)} was unusable "
        "(partition or boot entry missing)",
        "fallback-bad": f"slot {booted} boots because slot {other(booted)} is marked bad",
        "fallback-load-failed": f"fell back to slot {booted}: the kernel of slot "
        f"{other(booted)} failed to load",
        "default-env-unusable": f"slot {booted} booted as GRUB's default: the boot environment "
        "was unusable",
        "last-resort": f"slot {booted} booted as the last resort: no slot was marked usable",
        "trial-unsaved": f"slot {booted} booted instead of the trial of slot {other(booted)}: "
        "GRUB could not save the trial's try into its environment block; the block is "
        "repaired now and the trial starts at the next reboot",
    }
    if reason == "trial" and not on_trial:
        texts["trial"] = (
            f"slot {booted} booted on trial (try {state.trial_try or '?'}) and is now "
            f"{state.slot(booted).state}"
        )
    explanation = texts.get(reason or "", f"slot {booted} booted ({reason or 'no GRUB record'})")
    if on_trial and reason != "trial":
        explanation += "; it is still on trial"
    return BootReport(booted, reason, state.trial_try, on_trial, explanation)


class BootManager:
    """Boot assessment and the admin's boot commands (mark-good, mark-bad, rollback)."""

    def __init__(self, config: BootConfig, keeper: StateKeeper, port: GrubBootPort) -> None:
        self.config = config
        self.keeper = keeper
        self.port = port
        self.booted = port.booted
        self.report = explain(None, self.booted)
        self.log = get_logger("organixmd.boot", slot=self.booted)
        self._lock = asyncio.Lock()

    async def read(self) -> BootState | None:
        try:
            return await asyncio.to_thread(self.port.read)
        except BootError:
            return None

    async def reconcile(self) -> BootReport:
        """Run once at start: repair the env, learn why we booted, record a fallback."""
        booted = self.booted
        state = await self.read()
        directory = self.port.directory
        if state is None and booted is not None and not directory.is_dir():
            # The boot partition is not mounted: nothing can be flipped, but the daemon
            # still starts, answers status and sends READY (units ordered after it start).
            self.report = explain(None, booted, unmounted=directory)
            self.log.error("boot_env_missing", detail=self.report.explanation)
            await self.keeper.try_persist()
            return self.report
        if state is None and booted is not None:
            state = await asyncio.to_thread(self.port.repair, booted)
            self.keeper.state.record("env-repaired", slot=booted)
            self.log.warning(
                "env_repaired",
                detail=f"the GRUB environment was missing or corrupt; recreated with slot "
                f"{booted} committed",
            )
        elif state is not None and state.source == "backup" and booted is not None:
            state = await asyncio.to_thread(self.port.repair, booted)
            self.log.warning("env_repaired", detail="primary copy was torn; restored from backup")
        elif (
            state is not None and booted is not None and await asyncio.to_thread(self.port.damaged)
        ):
            # Only a damaged copy is rewritten: every rename on the boot partition is a
            # window in which a power cut leaves GRUB (which replays no file-system
            # journal) reading the old file while Linux reads the new one.
            state = await asyncio.to_thread(self.port.repair, booted)
            self.log.warning(
                "env_repaired",
                detail="a copy of the GRUB environment was damaged (GRUB cannot save its "
                "decisions into a block whose padding is torn); rewritten from the primary",
            )
        if state is not None and booted is not None:
            state = await self._finish_mark_bad(state, booted)
        self.report = explain(state, booted)
        if state is None or booted is None:
            await self.keeper.try_persist()
            return self.report
        if self.report.reason and self.report.reason.startswith("fallback"):
            await self._record_fallback(booted, self.report.reason)
        running = self.keeper.state.slots.get(booted)
        if running is not None and not running.release.legacy:
            # Hosts committed before the floor existed (or whose env was recreated) get it
            # back from the committed release they run.
            await asyncio.to_thread(self.port.raise_floor, booted, running.release.serial)
        await self.keeper.try_persist()
        self.log.info("boot_assessed", reason=self.report.reason, detail=self.report.explanation)
        return self.report

    async def _finish_mark_bad(self, state: BootState, booted: SlotName) -> BootState:
        """Complete a mark-bad of this trial boot that a crash cut short.

        mark-bad writes the primary copy, then the backup, then the state file. Killed
        after the first, it left the booted slot bad for GRUB but possibly still on trial
        in the backup (GRUB's copy when the primary is torn), and its release not
        remembered as failed (invariant 4). Idempotent: once recorded, nothing is done.
        """
        record = self.keeper.state.slots.get(booted)
        if (
            state.slot(booted).state != "bad"
            or state.booted != booted
            or state.reason != "trial"
            or record is None
            or self.keeper.state.has_failed(record.release) is not None
        ):
            return state
        state = await asyncio.to_thread(self.port.mark_bad, booted)
        failed = await self.keeper.record_failed(
            booted, "marked bad during its trial boot (completed after the daemon restarted)"
        )
        self.log.warning(
            "mark_bad_completed",
            detail=f"slot {booted} was marked bad in the GRUB environment, but the daemon "
            "stopped before it recorded the failure; recorded it now",
            version=failed.release.version if failed else None,
        )
        return state

    async def _record_fallback(self, booted: SlotName, reason: str) -> None:
        failed_slot = other(booted)
        record = self.keeper.state.slots.get(failed_slot)
        if record is None or record.status not in ("staged", "verified"):
            return
        # Written by reconcile right after (a full state directory must not stop the start).
        failed = await self.keeper.record_failed(failed_slot, reason, persist=False)
        # The slot's content stays, but it is no longer a candidate.
        del self.keeper.state.slots[failed_slot]
        if failed is not None:
            self.log.warning(
                "fell_back",
                failed_slot=failed_slot,
                version=failed.release.version,
                serial=failed.release.serial,
                reason=reason,
            )

    # ------------------------------------------------------------------ admin commands

    def _require_booted(self) -> SlotName:
        if self.booted is None:
            raise SlotError(
                "the booted slot is unknown (no organixm.slot= on the kernel command line)",
                hint="boot through organixm's grub.cfg",
            )
        return self.booted

    async def mark_good(self) -> BootState:
        """Commit the booted slot (trial → good). Idempotent."""
        booted = self._require_booted()
        async with self._lock:
            before = await self.read()
            record = self.keeper.state.slots.get(booted)
            serial = None if record is None or record.release.legacy else record.release.serial
            state = await asyncio.to_thread(self.port.commit, booted, serial)
            if record is not None and record.status != "installed":
                self.keeper.state.slots[booted] = SlotRecord(
                    release=record.release, status="installed", at=utcnow()
                )
            if before is None or before.slot(booted).state != "good":
                self.keeper.state.record(
                    "committed", slot=booted, release=record.release if record else None
                )
                self.log.info(
                    "committed",
                    version=record.release.version if record else None,
                    serial=record.release.serial if record else None,
                )
            await self.keeper.persist()
            self.report = explain(state, booted)
            return state

    async def mark_bad(
        self, reason: str = "marked bad by an admin", *, force: bool = False
    ) -> BootState:
        """The booted trial slot failed: mark it bad and remember its release.

        Only a slot on trial is failed this way (a unit failing on a committed
        system must not demote the known-good slot); ``force`` demotes a committed
        slot too, for an admin who knows it is broken. The caller reboots by policy.
        """
        booted = self._require_booted()
        async with self._lock:
            current = await self.read()
            # Only a committed slot is refused: marking a bad one again is idempotent (it
            # completes a mark-bad that a crash cut short).
            if current is not None and current.slot(booted).state == "good" and not force:
                raise PolicyError(
                    f"slot {booted} is {current.slot(booted).state}, not on trial; "
                    "refusing to mark the running committed system bad",
                    hint="pass force (organixctl mark-bad --force) to demote it anyway",
                )
            state = await asyncio.to_thread(self.port.mark_bad, booted)
            failed = await self.keeper.record_failed(booted, reason)
            self.log.warning(
                "marked_bad",
                reason=reason,
                version=failed.release.version if failed else None,
            )
            self.report = explain(state, booted)
            return state

    async def rollback(self) -> BootState:
        """Boot the other (committed) slot next, and keep the running release from coming back.

        The running slot stays good (it is the fallback), but its release is
        remembered as rolled back: the daemon will not install it again after the
        reboot (until a newer serial is published or an admin forces it).
        """
        booted = self._require_booted()
        async with self._lock:
            state = await asyncio.to_thread(self.port.rollback)
            record = self.keeper.state.slots.get(booted)
            if record is not None and self.keeper.state.has_failed(record.release) is None:
                await self.keeper.record_failed(booted, "rolled back by an admin", event=None)
            self.keeper.state.record("rollback", slot=other(booted))
            await self.keeper.persist()
            self.log.info("rollback", next_slot=other(booted))
            return state

    def _seconds_left_to_commit(self) -> float:
        """The deadline counts from boot (``/proc/uptime``), not from this daemon's start."""
        deadline = self.config.commit_deadline
        path = self.config.uptime
        try:
            since_boot = float(path.read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            self.log.warning(
                "uptime_unreadable",
                path=str(path),
                error=str(exc),
                detail=f"counting the {deadline:.0f}s commit deadline from the daemon's start",
            )
            return deadline
        return max(0.0, deadline - since_boot)

    async def watch_deadline(self, on_failed: Reboot) -> None:
        """Mark the booted trial slot bad if it is not committed within the deadline."""
        if self.booted is None or not self.report.on_trial:
            return
        await asyncio.sleep(self._seconds_left_to_commit())
        state = await self.read()
        if state is None or state.slot(self.booted).state != "trial":
            return
        await self.mark_bad(f"not committed within {self.config.commit_deadline:.0f}s of boot")
        try:
            await on_failed.request("trial deadline passed")
        except RebootError as exc:
            # The slot is marked bad either way: the next boot falls back. A failing reboot
            # command must not take the daemon (and its socket) down with it.
            self.log.error("reboot_failed", reason="trial deadline passed", error=str(exc))


#: Seconds a reboot command may take to return (systemctl reboot returns at once).
REBOOT_COMMAND_TIMEOUT = 60.0


class Reboot:
    """Reboot policy: at once, only inside the maintenance window, or never."""

    def __init__(self, config: BootConfig) -> None:
        self.config = config
        self.pending: str | None = None
        self.log = get_logger("organixmd.reboot")

    def in_window(self, now: datetime | None = None) -> bool:
        window = self.config.window()
        if window is None:
            return True
        current = (now or datetime.now()).time()
        start, end = window
        if start <= end:
            return start <= current < end
        return current >= start or current < end

    def seconds_until_window(self, now: datetime | None = None) -> float:
        window = self.config.window()
        if window is None or self.in_window(now):
            return 0.0
        moment = now or datetime.now()
        start = datetime.combine(moment.date(), window[0])
        if start <= moment:
            start += timedelta(days=1)
        return (start - moment).total_seconds()

    async def request(self, why: str) -> bool:
        """Reboot now if policy allows; otherwise remember it. Returns whether it rebooted."""
        policy = self.config.reboot
        if policy == "never":
            self.pending = why
            self.log.info("reboot_pending", reason=why, detail="reboot = never: the admin reboots")
            return False
        if policy == "window" and not self.in_window():
            self.pending = why
            self.log.info("reboot_waiting_for_window", reason=why)
            return False
        return await self.run(why)

    async def after_check(self, verdict: Verdict, why: str, *, now: bool = False) -> None:
        """The one reboot decision after a check.

        Only a release this check staged (outcome and code ``staged``) asks for a
        reboot: at once when ``now`` (the admin asked for it; a failure is raised),
        otherwise by policy (a failure is logged; the reason stays pending).
        """
        if verdict.outcome != Outcome.STAGED or verdict.code != VerdictCode.STAGED:
            return
        if now:
            await self.run(why)
        else:
            await self._reboot_or_log(why, policy=True)

    async def _reboot_or_log(self, why: str, *, policy: bool = False) -> None:
        try:
            if policy:
                await self.request(why)
            else:
                await self.run(why)
        except RebootError as exc:
            self.log.error("reboot_failed", reason=why, error=str(exc))

    async def run(self, why: str) -> bool:
        self.log.warning("rebooting", reason=why, command=" ".join(self.config.reboot_command))
        command = " ".join(self.config.reboot_command)
        self.pending = why
        try:
            process = await asyncio.create_subprocess_exec(*self.config.reboot_command)
        except OSError as exc:
            raise RebootError(f"reboot command {command!r} failed: {exc.strerror}") from exc
        try:
            async with asyncio.timeout(REBOOT_COMMAND_TIMEOUT):
                code = await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RebootError(
                f"reboot command {command!r} did not return within "
                f"{REBOOT_COMMAND_TIMEOUT:.0f}s; killed it"
            ) from None
        if code != 0:
            raise RebootError(f"reboot command {command!r} exited with {code}")
        self.pending = None
        return True

    async def wait_for_window(self) -> None:
        """Reboot for a pending reason once the window opens (reboot = window)."""
        while True:
            if self.pending is not None and self.config.reboot == "window":
                if self.in_window():
                    await self._reboot_or_log(self.pending)
                    return
                await asyncio.sleep(min(self.seconds_until_window(), 3600))
            else:
                return
