"""``organixctl rollback``: boot the other committed slot at the next reboot.

The running slot stays good, so it remains the fallback. Refused (exit 2) when
the other slot is not a committed, good slot.
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
            0: "the other slot boots next",
        },
    )


def run(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        answer = client.post("/v1/rollback")
        if args.json:
            print_raw(answer)
        else:
            print(f"next boot: slot {answer.json().get('next_slot')} (reboot to roll back)")
        return Exit.OK

    return run_with_client(args, body)
