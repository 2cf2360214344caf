"""``organixctl status``: which slot booted and why, what each slot holds, what is going on.

Exit code: 0 when the last check found the host up to date (or nothing is known
yet), 1 when an update is available or staged, 2 when the last check was blocked
or failed, 3 when the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

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
from organixmd.apidef import SLOT_NAMES, Route, Slot, SlotDoc, StatusDoc


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
        answer = client.get(Route.STATUS)
        status = answer.document(StatusDoc)
        if args.json:
            print_raw(answer)
        else:
            print(render(status))
        verdict = status["verdict"]
        return verdict_exit(verdict["outcome"] if verdict else None)

    return run_with_client(args, body, timeout=10.0)


def _slot_line(name: Slot, slot: SlotDoc, booted: Slot | None, next_slot: Slot | None) -> str:
    state: str = slot["state"] or "unknown"
    if state == "trial":
        state = f"trial, {slot['tries_left'] or 0} tries left"
    marks = []
    if name == booted:
        marks.append("booted")
    if name == next_slot:
        marks.append("boots next")
    release = slot["release"]
    holds = describe_release(release) if release else "unknown release"
    if slot["status"] and slot["status"] != "installed":
        holds += f", {slot['status']}"
    mark = f" [{', '.join(marks)}]" if marks else ""
    return f"  slot {name}{mark}: GRUB {state}; holds {holds}; {slot['device']}"


def render(status: StatusDoc, now: datetime | None = None) -> str:
    """The human view of ``GET /v1/status``."""
    now = now or datetime.now(UTC)
    boot = status["boot"]
    booted = boot["booted"]
    lines = []
    explanation = boot["explanation"]
    if boot["reason"] == "trial" and not boot["on_trial"]:
        # GRUB's record still says "trial" after mark-good; the slot states are newer.
        explanation = (
            f"slot {booted} booted on trial (try {boot['trial_try'] or '?'}) and is committed since"
        )
    if booted:
        lines.append(f"Booted:      slot {booted} - {explanation}")
    else:
        lines.append(f"Booted:      unknown - {explanation}")
    if boot["env_copy"] == "backup":
        lines.append("             (GRUB environment read from its backup copy)")
    next_slot = boot["next_slot"]
    lines.append(f"Next boot:   slot {next_slot}" if next_slot else "Next boot:   unknown")
    lines.append("Slots:")
    slots = status["slots"]
    for name in SLOT_NAMES:
        if name in slots:
            lines.append(_slot_line(name, slots[name], booted, next_slot))

    phase = status["phase"]
    current = status["current"]
    progress = status["progress"]
    doing = phase
    if current and phase in ("checking", "downloading", "verifying"):
        doing += f" {describe_release(current)}"
    if progress:
        doing += f": {describe_progress(progress, eta=progress['eta'])}"
    lines.append(f"Phase:       {doing}")

    verdict = status["verdict"]
    lines.append(f"Last check:  {format_time(status['last_check'], now)}")
    if verdict:
        lines.append(f"Verdict:     {verdict['outcome']} [{verdict['code']}]")
        lines.append(f"             {verdict['message']}")
    else:
        lines.append("Verdict:     none yet")
    lines.append(f"Next check:  {format_time(status['next_check'], now)}")
    error = status["last_error"]
    if error:
        hint = f" ({error['hint']})" if error["hint"] else ""
        lines.append(f"Last error:  [{error['code']}] {error['message']}{hint}")
    else:
        lines.append("Last error:  none")
    pending = status["reboot_pending"]
    lines.append(f"Reboot:      pending ({pending})" if pending else "Reboot:      not needed")
    failed = status["failed_releases"]
    if failed:
        lines.append(f"Failed:      {failed} release(s) failed a trial boot (organixctl history)")
    daemon = status["daemon"]
    ready = "" if daemon["ready"] else ", boot-time check still running"
    lines.append(
        f"Daemon:      organixmd {daemon['version']}, pid {daemon['pid']}, "
        f"up since {format_time(daemon['started'], now)}{ready}"
    )
    lines.append(f"Source:      {status['source']}")
    return "\n".join(lines)
