"""The update policy: from a release, what this host holds and what GRUB says, one decision.

:func:`decide` is a pure function: the engine gathers the :class:`Facts` (the state
file's records, one read of the GRUB environment, the target slot's safety check),
and the decision depends on nothing else. It ends in one of the closed set of
:class:`~organixmd.apidef.VerdictCode` policy codes; ``update-available`` is the one
answer that lets the engine install. The order of the rules is the order in
docs/architecture.md ("One check, start to end", step 3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from organixmd.apidef import Outcome, VerdictCode
from organixmd.base.errors import BootError, SlotError
from organixmd.base.slotname import SlotName, other
from organixmd.boot.machine import BootState
from organixmd.host.state import FailedRelease, SlotRecord
from organixmd.release.meta import Release

#: Verdicts decided by the meta (and what this boot runs) alone: an unchanged meta gives
#: the same answer, so the next poll may ask conditionally. Any other blocked verdict
#: (slot too small, mounted, booted slot unknown) depends on the host, which can be
#: fixed without a new meta: the next check must fetch the meta and decide afresh.
META_ONLY_VERDICTS = frozenset(
    {
        VerdictCode.UP_TO_DATE,
        VerdictCode.DOWNGRADE_REFUSED,
        VerdictCode.RELEASE_FAILED_BEFORE,
    }
)


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything :func:`decide` looks at, gathered by the engine before it decides."""

    release: Release
    #: The slot the kernel command line names (``None``: not booted through organixm).
    booted: SlotName | None
    #: What the state file says each slot holds.
    slots: Mapping[SlotName, SlotRecord]
    #: This release's record among the failed ones, if it failed here before.
    failed: FailedRelease | None
    #: The GRUB environment, or why it could not be read (raised only if a rule needs it).
    boot: BootState | BootError
    #: This host's rollout bucket for the release (0-99).
    bucket: int
    #: Why the target slot must not be written, if it must not.
    target_problem: SlotError | None
    #: An admin's ``--force``: past the failed-before, downgrade and rollout rules.
    force: bool
    #: ``install.readback``: only a slot read back from the device is ever flipped.
    readback: bool


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    code: VerdictCode
    message: str

    @property
    def installs(self) -> bool:
        """Whether the engine may install the release now."""
        return self.code is VerdictCode.UPDATE_AVAILABLE

    @property
    def meta_only(self) -> bool:
        """Whether an unchanged meta gives the same decision (see META_ONLY_VERDICTS)."""
        return self.code in META_ONLY_VERDICTS


def rollout_bucket(host_id: str, release_uuid: str) -> int:
    """A stable number 0-99 per host and release: hosts below the percentage install."""
    digest = hashlib.sha256(f"{host_id}:{release_uuid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def _boot(facts: Facts) -> BootState:
    if isinstance(facts.boot, BootError):
        raise facts.boot
    return facts.boot


def disagreement(state: BootState, booted: SlotName) -> str | None:
    """Why the GRUB environment contradicts the kernel's ``booted`` slot, if it does."""
    if state.slot(booted).state == "bad":
        return (
            f"the kernel command line says slot {booted} is booted, but the GRUB "
            f"environment marks slot {booted} bad"
        )
    if state.booted is not None and state.booted != booted:
        return (
            f"the kernel command line says slot {booted} is booted, but GRUB's record "
            f"of this boot (organixm_booted) names slot {state.booted}"
        )
    return None


def decide(facts: Facts) -> Decision:
    """The policy. Raises only the ``BootError`` of an unreadable environment, and only
    when a rule needs the environment."""
    release, booted, force = facts.release, facts.booted, facts.force
    if booted is None:
        return Decision(
            Outcome.BLOCKED,
            VerdictCode.BOOTED_SLOT_UNKNOWN,
            "the kernel command line names no organixm.slot=a|b; writing nothing",
        )
    running = facts.slots.get(booted)
    if running is not None and running.release.sha256 == release.sha256:
        return Decision(
            Outcome.UP_TO_DATE,
            VerdictCode.UP_TO_DATE,
            f"slot {booted} runs {release.describe()}, the published release",
        )
    failed = facts.failed
    if failed is not None and not force:
        return Decision(
            Outcome.BLOCKED,
            VerdictCode.RELEASE_FAILED_BEFORE,
            f"{release.describe()} is remembered as failed since "
            f"{failed.at:%Y-%m-%d %H:%M} UTC ({failed.reason}); not installing it again "
            "until a newer serial is published or an admin forces it "
            "(organixctl update --force)",
        )
    floor = _boot(facts).floor
    if not release.legacy and not force and release.serial < floor:
        return Decision(
            Outcome.BLOCKED,
            VerdictCode.DOWNGRADE_REFUSED,
            f"published serial {release.serial} is lower than this host's floor {floor} "
            "(the highest serial it committed, kept in the GRUB environment as "
            "organixm_floor); refusing a downgrade",
        )
    target = other(booted)
    staged = facts.slots.get(target)
    if (
        staged is not None
        and staged.release.sha256 == release.sha256
        and (staged.status == "staged" or (staged.status == "verified" and not facts.readback))
    ):
        return Decision(
            Outcome.STAGED,
            VerdictCode(staged.status),
            f"{release.describe()} is {staged.status} in slot {target}"
            + ("; it boots on trial at the next reboot" if staged.status == "staged" else ""),
        )
    if (
        running is not None
        and not release.legacy
        and not force
        and release.serial <= running.release.serial
    ):
        return Decision(
            Outcome.BLOCKED,
            VerdictCode.DOWNGRADE_REFUSED,
            f"published serial {release.serial} is not greater than the booted slot's "
            f"serial {running.release.serial} ({running.release.version}); refusing a "
            "downgrade",
        )
    boot = _boot(facts)
    contradiction = disagreement(boot, booted)
    if contradiction is not None:
        return Decision(
            Outcome.BLOCKED,
            VerdictCode.BOOT_ENV_DISAGREES,
            f"{contradiction}; writing neither slot, since the other one may be the only "
            "good slot this host has. Reboot so GRUB boots the slot its environment "
            "chooses, or check organixctl status and docs/operations.md",
        )
    if boot.slot(booted).state == "trial":
        return Decision(
            Outcome.AVAILABLE,
            VerdictCode.WAITING_FOR_COMMIT,
            f"{release.describe()} is available, but the booted slot {booted} is still on "
            f"trial: slot {target} is the fallback and is not overwritten until this boot "
            "is committed (organixctl mark-good)",
        )
    if facts.bucket >= release.rollout_percent and not force:
        return Decision(
            Outcome.AVAILABLE,
            VerdictCode.ROLLOUT_EXCLUDED,
            f"{release.describe()} is rolled out to {release.rollout_percent}% of hosts; "
            f"this host's bucket is {facts.bucket}",
        )
    if facts.target_problem is not None:
        return Decision(
            Outcome.BLOCKED, VerdictCode(facts.target_problem.code), str(facts.target_problem)
        )
    return Decision(
        Outcome.AVAILABLE,
        VerdictCode.UPDATE_AVAILABLE,
        f"{release.describe()} is available; run 'organixctl update' to install",
    )
