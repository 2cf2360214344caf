"""``organixctl history``: past installs, flips, commits, fallbacks; releases that failed."""

from __future__ import annotations

import argparse

from organixctl.client import (
    Client,
    add_epilog,
    add_json_argument,
    add_socket_argument,
    describe_release,
    parse_time,
    print_raw,
    run_with_client,
)
from organixctl.exitcodes import Exit
from organixmd.apidef import HistoryDoc, Route


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-n",
        "--last",
        type=int,
        default=0,
        metavar="N",
        help="show only the last N entries (default: all the daemon keeps, up to 200)",
    )
    add_json_argument(parser)
    add_socket_argument(parser)
    add_epilog(
        parser,
        {
            0: "printed",
        },
    )


def _when(value: str) -> str:
    moment = parse_time(value)
    return f"{moment:%Y-%m-%d %H:%M:%S}Z" if moment else "?"


def render(data: HistoryDoc, last: int = 0) -> str:
    entries = data["history"]
    if last > 0:
        entries = entries[-last:]
    lines = []
    for entry in entries:
        slot = f"slot {entry['slot']}" if entry["slot"] else ""
        release = describe_release(entry["release"]) if entry["release"] else ""
        parts = [p for p in (slot, release, entry["detail"]) if p]
        lines.append(f"{_when(entry['at'])}  {entry['event']:<16} {'  '.join(parts)}")
    if not lines:
        lines.append("no history yet")
    failed = data["failed"]
    if failed:
        lines.append("")
        lines.append("Releases that failed (not installed again unless forced or superseded):")
        for failure in failed:
            lines.append(
                f"{_when(failure['at'])}  {describe_release(failure['release'])}: "
                f"{failure['reason']}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        answer = client.get(Route.HISTORY)
        if args.json:
            print_raw(answer)
        else:
            print(render(answer.document(HistoryDoc), args.last))
        return Exit.OK

    return run_with_client(args, body, timeout=10.0)
