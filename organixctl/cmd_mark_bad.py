"""``organixctl mark-bad``: the booted slot failed; mark it bad and remember its release.

Only a slot on trial is failed (a unit failing on a committed system does not
demote the known-good slot); ``--force`` demotes a committed slot too.

The release is never installed again (until a newer serial or ``update --force``);
the daemon reboots into the other slot if its reboot policy allows.
``organixm-mark-bad.service`` runs it when a success unit fails.
"""

from __future__ import annotations

import argparse

from organixctl.client import add_action_arguments, run_action
from organixmd.apidef import MarkBadAnswer, Route


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reason",
        default="marked bad by an admin",
        help="why (kept with the failed release, shown by status and history; "
        "at most 200 characters)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="also demote a committed (good) slot; without it only a slot on trial is failed",
    )
    add_action_arguments(parser, "the booted slot is marked bad")


def _describe(data: MarkBadAnswer) -> str:
    then = "rebooting now" if data["rebooting"] else "reboot to leave it"
    return f"slot {data['marked_bad']} is marked bad; next boot: slot {data['next_slot']} ({then})"


def run(args: argparse.Namespace) -> int:
    return run_action(
        args,
        Route.MARK_BAD,
        MarkBadAnswer,
        _describe,
        {"reason": args.reason, "force": args.force},
    )
