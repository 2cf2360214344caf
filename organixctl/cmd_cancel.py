"""``organixctl cancel``: stop the running check or install (it resumes at the next check)."""

from __future__ import annotations

import argparse
from typing import Any

from organixctl.client import add_action_arguments, run_action


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_action_arguments(parser, "cancelled, or nothing was running")


def _describe(data: dict[str, Any]) -> str:
    if data.get("cancelled"):
        return "cancelled the running operation; the next check resumes an install"
    return "nothing was running"


def run(args: argparse.Namespace) -> int:
    return run_action(args, "/v1/cancel", _describe)
