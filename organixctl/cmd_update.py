"""``organixctl update``: check and install now, in the background or while watching.

Without ``--wait`` the daemon answers at once (the install runs on; follow it
with ``organixctl watch``). With ``--wait`` organixctl follows the daemon's
event stream and shows a progress bar with rate and ETA on a terminal (plain
lines otherwise) until the check's verdict, then exits by that verdict: 0 up to
date, 1 available or staged (reboot to boot it on trial), 2 blocked or failed.
A second update while one runs is refused by the daemon (exit 2, code ``busy``).
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from organixctl.client import (
    Client,
    ClientError,
    add_epilog,
    add_json_argument,
    add_socket_argument,
    describe_progress,
    describe_release,
    format_bytes,
    format_duration,
    print_raw,
    run_with_client,
    verdict_exit,
)
from organixctl.exitcodes import Exit
from organixmd.apidef import Event, Outcome, ProgressEvent, Route, VerdictDoc

BAR_WIDTH = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        action="store_true",
        help="follow the install with a progress display and exit by its verdict",
    )
    parser.add_argument(
        "--reboot",
        action="store_true",
        help="reboot as soon as the release is staged (otherwise the reboot policy decides)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="install even a release that failed its trial before, a lower serial (downgrade) "
        "or one outside the rollout percentage",
    )
    add_json_argument(parser)
    add_socket_argument(parser)
    add_epilog(
        parser,
        {
            0: "started (without --wait), or up to date",
            1: "with --wait: staged (reboot to boot it on trial), or available but waiting",
            2: "blocked or failed, one is already running [busy], or another error",
        },
    )


def print_verdict(verdict: VerdictDoc, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    print(f"{verdict['outcome']}: {verdict['message']} [{verdict['code']}]", file=out)


class ProgressView:
    """Shows events: a redrawn bar on a terminal, one line per step otherwise."""

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self.phase = ""
        self._bar_shown = False
        self._last_step = -1

    def _end_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self._bar_shown = False

    def _line(self, text: str) -> None:
        self._end_bar()
        print(text, file=self.stream, flush=True)

    def show(self, event: Event) -> None:
        if event["event"] == "status":
            verdict = event["verdict"]
            self.phase = event["phase"]
            self._line(
                f"booted slot {event['boot']['booted'] or '?'}; phase {self.phase}; last verdict "
                f"{verdict['outcome'] if verdict else 'none'}"
            )
        elif event["event"] == "phase":
            self.phase = event["phase"]
            self._last_step = -1
            self._line(f"phase: {self.phase}")
        elif event["event"] == "progress":
            self._progress(event)
        elif event["event"] == "verdict":
            self._end_bar()
            print_verdict(event, self.stream)
            self.stream.flush()
        else:
            # ``stopping``, and any kind a newer daemon adds.
            self._line(f"{event['event']}: {event}")

    def _progress(self, event: ProgressEvent) -> None:
        done = event["bytes_done"]
        total = event["bytes_total"]
        rate = float(event["rate"])
        fraction = done / total if total else 0.0
        if not self.tty:
            # One line per tenth, so logs stay short and still show the rate.
            step = int(fraction * 10)
            if step != self._last_step:
                self._last_step = step
                self._line(describe_progress(event, self.phase or "progress"))
            return
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        eta = f"ETA {format_duration((total - done) / rate)}" if rate > 0 and total > done else ""
        self.stream.write(
            f"\r{self.phase or 'progress':<11} [{bar}] {100 * fraction:3.0f}%  "
            f"{format_bytes(done)}/{format_bytes(total)}  {format_bytes(rate)}/s  {eta}\x1b[K"
        )
        self.stream.flush()
        self._bar_shown = True

    def close(self) -> None:
        self._end_bar()
        self.stream.flush()


def follow_update(client: Client, args: argparse.Namespace) -> int:
    events = client.events()
    # The first event is the daemon's status: from here on no event is missed.
    next(events)
    client.post(Route.UPDATE, {"force": args.force, "reboot": args.reboot})
    view = ProgressView(sys.stdout, sys.stdout.isatty())
    try:
        for raw, event in events:
            if args.json:
                sys.stdout.buffer.write(raw + b"\n")
                sys.stdout.flush()
            else:
                view.show(event)
            if event["event"] == "verdict":
                if event["outcome"] == Outcome.STAGED and not args.json:
                    release = describe_release(event["release"])
                    print(f"{release} boots on trial at the next reboot", flush=True)
                return verdict_exit(event["outcome"])
            if event["event"] == "phase" and event["phase"] == "idle":
                # A check ends with its verdict, then its last phase; "idle" with no
                # verdict before it means the operation was cancelled without one.
                raise ClientError(
                    "the update ended without a verdict (was it cancelled?); "
                    "'organixctl status' shows the state"
                )
    finally:
        view.close()
    raise ClientError(
        "the daemon closed the event stream before the update ended (did it stop?)",
        Exit.UNREACHABLE,
    )


def run(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        if args.wait:
            return follow_update(client, args)
        answer = client.post(Route.UPDATE, {"force": args.force, "reboot": args.reboot})
        if args.json:
            print_raw(answer)
        else:
            print("update started; follow it with 'organixctl watch' or 'organixctl status'")
        return Exit.OK

    return run_with_client(args, body)
