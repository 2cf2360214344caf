"""The update policy as a pure function: every rule, its order, and what --force passes.

:func:`organixmd.host.policy.decide` sees only its :class:`Facts`; these tests build
facts by hand (no files, no GRUB, no source) and check each verdict code the policy can
give, that an earlier rule wins over a later one, and that the GRUB environment is only
needed by the rules that read it.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from organixmd.apidef import Outcome, VerdictCode
from organixmd.base.errors import BootError, SlotError
from organixmd.boot.machine import SlotBoot, initial
from organixmd.host.policy import META_ONLY_VERDICTS, Facts, decide, rollout_bucket
from organixmd.host.state import FailedRelease, ReleaseRef, SlotRecord
from organixmd.release.meta import BootEntry, Release

AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
BOOT = BootEntry(kernel="/boot/bzImage", initrd="/boot/initrd", init="/init")


def release(serial: int, sha: str = "1" * 64, *, rollout: int = 100) -> Release:
    return Release(
        version=f"v{serial}",
        serial=serial,
        uuid=f"uuid-{serial}",
        image_object="images/x.img.zst",
        object_is_absolute=False,
        size=1024,
        sha256=sha,
        boot=BOOT,
        rollout_percent=rollout,
        image=None,
        legacy=False,
    )


def record(rel: Release, status: str = "installed") -> SlotRecord:
    ref = ReleaseRef(
        version=rel.version, serial=rel.serial, uuid=rel.uuid, sha256=rel.sha256, size=rel.size
    )
    return SlotRecord.model_validate({"release": ref, "status": status, "at": AT})


RUNNING = release(1, "0" * 64)
NEW = release(2)


def facts(**changes: object) -> Facts:
    base = Facts(
        release=NEW,
        booted="a",
        slots={"a": record(RUNNING)},
        failed=None,
        boot=initial("a"),
        bucket=10,
        target_problem=None,
        force=False,
        readback=True,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def code(f: Facts) -> VerdictCode:
    return decide(f).code


def test_a_newer_release_on_a_committed_host_installs() -> None:
    decision = decide(facts())
    assert (decision.outcome, decision.code) == (Outcome.AVAILABLE, VerdictCode.UPDATE_AVAILABLE)
    assert decision.installs
    assert not decision.meta_only


def test_each_rule_gives_its_code() -> None:
    failed = FailedRelease(release=record(NEW).release, reason="fell back", at=AT)
    on_trial = initial("a").with_slot("a", SlotBoot("trial", 3, 1))
    a_bad = initial("a").with_slot("a", SlotBoot("bad"))
    cases: list[tuple[Facts, Outcome, VerdictCode]] = [
        (facts(booted=None), Outcome.BLOCKED, VerdictCode.BOOTED_SLOT_UNKNOWN),
        (facts(release=RUNNING), Outcome.UP_TO_DATE, VerdictCode.UP_TO_DATE),
        (facts(failed=failed), Outcome.BLOCKED, VerdictCode.RELEASE_FAILED_BEFORE),
        (
            facts(boot=replace(initial("a"), floor=5)),
            Outcome.BLOCKED,
            VerdictCode.DOWNGRADE_REFUSED,
        ),
        (
            facts(slots={"a": record(RUNNING), "b": record(NEW, "staged")}),
            Outcome.STAGED,
            VerdictCode.STAGED,
        ),
        (
            facts(slots={"a": record(release(3, "3" * 64))}),
            Outcome.BLOCKED,
            VerdictCode.DOWNGRADE_REFUSED,
        ),
        (facts(boot=a_bad), Outcome.BLOCKED, VerdictCode.BOOT_ENV_DISAGREES),
        (
            facts(boot=replace(initial("a"), booted="b")),
            Outcome.BLOCKED,
            VerdictCode.BOOT_ENV_DISAGREES,
        ),
        (facts(boot=on_trial), Outcome.AVAILABLE, VerdictCode.WAITING_FOR_COMMIT),
        (facts(release=release(2, rollout=5)), Outcome.AVAILABLE, VerdictCode.ROLLOUT_EXCLUDED),
        (
            facts(target_problem=SlotError("slot b is mounted at /mnt")),
            Outcome.BLOCKED,
            VerdictCode.SLOT_UNUSABLE,
        ),
    ]
    seen = set()
    for case, outcome, expected in cases:
        decision = decide(case)
        assert (decision.outcome, decision.code) == (outcome, expected), decision.message
        assert not decision.installs
        seen.add(expected)
    # A written but not yet flipped slot counts as staged only when nothing flips it.
    verified = facts(slots={"a": record(RUNNING), "b": record(NEW, "verified")}, readback=False)
    assert code(verified) is VerdictCode.VERIFIED
    assert code(replace(verified, readback=True)) is VerdictCode.UPDATE_AVAILABLE
    seen.add(VerdictCode.VERIFIED)
    # Every policy code is reachable (the list in organixmd.apidef has no dead entry).
    policy_codes = {
        VerdictCode.BOOTED_SLOT_UNKNOWN,
        VerdictCode.UP_TO_DATE,
        VerdictCode.RELEASE_FAILED_BEFORE,
        VerdictCode.DOWNGRADE_REFUSED,
        VerdictCode.STAGED,
        VerdictCode.VERIFIED,
        VerdictCode.BOOT_ENV_DISAGREES,
        VerdictCode.WAITING_FOR_COMMIT,
        VerdictCode.ROLLOUT_EXCLUDED,
        VerdictCode.SLOT_UNUSABLE,
    }
    assert seen == policy_codes


def test_earlier_rules_win() -> None:
    """Rules apply in order: a failed release is refused before the floor is read; a host
    whose booted slot is on trial waits even when the release is outside the rollout."""
    failed = FailedRelease(release=record(NEW).release, reason="fell back", at=AT)
    both = facts(failed=failed, boot=replace(initial("a"), floor=5))
    assert code(both) is VerdictCode.RELEASE_FAILED_BEFORE
    on_trial = initial("a").with_slot("a", SlotBoot("trial", 3, 1))
    assert (
        code(facts(boot=on_trial, release=release(2, rollout=0))) is VerdictCode.WAITING_FOR_COMMIT
    )
    # An unknown booted slot outranks everything, even an unreadable environment.
    assert code(facts(booted=None, boot=BootError("unreadable"))) is VerdictCode.BOOTED_SLOT_UNKNOWN


def test_force_passes_failed_downgrade_and_rollout_but_not_safety() -> None:
    failed = FailedRelease(release=record(NEW).release, reason="fell back", at=AT)
    assert code(facts(failed=failed, force=True)) is VerdictCode.UPDATE_AVAILABLE
    floor = replace(initial("a"), floor=5)
    assert code(facts(boot=floor, force=True)) is VerdictCode.UPDATE_AVAILABLE
    older = facts(slots={"a": record(release(3, "3" * 64))}, force=True)
    assert code(older) is VerdictCode.UPDATE_AVAILABLE
    assert code(facts(release=release(2, rollout=0), force=True)) is VerdictCode.UPDATE_AVAILABLE
    # Never past the safety rules: the trial's fallback and the target's own checks.
    on_trial = initial("a").with_slot("a", SlotBoot("trial", 3, 1))
    assert code(facts(boot=on_trial, force=True)) is VerdictCode.WAITING_FOR_COMMIT
    mounted = facts(target_problem=SlotError("mounted"), force=True)
    assert code(mounted) is VerdictCode.SLOT_UNUSABLE


def test_unreadable_environment_matters_only_where_read() -> None:
    """An up-to-date host stays up to date with a torn env; an install needs the env."""
    broken = BootError("cannot read /boot/grub/grubenv")
    assert code(facts(release=RUNNING, boot=broken)) is VerdictCode.UP_TO_DATE
    with pytest.raises(BootError, match="cannot read"):
        decide(facts(boot=broken))


def test_decisions_are_pure() -> None:
    """The same facts give the same decision; deciding changes none of them."""
    f = facts(slots={"a": record(RUNNING)})
    before = dict(f.slots)
    assert decide(f) == decide(f)
    assert f.slots == before


def test_meta_only_verdicts_and_rollout_bucket() -> None:
    assert {VerdictCode.UP_TO_DATE, VerdictCode.DOWNGRADE_REFUSED} <= META_ONLY_VERDICTS
    assert decide(facts(release=RUNNING)).meta_only
    # Host-dependent refusals are decided afresh at the next check.
    assert not decide(facts(target_problem=SlotError("mounted"))).meta_only
    buckets = {rollout_bucket(f"host-{n}", "uuid-2") for n in range(400)}
    assert buckets <= set(range(100))
    assert len(buckets) > 90
    assert rollout_bucket("host-1", "uuid-2") == rollout_bucket("host-1", "uuid-2")
