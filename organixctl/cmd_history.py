"""``organixctl history``: past installs, flips, commits, fallbacks; releases that failed."""

from __future__ import annotations

import argparse
from typing import Any

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


def _when(value: Any) -> str:
    moment = parse_time(value)
    return f"{moment:%Y-%m-%d %H:%M:%S}Z" if moment else "?"


def render(data: dict[str, Any], last: int = 0) -> str:
    entries = list(data.get("history") or [])
    if last > 0:
        entries = entries[-last:]
    lines = []
    for entry in entries:
        slot = f"slot {entry['slot']}" if entry.get("slot") else ""
        release = describe_release(entry["release"]) if entry.get("release") else ""
        detail = entry.get("detail") or ""
        parts = [p for p in (slot, release, detail) if p]
        lines.append(f"{_when(entry.get('at'))}  {entry.get('event', '?'):<16} {'  '.join(parts)}")
    if not lines:
        lines.append("no history yet")
    failed = data.get("failed") or []
    if failed:
        lines.append("")
        lines.append("Releases that failed (not installed again unless forced or superseded):")
        for entry in failed:
            lines.append(
                f"{_when(entry.get('at'))}  {describe_release(entry.get('release'))}: "
                f"{entry.get('reason', '')}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        answer = client.get("/v1/history")
        if args.json:
            print_raw(answer)
        else:
            print(render(answer.json(), args.last))
        return Exit.OK

    return run_with_client(args, body, timeout=10.0)
