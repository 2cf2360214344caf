"""The engine's and daemon's adapter onto :class:`organixmd.boot.machine.BootControl`."""

from __future__ import annotations

from pathlib import Path

from organixmd.base.errors import BootError
from organixmd.base.slotname import SlotName
from organixmd.boot import grubenv
from organixmd.boot.machine import BootControl, BootState, state_from_env


class GrubBootPort:
    """Boot control through the GRUB environment block (primary and backup copy).

    Methods block on fsync; the engine calls the writing ones in a worker thread.
    """

    def __init__(self, primary: Path, backup: Path, booted: SlotName | None) -> None:
        self.control = BootControl(primary, backup, booted=booted)
        self.booted = booted

    def read(self) -> BootState:
        return self.control.read()

    def booted_on_trial(self, booted: SlotName) -> bool:
        return self.control.read().slot(booted).state == "trial"

    def disagreement(self, booted: SlotName) -> str | None:
        state = self.control.read()
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

    def floor(self) -> int:
        return self.control.read().floor

    def raise_floor(self, booted: SlotName, serial: int) -> None:
        # Only a committed slot's release sets the floor: a trial may still fail.
        if self.control.read().slot(booted).state == "good":
            self.control.raise_floor(serial)

    def stage(self, target: SlotName, tries: int) -> None:
        self.control.flip(target, tries)

    def invalidate(self, target: SlotName) -> None:
        # Both copies count: a write killed between the primary's rename and the backup's
        # leaves the backup calling ``target`` bootable, and GRUB reads the backup whenever
        # the primary is torn. Either one not saying bad means both are written again.
        if any(state.slot(target).state != "bad" for state in self._copies()):
            self.control.mark_bad(target)

    def _copies(self) -> list[BootState]:
        """The states of the copies GRUB could read (a torn or missing copy is skipped)."""
        states = []
        for path in (self.control.primary, self.control.backup):
            try:
                states.append(state_from_env(grubenv.read(path), source=str(path)))
            except BootError:
                continue
        return states or [self.control.read()]
