"""``organixctl status``: which slot booted and why, what each slot holds, what is going on.

Exit code: 0 when the last check found the host up to date (or nothing is known
yet), 1 when an update is available or staged, 2 when the last check was blocked
or failed, 3 when the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from organixctl.client import (
    Client,
    add_epilog,
    add_json_argument,
    add_socket_argument,
    describe_progress,
    describe_release,
    format_time,
    print_raw,
    run_with_client,
    verdict_exit,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json_argument(parser)
    add_socket_argument(parser)
    add_epilog(
        parser,
        {
            0: "the last check found the host up to date (or none ran yet)",
            1: "an update is available, being installed or staged (reboot to boot it)",
            2: "the last check was blocked or failed, or the daemon answered an error",
        },
    )


def run(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        answer = client.get("/v1/status")
        status = answer.json()
        if args.json:
            print_raw(answer)
        else:
            print(render(status))
        return verdict_exit((status.get("verdict") or {}).get("outcome"))

    return run_with_client(args, body, timeout=10.0)


def _slot_line(name: str, slot: dict[str, Any], booted: str | None, next_slot: str | None) -> str:
    state = slot.get("state") or "unknown"
    if state == "trial":
        state = f"trial, {slot.get('tries_left', 0)} tries left"
    marks = []
    if name == booted:
        marks.append("booted")
    if name == next_slot:
        marks.append("boots next")
    release = slot.get("release")
    holds = describe_release(release) if release else "unknown release"
    if slot.get("status") and slot.get("status") != "installed":
        holds += f", {slot['status']}"
    mark = f" [{', '.join(marks)}]" if marks else ""
    return f"  slot {name}{mark}: GRUB {state}; holds {holds}; {slot.get('device', '?')}"


def render(status: dict[str, Any], now: datetime | None = None) -> str:
    """The human view of ``GET /v1/status``."""
    now = now or datetime.now(UTC)
    boot = status.get("boot") or {}
    booted = boot.get("booted")
    lines = []
    explanation = boot.get("explanation", "")
    if boot.get("reason") == "trial" and boot.get("on_trial") is False:
        # GRUB's record still says "trial" after mark-good; the slot states are newer.
        explanation = (
            f"slot {booted} booted on trial (try {boot.get('trial_try') or '?'}) and is "
            "committed since"
        )
    if booted:
        lines.append(f"Booted:      slot {booted} - {explanation}")
    else:
        lines.append(f"Booted:      unknown - {explanation}")
    if boot.get("env_copy") == "backup":
        lines.append("             (GRUB environment read from its backup copy)")
    next_slot = boot.get("next_slot")
    lines.append(f"Next boot:   slot {next_slot}" if next_slot else "Next boot:   unknown")
    lines.append("Slots:")
    for name, slot in sorted((status.get("slots") or {}).items()):
        lines.append(_slot_line(name, slot, booted, next_slot))

    phase = status.get("phase", "unknown")
    current = status.get("current")
    progress = status.get("progress")
    doing = phase
    if current and phase in ("checking", "downloading", "verifying"):
        doing += f" {describe_release(current)}"
    if progress:
        doing += f": {describe_progress(progress)}"
    lines.append(f"Phase:       {doing}")

    verdict = status.get("verdict")
    lines.append(f"Last check:  {format_time(status.get('last_check'), now)}")
    if verdict:
        lines.append(f"Verdict:     {verdict.get('outcome')} [{verdict.get('code')}]")
        lines.append(f"             {verdict.get('message', '')}")
    else:
        lines.append("Verdict:     none yet")
    lines.append(f"Next check:  {format_time(status.get('next_check'), now)}")
    error = status.get("last_error")
    if error:
        hint = f" ({error['hint']})" if error.get("hint") else ""
        lines.append(f"Last error:  [{error.get('code')}] {error.get('message', '')}{hint}")
    else:
        lines.append("Last error:  none")
    pending = status.get("reboot_pending")
    lines.append(f"Reboot:      pending ({pending})" if pending else "Reboot:      not needed")
    failed = status.get("failed_releases") or 0
    if failed:
        lines.append(f"Failed:      {failed} release(s) failed a trial boot (organixctl history)")
    daemon = status.get("daemon") or {}
    ready = "" if daemon.get("ready") else ", boot-time check still running"
    lines.append(
        f"Daemon:      organixmd {daemon.get('version', '?')}, pid {daemon.get('pid', '?')}, "
        f"up since {format_time(daemon.get('started'), now)}{ready}"
    )
    lines.append(f"Source:      {status.get('source', '?')}")
    return "\n".join(lines)
