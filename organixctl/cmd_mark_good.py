"""``organixctl mark-good``: commit the booted slot (trial to good). Idempotent.

``organixm-mark-good.service`` runs it once ``boot-complete.target`` is reached.
"""

from __future__ import annotations

import argparse
from typing import Any

from organixctl.client import add_action_arguments, run_action


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_action_arguments(parser, "the booted slot is committed (or already was)")


def _describe(data: dict[str, Any]) -> str:
    return f"slot {data.get('committed')} is committed; next boot: slot {data.get('next_slot')}"


def run(args: argparse.Namespace) -> int:
    return run_action(args, "/v1/mark-good", _describe)
