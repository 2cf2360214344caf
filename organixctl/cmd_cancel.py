"""``organixctl cancel``: stop the running check or install (it resumes at the next check)."""

from __future__ import annotations

import argparse

from organixctl.client import add_action_arguments, run_action
from organixmd.apidef import CancelAnswer, Route


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_action_arguments(parser, "cancelled, or nothing was running")


def _describe(data: CancelAnswer) -> str:
    if data["cancelled"]:
        return "cancelled the running operation; the next check resumes an install"
    return "nothing was running"


def run(args: argparse.Namespace) -> int:
    return run_action(args, Route.CANCEL, CancelAnswer, _describe)
