"""The fault suite's table: one row per fault, and the summary line ``make faults`` ends with.

Each fault test drives the real daemon (or the real GRUB) through one kind of fault a
number of times and adds one :class:`Row`: how often it was tried, how often the host
recovered (the next good check installed, or GRUB booted a good slot), which verdict
codes the daemon reported, and the three numbers that must stay zero: flips onto bad
data, stuck hosts (no verdict in bounded time, or no install once the cause was gone)
and tracebacks in the daemon's log. The test asserts those zeros itself; the table is
what an operator reads.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TRACEBACK = "Traceback (most recent call last)"


def count_tracebacks(text: str) -> int:
    """Tracebacks in a daemon log (plain or inside JSON log lines)."""
    return text.count(TRACEBACK)


@dataclass
class Row:
    fault: str
    tries: int = 0
    #: Tries after which the host got the next good release (or booted a good slot).
    recovered: int = 0
    #: Tries that ended in a clear verdict or error (not a crash, not silence), by code.
    reported: Counter[str] = field(default_factory=Counter)
    flips_on_bad_data: int = 0
    stuck: int = 0
    tracebacks: int = 0
    seconds: float = 0.0

    @property
    def handled(self) -> int:
        """Tries that were recovered from or reported with a verdict."""
        return min(self.tries, max(self.recovered, sum(self.reported.values())))

    def codes(self) -> str:
        return ", ".join(f"{code} {n}" for code, n in sorted(self.reported.items())) or "-"


class FaultReport:
    """Collects rows across the session; rendered at its end (see conftest)."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def render(self) -> str:
        header = (
            "fault",
            "tries",
            "recovered",
            "reported (verdict codes)",
            "bad flips",
            "stuck",
            "tracebacks",
            "s",
        )
        lines = [
            (
                row.fault,
                str(row.tries),
                str(row.recovered),
                row.codes(),
                str(row.flips_on_bad_data),
                str(row.stuck),
                str(row.tracebacks),
                f"{row.seconds:.1f}",
            )
            for row in self.rows
        ]
        widths = [max(len(col[i]) for col in [header, *lines]) for i in range(len(header))]

        def fmt(cols: tuple[str, ...]) -> str:
            return " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()

        out = [fmt(header), "-+-".join("-" * w for w in widths)]
        out += [fmt(line) for line in lines]
        out.append(self.summary())
        return "\n".join(out)

    def summary(self) -> str:
        tried = sum(r.tries for r in self.rows)
        handled = sum(r.handled for r in self.rows)
        flips = sum(r.flips_on_bad_data for r in self.rows)
        stuck = sum(r.stuck for r in self.rows)
        tracebacks = sum(r.tracebacks for r in self.rows)
        return (
            f"faults: {tried} tried, {handled} recovered or reported, {flips} flips on bad "
            f"data, {stuck} stuck hosts, {tracebacks} tracebacks"
        )

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {
                "fault": r.fault,
                "tries": r.tries,
                "recovered": r.recovered,
                "reported": dict(r.reported),
                "flips_on_bad_data": r.flips_on_bad_data,
                "stuck": r.stuck,
                "tracebacks": r.tracebacks,
                "seconds": round(r.seconds, 2),
            }
            for r in self.rows
        ]
        path.write_text(json.dumps({"rows": rows, "summary": self.summary()}, indent=1) + "\n")
