"""Prometheus text exposition of the daemon's state (format 0.0.4).

Rendered from the status document the control socket serves
(:class:`organixmd.apidef.StatusDoc`), the state file's history and the counters.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from organixmd.apidef import StatusDoc
from organixmd.host.engine import Counters
from organixmd.host.state import State


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: Any) -> str:
    inner = ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items())
    return "{" + inner + "}" if inner else ""


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(
        self, name: str, kind: str, help_text: str, samples: list[tuple[str, float]]
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{labels} {_number(value)}")


def _number(value: float) -> str:
    """Exact text for counters and timestamps (no 1.79567e+09 rounding)."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _timestamp(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return 0.0


def render(status: StatusDoc, state: State, counters: Counters) -> str:
    out = _Writer()
    boot = status["boot"]
    out.metric(
        "organixm_booted_slot",
        "gauge",
        "1 for the slot the running system booted from",
        [(_labels(slot=slot), 1.0 if boot["booted"] == slot else 0.0) for slot in ("a", "b")],
    )
    out.metric(
        "organixm_boot_on_trial",
        "gauge",
        "1 while the booted slot is on trial (not yet committed)",
        [("", 1.0 if boot["on_trial"] else 0.0)],
    )
    out.metric(
        "organixm_boot_reason",
        "gauge",
        "why GRUB chose the booted slot (label reason)",
        [(_labels(reason=boot["reason"] or "unknown"), 1.0)],
    )
    slot_samples = []
    tries = []
    for name, slot in status["slots"].items():
        release = slot["release"]
        slot_samples.append(
            (
                _labels(
                    slot=name,
                    state=slot["state"] or "unknown",
                    version=release["version"] if release else "",
                ),
                float(release["serial"] if release else 0),
            )
        )
        tries.append((_labels(slot=name), float(slot["tries_left"] or 0)))
    out.metric(
        "organixm_slot_release_serial",
        "gauge",
        "serial of the release each slot holds (labels: GRUB state and version)",
        slot_samples,
    )
    out.metric("organixm_slot_trial_tries_left", "gauge", "trial boots GRUB may still start", tries)
    verdict = status["verdict"]
    out.metric(
        "organixm_last_check_timestamp_seconds",
        "gauge",
        "when the last check ended (Unix time)",
        [("", _timestamp(state.last_check))],
    )
    out.metric(
        "organixm_last_verdict",
        "gauge",
        "the last check's outcome and code",
        [
            (
                _labels(
                    outcome=verdict["outcome"] if verdict else "none",
                    code=verdict["code"] if verdict else "none",
                ),
                1.0,
            )
        ],
    )
    out.metric(
        "organixm_checks_total",
        "counter",
        "checks since the daemon started, by outcome",
        [(_labels(outcome=k), float(v)) for k, v in sorted(counters.checks.items())]
        or [(_labels(outcome="none"), 0.0)],
    )
    out.metric(
        "organixm_downloaded_bytes_total",
        "counter",
        "compressed image bytes downloaded since the daemon started",
        [("", float(counters.bytes_downloaded))],
    )
    out.metric(
        "organixm_reused_bytes_total",
        "counter",
        "image bytes copied from this host's own slots by delta installs since the daemon started",
        [("", float(counters.bytes_reused))],
    )
    out.metric(
        "organixm_installs_total",
        "counter",
        "installs completed since the daemon started",
        [("", float(counters.installs))],
    )
    out.metric(
        "organixm_install_duration_seconds",
        "gauge",
        "duration of the last completed install",
        [("", counters.last_install_seconds or 0.0)],
    )
    out.metric(
        "organixm_rollbacks_total",
        "counter",
        "fallbacks and rollbacks recorded in the history",
        [("", float(sum(1 for e in state.history if e.event in ("fell-back", "rollback"))))],
    )
    out.metric(
        "organixm_failed_releases",
        "gauge",
        "releases remembered as failed (never installed again)",
        [("", float(len(state.failed)))],
    )
    progress = status["progress"]
    out.metric(
        "organixm_install_progress_bytes",
        "gauge",
        "bytes of the running install written and verified",
        [("", float(progress["bytes_done"] if progress else 0))],
    )
    return "\n".join(out.lines) + "\n"
