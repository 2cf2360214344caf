"""``organixctl check``: ask the daemon to check for a release now (installs nothing).

Exit code by the verdict: 0 up to date, 1 an update is available or staged,
2 blocked or failed (the message and code say why).
"""

from __future__ import annotations

import argparse

from organixctl.client import (
    Client,
    add_epilog,
    add_json_argument,
    add_socket_argument,
    print_raw,
    run_with_client,
    verdict_exit,
)
from organixctl.cmd_update import print_verdict
from organixmd.apidef import CheckAnswer, Route


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="report a release as installable even if it failed before, is a lower serial "
        "or is outside the rollout percentage",
    )
    add_json_argument(parser)
    add_socket_argument(parser)
    add_epilog(
        parser,
        {
            0: "up to date",
            1: "an update is available or staged",
            2: "the check was blocked or failed, or the daemon answered an error",
        },
    )


def run(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        answer = client.post(Route.CHECK, {"force": args.force})
        verdict = answer.document(CheckAnswer)["verdict"]
        if args.json:
            print_raw(answer)
        else:
            print_verdict(verdict)
        return verdict_exit(verdict["outcome"])

    return run_with_client(args, body)
