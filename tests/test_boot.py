"""organixmd.boot: the boot state machine, its environment files and grub.cfg rendering."""

from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

import pytest

from organixmd.base.errors import BootError, SlotError
from organixmd.base.slotname import SlotName
from organixmd.boot import grubenv
from organixmd.boot import machine as boot
from organixmd.boot.machine import BootControl, BootState, SlotBoot
from organixmd.release.meta import BootEntry

DATA = Path(boot.__file__).parents[1] / "data"
UUID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def fresh(good: SlotName = "a") -> BootState:
    return boot.initial(good)


@pytest.fixture
def control(tmp_path: Path) -> BootControl:
    ctl = BootControl(tmp_path / "grubenv", tmp_path / "grubenv.bak")
    ctl.initialize("a")
    return ctl


# ---------------------------------------------------------------------------- pure


def test_env_round_trip_keeps_every_field() -> None:
    """A state written to variables and read back is the same state."""
    state = BootState(
        order=("b", "a"),
        a=SlotBoot("good"),
        b=SlotBoot("trial", 2, 1),
        booted="b",
        reason="trial",
        trial_try=1,
    )
    variables = boot.env_from_state(state)
    assert variables["organixm_b_tries"] == "xx"
    assert variables["organixm_order"] == "b a"
    assert boot.state_from_env(variables) == state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"organixm_env": ""}, "not an organixm boot environment"),
        ({"organixm_order": "a a"}, "organixm_order"),
        ({"organixm_a_state": "maybe"}, "good|trial|bad"),
        ({"organixm_b_tries": "3"}, "strings of 'x'"),
    ],
)
def test_invalid_environment_is_refused(change: dict[str, str], message: str) -> None:
    """Values GRUB's script would not accept make the copy invalid, naming the variable."""
    variables = {**boot.env_from_state(fresh()), **change}
    with pytest.raises(BootError, match=message):
        boot.state_from_env(variables)


def test_initial_commits_good_slot_and_distrusts_the_other() -> None:
    """A fresh environment boots the installed slot; the other is bad until written."""
    state = fresh("b")
    assert state.order == ("b", "a")
    assert (state.a.state, state.b.state) == ("bad", "good")
    assert state.next_slot == "b"


def test_flip_puts_target_first_on_trial() -> None:
    """A flip is one state change: target trial with N tries, first in order."""
    state = boot.flipped(fresh("a"), "b", 3, booted="a")
    assert state.order == ("b", "a")
    assert state.b == SlotBoot("trial", 3, 0)
    assert state.a == SlotBoot("good")


def test_flip_onto_booted_slot_is_refused() -> None:
    """The booted slot is never the flip target (invariant 1)."""
    with pytest.raises(SlotError, match="booted slot"):
        boot.flipped(fresh("a"), "a", 3, booted="a")


def test_flip_while_booted_slot_on_trial_is_refused() -> None:
    """While the running slot is on trial the other one is its fallback (invariant 4b)."""
    on_trial = boot.flipped(fresh("a"), "b", 3, booted="a")
    with pytest.raises(SlotError, match="still on trial"):
        boot.flipped(on_trial, "a", 3, booted="b")


def test_flip_while_booted_slot_is_bad_is_refused() -> None:
    """A running slot the env marks bad: the target may be the only good slot (defect 4)."""
    with pytest.raises(SlotError, match="marked bad"):
        boot.flipped(fresh("a"), "a", 3, booted="b")


def test_floor_is_only_ever_raised() -> None:
    """organixm_floor never goes down, and survives the env mapping."""
    state = boot.raised_floor(fresh("a"), 7)
    assert boot.raised_floor(state, 3).floor == 7
    assert boot.state_from_env(boot.env_from_state(state)).floor == 7


@pytest.mark.parametrize("tries", [0, boot.MAX_TRIES + 1])
def test_flip_tries_out_of_range_are_refused(tries: int) -> None:
    """GRUB can count 1 to 9 tries; anything else is refused."""
    with pytest.raises(SlotError, match="between 1 and"):
        boot.flipped(fresh(), "b", tries, booted="a")


def test_commit_requires_that_grub_booted_the_trial_slot() -> None:
    """A trial slot is committed only if GRUB recorded booting it."""
    flipped = boot.flipped(fresh("a"), "b", 3, booted="a")
    with pytest.raises(SlotError, match="GRUB recorded booting a"):
        boot.committed(flipped, "b")
    booted = boot.predict_boot(flipped, {"a": True, "b": True}).after
    state = boot.committed(booted, "b")
    assert state.b == SlotBoot("good")
    assert state.order == ("b", "a")


def test_commit_is_idempotent_and_refuses_bad_slot() -> None:
    """Committing a good slot changes nothing; a bad slot cannot be committed."""
    state = fresh("a")
    assert boot.committed(state, "a") is state
    with pytest.raises(SlotError, match="marked bad"):
        boot.committed(state, "b")


def test_mark_bad_moves_slot_last() -> None:
    """A bad slot goes last in order and loses its tries."""
    state = boot.marked_bad(boot.flipped(fresh("a"), "b", 3, booted="a"), "b")
    assert state.order == ("a", "b")
    assert state.b == SlotBoot("bad")


def test_rollback_needs_a_good_other_slot() -> None:
    """Rollback puts the other slot first only when it was committed."""
    with pytest.raises(SlotError, match="not good"):
        boot.rolled_back(fresh("a"), "a")
    both_good = BootState(order=("b", "a"), a=SlotBoot("good"), b=SlotBoot("good"))
    assert boot.rolled_back(both_good, "b").order == ("a", "b")


@pytest.mark.parametrize(
    ("state", "usable", "slot", "reason"),
    [
        (BootState(("b", "a"), SlotBoot("good"), SlotBoot("trial", 1)), (True, True), "b", "trial"),
        (
            BootState(("b", "a"), SlotBoot("good"), SlotBoot("trial", 0, 3)),
            (True, True),
            "a",
            "fallback-tries-exhausted",
        ),
        (
            BootState(("b", "a"), SlotBoot("good"), SlotBoot("trial", 2)),
            (True, False),
            "a",
            "fallback-unusable",
        ),
        (
            BootState(("a", "b"), SlotBoot("bad"), SlotBoot("bad")),
            (False, True),
            "b",
            "last-resort",
        ),
        (
            BootState(("a", "b"), SlotBoot("bad"), SlotBoot("bad")),
            (False, False),
            None,
            "no-usable-slot",
        ),
    ],
)
def test_predict_boot_names_slot_and_reason(
    state: BootState, usable: tuple[bool, bool], slot: str | None, reason: str
) -> None:
    """The prediction of GRUB's choice names the slot and the reason (grub-emu checks it all)."""
    decision = boot.predict_boot(state, {"a": usable[0], "b": usable[1]})
    assert (decision.slot, decision.reason) == (slot, reason)


def test_predict_boot_consumes_a_try_and_counts_it() -> None:
    """A trial boot consumes one try and records which try it is."""
    state = BootState(("b", "a"), SlotBoot("good"), SlotBoot("trial", 3, 1))
    decision = boot.predict_boot(state, {"a": True, "b": True})
    assert decision.after.b == SlotBoot("trial", 2, 2)
    assert decision.trial_try == 2


# ---------------------------------------------------------------------------- files


def test_initialize_writes_two_identical_grub_readable_copies(control: BootControl) -> None:
    """Both copies are valid GRUB blocks with the same content, as grub-editenv lists it."""
    assert control.primary.read_bytes() == control.backup.read_bytes()
    listed = subprocess.run(
        ["grub-editenv", str(control.primary), "list"], capture_output=True, text=True, check=True
    ).stdout
    assert "organixm_env=1\n" in listed
    assert "organixm_a_state=good\n" in listed


def test_flip_writes_both_copies_and_keeps_foreign_variables(control: BootControl) -> None:
    """A flip rewrites both copies; variables of other tools in the block survive."""
    subprocess.run(["grub-editenv", str(control.primary), "set", "saved_entry=x"], check=True)
    state = control.flip("b", 3)
    assert state.b == SlotBoot("trial", 3, 0)
    assert control.read() == state
    assert grubenv.read(control.primary)["saved_entry"] == "x"
    assert control.primary.read_bytes() == control.backup.read_bytes()


def test_flip_uses_grubs_record_of_the_booted_slot(control: BootControl) -> None:
    """Without an explicit booted slot, GRUB's record decides which slot is running."""
    with pytest.raises(SlotError, match="booted slot"):
        control.flip("a", 3)


def test_explicit_booted_slot_overrides_the_record(tmp_path: Path) -> None:
    """The kernel command line's slot wins over a stale record in the block."""
    ctl = BootControl(tmp_path / "grubenv", tmp_path / "grubenv.bak", booted="b")
    ctl.initialize("a")
    with pytest.raises(SlotError, match="booted slot"):
        ctl.flip("b", 2)


def test_commit_of_good_slot_does_not_write(control: BootControl) -> None:
    """Commit is idempotent: a good slot causes no write at all."""
    inode = control.primary.stat().st_ino
    assert control.commit("a").a == SlotBoot("good")
    assert control.primary.stat().st_ino == inode


def test_commit_cut_between_its_renames_is_completed(control: BootControl) -> None:
    """A commit killed after the primary's rename left the backup on trial (GRUB's copy when
    the primary is torn): committing again writes the backup too."""
    control.flip("b", 3)
    trial = boot.predict_boot(control.read(), {"a": True, "b": True}).after
    grubenv.write_block(
        control.primary, grubenv.render(boot.env_from_state(boot.committed(trial, "b")))
    )
    grubenv.write_block(control.backup, grubenv.render(boot.env_from_state(trial)))
    assert control.commit("b").b == SlotBoot("good")
    assert grubenv.read(control.backup) == grubenv.read(control.primary)


def test_read_falls_back_to_backup_when_primary_is_torn(control: BootControl) -> None:
    """A torn primary is reported and the backup's state is used."""
    with open(control.primary, "r+b") as handle:
        handle.write(b"\0" * 100)
    state = control.read()
    assert state.source == "backup"
    assert state.next_slot == "a"


def test_read_with_both_copies_broken_is_a_boot_error(control: BootControl) -> None:
    """Neither copy valid: BootError naming both problems."""
    control.primary.unlink()
    control.backup.write_bytes(b"junk")
    with pytest.raises(BootError, match="no usable boot environment"):
        control.read()


def test_repair_copies_the_valid_copy_over_the_broken_one(control: BootControl) -> None:
    """Repair keeps the surviving state (a pending flip included) in both copies."""
    control.flip("b", 2)
    control.primary.write_bytes(b"\0" * 1024)
    state = control.repair("a")
    assert state.b == SlotBoot("trial", 2, 0)
    assert control.primary.read_bytes() == control.backup.read_bytes()
    assert control.read().source == "primary"


def test_repair_recreates_a_missing_environment_from_known_good_slot(tmp_path: Path) -> None:
    """With no copy at all, repair writes a fresh environment with the known-good slot."""
    ctl = BootControl(tmp_path / "grubenv", tmp_path / "grubenv.bak")
    state = ctl.repair("b")
    assert (state.order, state.b.state, state.a.state) == (("b", "a"), "good", "bad")
    assert ctl.repair("b") == state


# ---------------------------------------------------------------------------- GRUB side


def test_render_grub_cfg_fills_every_placeholder() -> None:
    """The rendered config names the UUID and slot partitions and has no placeholder left."""
    text = boot.render_grub_cfg(
        boot_uuid=UUID, slot_a_part=4, slot_b_part=5, default_order=("b", "a")
    )
    assert "@" not in text.replace("organixm", "")
    assert f"--set=organixm_bootdev {UUID}" in text
    assert 'organixm_a_dev="($organixm_disk,gpt4)"' in text
    assert 'set organixm_order="b a"' in text
    subprocess.run(["grub-script-check"], input=text.encode(), check=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"boot_uuid": "LABEL=x"},
        {"default_order": ("a", "a")},
        {"grubenv_path": "/grub/grub env"},
    ],
)
def test_render_grub_cfg_refuses_values_that_would_break_the_script(
    kwargs: dict[str, object],
) -> None:
    """Values that GRUB script would misparse are refused before rendering."""
    arguments: dict[str, object] = {"boot_uuid": UUID, "slot_a_part": 4, "slot_b_part": 5, **kwargs}
    with pytest.raises(BootError):
        boot.render_grub_cfg(**arguments)  # type: ignore[arg-type]


def test_boot_env_is_a_grub_env_block_with_the_entry(tmp_path: Path) -> None:
    """A slot's boot entry is a GRUB env block grub-editenv reads."""
    entry = BootEntry(kernel="/boot/k", initrd="/boot/i", init="/init", params=["a=1", "quiet"])
    path = tmp_path / "organixm" / "boot.env"
    boot.write_boot_env(path, entry)
    listed = subprocess.run(
        ["grub-editenv", str(path), "list"], capture_output=True, text=True, check=True
    ).stdout
    assert listed == (
        "organixm_kernel=/boot/k\norganixm_initrd=/boot/i\norganixm_init=/init\n"
        "organixm_params=a=1 quiet\n"
    )


@pytest.mark.parametrize(
    ("cmdline", "slot"),
    [
        ("BOOT_IMAGE=/k organixm.slot=b init=/init quiet", "b"),
        ("organixm.slot=c", None),
        ("quiet", None),
        ("organixm.slot=a quiet organixm.slot=b", "a"),
        ("organixm.slot=c organixm.slot=b", None),
    ],
)
def test_booted_slot_from_cmdline(cmdline: str, slot: str | None) -> None:
    """The slot GRUB booted is read from organixm.slot= on the kernel command line."""
    assert boot.booted_slot_from_cmdline(cmdline) == slot


def test_assessment_units_commit_after_boot_complete_and_mark_bad_on_failure() -> None:
    """mark-good requires and follows boot-complete.target; mark-bad runs organixctl mark-bad."""
    good = configparser.ConfigParser(strict=False)
    good.read(DATA / "systemd" / "organixm-mark-good.service")
    assert "boot-complete.target" in good["Unit"]["Requires"]
    assert "boot-complete.target" in good["Unit"]["After"]
    assert good["Service"]["ExecStart"] == "organixctl mark-good"
    assert good["Service"]["Type"] == "oneshot"
    # A commit cut short by a daemon restart is retried; a refusal is not.
    assert good["Service"]["Restart"] == "on-failure"
    assert good["Service"]["RestartPreventExitStatus"].split() == ["4", "64"]
    assert int(good["Unit"]["StartLimitBurst"]) > 1
    bad = configparser.ConfigParser(strict=False)
    bad.read(DATA / "systemd" / "organixm-mark-bad.service")
    assert bad["Service"]["ExecStart"] == "organixctl mark-bad"


def test_commit_raises_the_floor_in_the_same_write(control: BootControl) -> None:
    """Committing a trial with its release's serial sets organixm_floor in both copies."""
    control.flip("b", 3)
    decision = boot.predict_boot(control.read(), {"a": True, "b": True})
    variables = grubenv.updated(grubenv.read(control.primary), boot.env_from_state(decision.after))
    for path in (control.primary, control.backup):
        grubenv.write_block(path, grubenv.render(variables))
    control.commit("b", 5)
    for path in (control.primary, control.backup):
        assert grubenv.read(path)["organixm_floor"] == "5"
    assert control.raise_floor(4).floor == 5


def test_repair_drops_a_name_a_torn_block_made_up(control: BootControl) -> None:
    """A block torn mid-name ("organixm_b_t" + newline + the old bytes) parses into a
    variable named with a newline; repair writes the block back without it."""
    old = control.primary.read_bytes()
    control.flip("b", 3)
    new = control.primary.read_bytes()
    cut = new.index(b"organixm_b_tried") + len(b"organixm_b_t")
    torn = new[:cut] + old[cut:]
    assert any("\n" in name for name in grubenv.parse(torn))
    control.primary.write_bytes(torn)
    assert not control.intact()
    control.repair("a")
    assert control.intact()
