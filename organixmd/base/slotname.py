"""The one slot-name type: the two root slots are called ``a`` and ``b``."""

from __future__ import annotations

from typing import Literal, TypeGuard

SlotName = Literal["a", "b"]
SLOTS: tuple[SlotName, SlotName] = ("a", "b")


def is_slot(value: str) -> TypeGuard[SlotName]:
    return value in SLOTS


def other(slot: SlotName) -> SlotName:
    return "b" if slot == "a" else "a"
