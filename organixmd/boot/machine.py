"""Boot control: the A/B state machine kept in the GRUB environment block.

GRUB's side is ``organixmd/data/grub.cfg`` (rendered once by the installer with
:func:`render_grub_cfg`); this module is the Linux side. docs/boot.md draws the
state machine and lists every variable. In short::

    flip(b, 3)      b: trial xxx, order "b a"    (one environment write)
    GRUB boots b    b: trial xx, booted=b reason=trial try=1
    commit(b)       b: good                      (after boot-complete.target)
    ... or GRUB finds b: trial with no tries -> b: bad, order "a b", boots a
        with reason=fallback-tries-exhausted

The transitions are pure functions over :class:`BootState` (unit-tested without
files); :class:`BootControl` reads the two copies of the block and writes both
through :func:`organixmd.boot.grubenv.write_block` (temporary file, fsync, rename, journal
checkpoint). Its
methods block on fsync: the daemon calls them in a worker thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from organixmd.base.errors import BootError, SlotError
from organixmd.base.fsutil import write_atomic
from organixmd.base.slotname import SLOTS, SlotName, is_slot, other
from organixmd.boot import grubenv
from organixmd.release.meta import BootEntry

SlotState = Literal["good", "trial", "bad"]
#: GRUB counts tries as a string of "x" and reports the try number from a table up to 9.
MAX_TRIES = 9

#: Why GRUB booted what it booted (``organixm_reason``).
REASONS = (
    "committed",
    "trial",
    "fallback-tries-exhausted",
    "fallback-unusable",
    "fallback-bad",
    "fallback-load-failed",
    "default-env-unusable",
    "last-resort",
    "trial-unsaved",
    "no-usable-slot",
)

ENV_MARKER = "organixm_env"
ORDER = "organixm_order"
BOOTED = "organixm_booted"
REASON = "organixm_reason"
TRIAL_TRY = "organixm_trial_try"
#: The anti-rollback floor: the highest release serial committed on this host. Kept here,
#: not only in /var, so a lost state file cannot lower it. GRUB does not read it.
FLOOR = "organixm_floor"

_TRIES = re.compile(r"^x*$")


@dataclass(frozen=True, slots=True)
class SlotBoot:
    """One slot as GRUB sees it."""

    state: SlotState
    #: Trial boots GRUB may still start (``organixm_<slot>_tries``, a string of x).
    tries_left: int = 0
    #: Trial boots GRUB has started since the last flip (``organixm_<slot>_tried``).
    tries_used: int = 0


@dataclass(frozen=True, slots=True)
class BootState:
    """The whole boot environment: what GRUB will do next and what it did last."""

    order: tuple[SlotName, SlotName]
    a: SlotBoot
    b: SlotBoot
    #: GRUB's record of the last boot; ``None`` before the first boot after a rewrite.
    booted: SlotName | None = None
    reason: str | None = None
    trial_try: int | None = None
    #: Which copy was read: ``primary`` or ``backup`` (the primary was torn or missing).
    source: Literal["primary", "backup"] = "primary"
    #: No release with a lower serial is installed here (``organixm_floor``).
    floor: int = 0

    def slot(self, name: SlotName) -> SlotBoot:
        return self.a if name == "a" else self.b

    def with_slot(self, name: SlotName, value: SlotBoot) -> BootState:
        return replace(self, a=value) if name == "a" else replace(self, b=value)

    @property
    def next_slot(self) -> SlotName | None:
        """The slot GRUB picks at the next boot if both slots are usable."""
        for name in self.order:
            slot = self.slot(name)
            if slot.state == "good" or (slot.state == "trial" and slot.tries_left > 0):
                return name
        return None


# ---------------------------------------------------------------------------- env mapping


def state_from_env(variables: dict[str, str], *, source: str = "grubenv") -> BootState:
    """Read the organixm variables of an environment block.

    Raises :class:`BootError` when the block lacks the organixm marker or holds
    values GRUB's script would not accept (it would then use the backup copy).
    """
    if variables.get(ENV_MARKER) != "1":
        raise BootError(f"{source}: not an organixm boot environment (no {ENV_MARKER}=1)")
    order = tuple(variables.get(ORDER, "").split())
    if sorted(order) != ["a", "b"]:
        raise BootError(f"{source}: {ORDER}={variables.get(ORDER)!r} is not 'a b' or 'b a'")
    slots: dict[SlotName, SlotBoot] = {}
    for name in SLOTS:
        state = variables.get(f"organixm_{name}_state", "")
        tries = variables.get(f"organixm_{name}_tries", "")
        tried = variables.get(f"organixm_{name}_tried", "")
        if state not in ("good", "trial", "bad"):
            raise BootError(f"{source}: organixm_{name}_state={state!r} is not good|trial|bad")
        if not _TRIES.match(tries) or not _TRIES.match(tried):
            raise BootError(f"{source}: tries of slot {name} must be strings of 'x'")
        slots[name] = SlotBoot(state, len(tries), len(tried))  # type: ignore[arg-type]
    booted_raw = variables.get(BOOTED, "")
    try_raw = variables.get(TRIAL_TRY, "")
    floor_raw = variables.get(FLOOR, "")
    return BootState(
        order=(order[0], order[1]),  # type: ignore[arg-type]
        a=slots["a"],
        b=slots["b"],
        booted=booted_raw if is_slot(booted_raw) else None,
        reason=variables.get(REASON) or None,
        trial_try=int(try_raw) if try_raw.isdigit() else None,
        floor=int(floor_raw) if floor_raw.isdigit() and len(floor_raw) <= 19 else 0,
    )


def env_from_state(state: BootState) -> dict[str, str]:
    """The organixm variables for ``state`` (the decision record included)."""
    variables = {ENV_MARKER: "1", ORDER: " ".join(state.order)}
    for name in SLOTS:
        slot = state.slot(name)
        variables[f"organixm_{name}_state"] = slot.state
        variables[f"organixm_{name}_tries"] = "x" * slot.tries_left
        variables[f"organixm_{name}_tried"] = "x" * slot.tries_used
    variables[BOOTED] = state.booted or ""
    variables[REASON] = state.reason or ""
    variables[TRIAL_TRY] = "" if state.trial_try is None else str(state.trial_try)
    variables[FLOOR] = str(state.floor)
    return variables


# ---------------------------------------------------------------------------- transitions


def initial(good_slot: SlotName) -> BootState:
    """A fresh environment: ``good_slot`` committed and first; the other slot unknown (bad)."""
    return BootState(
        order=(good_slot, other(good_slot)),
        a=SlotBoot("good" if good_slot == "a" else "bad"),
        b=SlotBoot("good" if good_slot == "b" else "bad"),
        booted=good_slot,
        reason="committed",
    )


def flipped(
    state: BootState, target: SlotName, tries: int, *, booted: SlotName | None
) -> BootState:
    """``target`` on trial with ``tries`` boots, first in order.

    Refuses (:class:`SlotError`) a flip onto the booted slot, and a flip while the
    booted slot is itself on trial: it is then the fallback (invariant 4b).
    """
    if not 1 <= tries <= MAX_TRIES:
        raise SlotError(f"trial tries must be between 1 and {MAX_TRIES}, not {tries}")
    if booted is not None and target == booted:
        raise SlotError(
            f"refusing to flip to slot {target}: it is the booted slot",
            hint="updates go to the other slot; check organixm.slot on the kernel command line",
        )
    if booted is not None and state.slot(booted).state == "bad":
        raise SlotError(
            f"refusing to flip to slot {target}: the GRUB environment has the booted slot "
            f"{booted} marked bad, so slot {target} may be the only good one",
            hint="reboot so GRUB boots the slot its environment chooses",
        )
    if booted is not None and state.slot(booted).state == "trial":
        raise SlotError(
            f"refusing to flip to slot {target}: the booted slot {booted} is still on trial",
            hint="commit the running system first (organixctl mark-good)",
        )
    return replace(
        state.with_slot(target, SlotBoot("trial", tries, 0)),
        order=(target, other(target)),
    )


def committed(state: BootState, booted: SlotName) -> BootState:
    """``booted`` from trial to good. Idempotent: a good slot stays as it is.

    Refuses (:class:`SlotError`) unless GRUB recorded that it booted this slot, and
    refuses to commit a slot that is marked bad.
    """
    slot = state.slot(booted)
    if slot.state == "good":
        return state
    if slot.state == "bad":
        raise SlotError(
            f"cannot commit slot {booted}: it is marked bad",
            hint="flip to it again with a new release, or roll back",
        )
    if state.booted != booted:
        raise SlotError(
            f"cannot commit slot {booted}: GRUB recorded booting "
            f"{state.booted or 'nothing'} ({state.reason or 'no reason recorded'})",
            hint="commit only from the system that booted the trial slot",
        )
    return replace(state.with_slot(booted, SlotBoot("good")), order=(booted, other(booted)))


def raised_floor(state: BootState, serial: int) -> BootState:
    """The anti-rollback floor at least ``serial``; it is never lowered."""
    return replace(state, floor=max(state.floor, serial))


def marked_bad(state: BootState, slot: SlotName) -> BootState:
    """``slot`` bad and last in order. Idempotent."""
    return replace(state.with_slot(slot, SlotBoot("bad")), order=(other(slot), slot))


def rolled_back(state: BootState, booted: SlotName) -> BootState:
    """The other slot first again; it must be good (a committed earlier system)."""
    target = other(booted)
    if state.slot(target).state != "good":
        raise SlotError(
            f"cannot roll back to slot {target}: it is {state.slot(target).state}, not good",
            hint="only a slot that was committed can be rolled back to",
        )
    return replace(state, order=(target, booted))


@dataclass(frozen=True, slots=True)
class Decision:
    """What GRUB does at the next boot, and the environment it saves before booting."""

    slot: SlotName | None
    reason: str
    trial_try: int | None
    after: BootState


def predict_boot(state: BootState, usable: dict[SlotName, bool]) -> Decision:
    """What grub.cfg decides for ``state`` when the slots' usability is ``usable``.

    The same rules as the GRUB script, step for step (the grub-emu tests hold the
    two together): the first slot in order that is good, or on trial with tries
    left (one is consumed), wins; a trial without tries turns bad; an unusable
    slot is skipped keeping its tries; with no candidate any usable slot boots
    (``last-resort``). Used by status output to say what the next boot will do.
    """
    slots = {"a": state.a, "b": state.b}
    chosen: SlotName | None = None
    reason = ""
    skip = ""
    changed = False
    for name in state.order:
        if chosen is not None:
            break
        slot = slots[name]
        if slot.state == "trial":
            if slot.tries_left == 0:
                slots[name] = SlotBoot("bad", 0, slot.tries_used)
                changed = True
                skip = skip or "tries-exhausted"
            elif not usable[name]:
                skip = skip or "unusable"
            else:
                slots[name] = SlotBoot("trial", slot.tries_left - 1, slot.tries_used + 1)
                changed = True
                chosen, reason = name, "trial"
        elif slot.state == "good":
            if not usable[name]:
                skip = skip or "unusable"
            else:
                chosen, reason = name, (f"fallback-{skip}" if skip else "committed")
        else:
            skip = skip or "bad"
    if chosen is None:
        chosen = next((name for name in state.order if usable[name]), None)
        reason = "last-resort" if chosen is not None else "no-usable-slot"
    order = state.order
    if changed and chosen is not None:
        if slots["a"].state == "bad":
            order = ("b", "a")
        if slots["b"].state == "bad":
            order = ("a", "b")
    trial_try = slots[chosen].tries_used if chosen is not None and reason == "trial" else None
    after = replace(
        state,
        order=order,
        a=slots["a"],
        b=slots["b"],
        booted=chosen,
        reason=reason,
        trial_try=trial_try,
    )
    return Decision(chosen, reason, trial_try, after)


# ---------------------------------------------------------------------------- files


class BootControl:
    """The boot environment on disk: a primary block and a backup copy.

    GRUB reads the primary and falls back to the backup when the primary is torn
    or missing; every write here rewrites both, primary first, each crash-safe.
    ``booted`` is the slot the running kernel came from (``organixm.slot=`` on its
    command line); when ``None`` GRUB's own record in the block is used.
    Methods block (fsync): call them from a worker thread in the daemon.
    """

    def __init__(self, grubenv_path: Path, backup_path: Path, *, booted: SlotName | None = None):
        self.primary = grubenv_path
        self.backup = backup_path
        self._booted = booted

    def _read_one(self, path: Path) -> tuple[dict[str, str], BootState]:
        variables = grubenv.read(path)
        return variables, state_from_env(variables, source=str(path))

    def _read_any(self) -> tuple[dict[str, str], BootState]:
        try:
            return self._read_one(self.primary)
        except BootError as primary_error:
            try:
                variables, state = self._read_one(self.backup)
            except BootError as exc:
                raise BootError(
                    f"no usable boot environment: {primary_error.message}; {exc.message}",
                    hint="recreate it from the booted slot (BootControl.repair)",
                ) from exc
            return variables, replace(state, source="backup")

    def read(self) -> BootState:
        """The current state, from the primary block or else the backup.

        Raises :class:`BootError` when neither copy is a valid organixm block.
        """
        return self._read_any()[1]

    def booted_slot(self, state: BootState) -> SlotName | None:
        return self._booted if self._booted is not None else state.booted

    def _write(self, base: dict[str, str], state: BootState) -> BootState:
        # Other tools' variables in the block are kept; ours are rewritten. A name a torn
        # block made up (holding a newline) is dropped: it cannot be written back.
        kept = {name: value for name, value in base.items() if grubenv.valid_name(name)}
        variables = grubenv.updated(kept, env_from_state(state))
        block = grubenv.render(variables, source=str(self.primary))
        grubenv.write_block(self.primary, block)
        grubenv.write_block(self.backup, block)
        return replace(state, source="primary")

    def flip(self, target: SlotName, tries: int) -> BootState:
        """One write: ``target`` first, on trial with ``tries`` boots."""
        variables, state = self._read_any()
        return self._write(variables, flipped(state, target, tries, booted=self.booted_slot(state)))

    def commit(self, booted: SlotName, serial: int | None = None) -> BootState:
        """Trial to good for the slot that booted on trial, and the floor raised to the
        committed release's ``serial`` (``None``: a seed-format release has none), in one
        write. Idempotent (no write if good and the floor is already there)."""
        variables, state = self._read_any()
        new = committed(state, booted)
        if serial is not None:
            new = raised_floor(new, serial)
        if new == state and state.source == "primary" and self._backup_agrees(state):
            return state
        return self._write(variables, new)

    def raise_floor(self, serial: int) -> BootState:
        """The floor at least ``serial``; no write when it is already there."""
        variables, state = self._read_any()
        if serial <= state.floor and state.source == "primary":
            return state
        return self._write(variables, raised_floor(state, serial))

    def _backup_agrees(self, state: BootState) -> bool:
        """Whether the backup offers GRUB the same slots as ``state`` (GRUB's records of
        its last boot aside: GRUB saves those to the primary alone). A commit killed
        between its two renames leaves a backup that still offers the trial."""
        try:
            backup = self._read_one(self.backup)[1]
        except BootError:
            return False
        return (backup.order, backup.a, backup.b) == (state.order, state.a, state.b)

    def mark_bad(self, slot: SlotName) -> BootState:
        """``slot`` bad and last in order."""
        variables, state = self._read_any()
        return self._write(variables, marked_bad(state, slot))

    def rollback(self) -> BootState:
        """Put the other (good) slot first; the running one stays good as a fallback."""
        variables, state = self._read_any()
        booted = self.booted_slot(state)
        if booted is None:
            raise SlotError("cannot roll back: unknown booted slot", hint="reboot first")
        return self._write(variables, rolled_back(state, booted))

    def initialize(self, good_slot: SlotName) -> BootState:
        """A fresh environment (installer): ``good_slot`` committed, the other bad."""
        return self._write({}, initial(good_slot))

    def intact(self) -> bool:
        """Both copies are whole blocks GRUB can load and save into, holding the same."""
        try:
            blocks = [self.primary.read_bytes(), self.backup.read_bytes()]
        except OSError:
            return False
        if not all(grubenv.is_canonical(block) for block in blocks):
            return False
        return grubenv.parse(blocks[0]) == grubenv.parse(blocks[1])

    def damaged(self) -> bool:
        """Whether a copy is missing, unreadable, or not exactly a block GRUB can save
        into. Copies that merely differ are not damaged: GRUB saves its decisions into
        the primary alone, so after every boot the backup is older."""
        try:
            blocks = [self.primary.read_bytes(), self.backup.read_bytes()]
        except OSError:
            return True
        return not all(grubenv.is_canonical(block) for block in blocks)

    def repair(self, known_good_slot: SlotName) -> BootState:
        """Make both copies valid again. Idempotent.

        A valid copy is kept (and copied over a broken one); with neither valid, the
        environment is recreated with ``known_good_slot`` committed.
        """
        for path in (self.primary, self.backup):
            try:
                variables, state = self._read_one(path)
            except BootError:
                continue
            if self.intact():
                return state
            return self._write(variables, state)
        return self.initialize(known_good_slot)


# ---------------------------------------------------------------------------- GRUB side


def booted_slot_from_cmdline(cmdline: str) -> SlotName | None:
    """The ``organixm.slot=`` value GRUB put on the kernel command line, if any.

    The one parser of it (the daemon's :func:`organixmd.install.slots.booted_slot` uses it):
    the FIRST occurrence wins, since GRUB's words come before a release's params.
    An invalid first value means unknown; a later occurrence is never consulted.
    """
    for word in cmdline.split():
        if word.startswith("organixm.slot="):
            value = word.partition("=")[2]
            return value if is_slot(value) else None
    return None


def render_grub_cfg(
    *,
    boot_uuid: str,
    slot_a_part: int,
    slot_b_part: int,
    default_order: tuple[SlotName, SlotName] = ("a", "b"),
    grubenv_path: str = "/grub/grubenv",
    grubenv_backup_path: str = "/grub/grubenv.bak",
) -> str:
    """The static grub.cfg for one disk (paths are inside the boot partition)."""
    if not re.fullmatch(r"[0-9a-fA-F-]{8,36}", boot_uuid):
        raise BootError(f"boot partition UUID {boot_uuid!r} is not a file system UUID")
    if sorted(default_order) != ["a", "b"]:
        raise BootError(f"default order {default_order!r} must name slots a and b once each")
    for path in (grubenv_path, grubenv_backup_path):
        if not re.fullmatch(r"/[A-Za-z0-9._/-]+", path):
            raise BootError(f"environment path {path!r} must be absolute, without spaces")
    template = (Path(__file__).parents[1] / "data" / "grub.cfg").read_text()
    values = {
        "boot_uuid": boot_uuid,
        "slot_a_part": str(slot_a_part),
        "slot_b_part": str(slot_b_part),
        "default_order": " ".join(default_order),
        "grubenv": grubenv_path,
        "grubenv_backup": grubenv_backup_path,
    }
    rendered = re.sub(r"@([a-z_]+)@", lambda match: values[match.group(1)], template)
    return rendered


def boot_env(entry: BootEntry) -> dict[str, str]:
    """The variables a slot image carries in ``/organixm/boot.env`` for GRUB."""
    return {
        "organixm_kernel": entry.kernel,
        "organixm_initrd": entry.initrd,
        "organixm_init": entry.init,
        "organixm_params": " ".join(entry.params),
    }


def write_boot_env(path: Path, entry: BootEntry) -> None:
    """Write ``entry`` as a GRUB environment block at ``path`` (inside a slot image tree)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, grubenv.render(boot_env(entry), source=str(path)))
