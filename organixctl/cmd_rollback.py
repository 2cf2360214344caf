"""``organixctl rollback``: boot the other committed slot at the next reboot.

The running slot stays good, so it remains the fallback; its release is
remembered as rolled back and not installed again until a newer serial is
published. Refused (exit 2) when the other slot is not a committed, good slot.
"""

from __future__ import annotations

import argparse

from organixctl.client import add_action_arguments, run_action
from organixmd.apidef import RollbackAnswer, Route


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_action_arguments(parser, "the other slot boots next")


def _describe(data: RollbackAnswer) -> str:
    return f"next boot: slot {data['next_slot']} (reboot to roll back)"


def run(args: argparse.Namespace) -> int:
    return run_action(args, Route.ROLLBACK, RollbackAnswer, _describe)
