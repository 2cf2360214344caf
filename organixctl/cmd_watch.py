"""``organixctl watch``: follow the daemon's events (phases, progress, verdicts) until Ctrl-C.

``--json`` prints each event line as the daemon sends it (NDJSON). Exit 0 on
Ctrl-C, 3 when the daemon goes away.
"""

from __future__ import annotations

import argparse
import sys

from organixctl.client import (
    Client,
    ClientError,
    add_epilog,
    add_json_argument,
    add_socket_argument,
    run_with_client,
)
from organixctl.cmd_update import ProgressView
from organixctl.exitcodes import Exit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json_argument(parser)
    add_socket_argument(parser)
    add_epilog(
        parser,
        {
            0: "interrupted with Ctrl-C",
            3: "the daemon is unreachable, or it stopped",
        },
    )


def run(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        view = ProgressView(sys.stdout, sys.stdout.isatty())
        try:
            for raw, event in client.events():
                if args.json:
                    sys.stdout.buffer.write(raw + b"\n")
                    sys.stdout.flush()
                else:
                    view.show(event)
        except KeyboardInterrupt:
            return Exit.OK
        finally:
            view.close()
        raise ClientError("the daemon closed the event stream (did it stop?)", Exit.UNREACHABLE)

    return run_with_client(args, body, timeout=None)
