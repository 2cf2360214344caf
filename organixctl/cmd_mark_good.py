"""``organixctl mark-good``: commit the booted slot (trial to good). Idempotent.

``organixm-mark-good.service`` runs it once ``boot-complete.target`` is reached.
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
)
from organixctl.exitcodes import Exit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json_argument(parser)
    add_socket_argument(parser)
    add_epilog(
        parser,
        {
            0: "the booted slot is committed (or already was)",
        },
    )


def run(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        answer = client.post("/v1/mark-good")
        if args.json:
            print_raw(answer)
        else:
            data = answer.json()
            committed, next_slot = data.get("committed"), data.get("next_slot")
            print(f"slot {committed} is committed; next boot: slot {next_slot}")
        return Exit.OK

    return run_with_client(args, body)
