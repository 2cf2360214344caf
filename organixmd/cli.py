"""``organixmd``: the daemon's command line.

``organixmd --config PATH`` runs the daemon (systemd ``Type=notify``);
``organixmd --config PATH --once`` runs one check, installs when there is
something to install, and exits with one of the codes below (docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path

from organixmd.base.config import DEFAULT_CONFIG_PATH, Config, load_config
from organixmd.base.errors import OrganixmError
from organixmd.host.state import Verdict


class OnceExit(IntEnum):
    #: Up to date, or the release is installed, verified and staged.
    OK = 0
    #: A newer release exists but is not installed now (waiting for commit, rollout,
    #: ``--check-only``).
    AVAILABLE = 10
    #: Refused by policy or safety (downgrade, failed before, bad signature, slot unusable).
    BLOCKED = 11
    #: The check or install failed (source unreachable, bad image, I/O error).
    ERROR = 12
    #: The configuration is invalid (EX_CONFIG).
    CONFIG = 78


def exit_code_for(verdict: Verdict) -> OnceExit:
    return {
        "up-to-date": OnceExit.OK,
        "staged": OnceExit.OK,
        "available": OnceExit.AVAILABLE,
        "installing": OnceExit.AVAILABLE,
        "blocked": OnceExit.BLOCKED,
        "error": OnceExit.ERROR,
    }[verdict.outcome]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="organixmd",
        description="The organixm update daemon: installs newer releases into the inactive "
        "slot, verified, and points GRUB at them on trial.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help=f"configuration file (default {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="run one check (and install) and exit: 0 up to date or staged, 10 available but "
        "not installed now, 11 blocked, 12 error, 78 bad configuration",
    )
    parser.add_argument(
        "--check-only",
        action="store_true",
        help="with --once: report what would happen, install nothing",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --once: install even a release that failed before, a lower serial, or one "
        "outside the rollout percentage",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from organixmd.base import logsetup

    try:
        config = load_config(args.config)
    except OrganixmError as exc:
        print(f"organixmd: {exc}", file=sys.stderr)
        return OnceExit.CONFIG
    logsetup.configure(args.log_level or config.daemon.log_level)
    if args.once:
        return asyncio.run(_once(config, install=not args.check_only, force=args.force))
    from organixmd.service.compose import run_daemon

    return asyncio.run(run_daemon(config))


async def _once(config: Config, *, install: bool, force: bool) -> int:
    from organixmd.service.compose import build_host, unobserved

    try:
        host = await build_host(config, unobserved)
    except OrganixmError as exc:
        print(f"organixmd: {exc}", file=sys.stderr)
        return OnceExit.CONFIG if exc.code == "config-invalid" else OnceExit.ERROR
    verdict = await host.engine.check(install=install, force=force)
    print(f"{verdict.outcome}: {verdict.message}")
    return exit_code_for(verdict)


if __name__ == "__main__":
    sys.exit(main())
