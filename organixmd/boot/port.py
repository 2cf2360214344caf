"""The boot port: the host layer's one way to GRUB's environment.

The engine (read, stage, invalidate, raise the floor) and boot assessment (repair,
commit, mark bad, roll back) drive :class:`GrubBootPort`; neither reaches past it
to :class:`organixmd.boot.machine.BootControl`.
"""

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

    @property
    def directory(self) -> Path:
        """Where the environment's primary copy lives (the boot partition's grub/)."""
        return self.control.primary.parent

    def damaged(self) -> bool:
        return self.control.damaged()

    def repair(self, known_good_slot: SlotName) -> BootState:
        return self.control.repair(known_good_slot)

    def commit(self, booted: SlotName, serial: int | None) -> BootState:
        return self.control.commit(booted, serial)

    def mark_bad(self, slot: SlotName) -> BootState:
        return self.control.mark_bad(slot)

    def rollback(self) -> BootState:
        return self.control.rollback()

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
