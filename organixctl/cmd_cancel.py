"""``organixctl cancel``: stop the running check or install (it resumes at the next check)."""

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
            0: "cancelled, or nothing was running",
        },
    )


def run(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        answer = client.post("/v1/cancel")
        if args.json:
            print_raw(answer)
        elif answer.json().get("cancelled"):
            print("cancelled the running operation; the next check resumes an install")
        else:
            print("nothing was running")
        return Exit.OK

    return run_with_client(args, body)
