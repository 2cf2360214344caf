"""``organixctl mark-good``: commit the booted slot (trial to good). Idempotent.

``organixm-mark-good.service`` runs it once ``boot-complete.target`` is reached.
"""

from __future__ import annotations

import argparse

from organixctl.client import add_action_arguments, run_action
from organixmd.apidef import MarkGoodAnswer, Route


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_action_arguments(parser, "the booted slot is committed (or already was)")


def _describe(data: MarkGoodAnswer) -> str:
    return f"slot {data['committed']} is committed; next boot: slot {data['next_slot']}"


def run(args: argparse.Namespace) -> int:
    return run_action(args, Route.MARK_GOOD, MarkGoodAnswer, _describe)
