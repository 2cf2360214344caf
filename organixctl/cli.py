"""Entry point of organixctl: argument parsing and dispatch to command modules.

Each command lives in its own module with ``add_arguments(parser)`` and
``run(args) -> int``. Command modules import only the standard library at module
level; anything heavier is imported inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

from organixctl.exitcodes import Exit


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


#: (name, module, one-line help). Order is the order of ``--help``.
COMMANDS: list[tuple[str, str, str]] = [
    ("keygen", "organixctl.cmd_keygen", "write a minisign-compatible Ed25519 key pair"),
    ("publish", "organixctl.cmd_publish", "compress, sign and upload a release"),
    ("verify", "organixctl.cmd_verify", "check a published release's signature and every hash"),
    ("provision", "organixctl.cmd_provision", "install organixm onto a disk or a disk image file"),
    (
        "status",
        "organixctl.cmd_status",
        "show the booted slot and why, the slots, phase and verdict",
    ),
    ("check", "organixctl.cmd_check", "check for a newer release now (installs nothing)"),
    ("update", "organixctl.cmd_update", "check and install a newer release now"),
    ("cancel", "organixctl.cmd_cancel", "cancel the running check or install"),
    ("mark-good", "organixctl.cmd_mark_good", "commit the booted slot after a good boot"),
    ("mark-bad", "organixctl.cmd_mark_bad", "mark the booted slot bad and remember its release"),
    ("rollback", "organixctl.cmd_rollback", "boot the other committed slot at the next reboot"),
    ("history", "organixctl.cmd_history", "show past installs, flips, commits and fallbacks"),
    ("watch", "organixctl.cmd_watch", "follow the daemon's events until interrupted"),
    ("completion", "organixctl.cmd_completion", "print a bash or zsh completion script"),
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, other commands get no options (nor module import).

    ``organixctl status`` must start fast: importing every command module and
    building every option costs more than half of its start-up.
    """
    parser = argparse.ArgumentParser(
        prog="organixctl",
        description="Publish releases for, and control, organixm self-updating hosts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in COMMANDS:
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if only is not None and name != only:
            continue
        module = cast(_Command, importlib.import_module(module_name))
        module.add_arguments(command_parser)
        command_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # The command is the first word (organixctl has no options before it).
    first = words[0] if words else None
    parser = build_parser(first if first in {name for name, _, _ in COMMANDS} else None)
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:
        return Exit.USAGE if exc.code not in (0, None) else Exit.OK
    module = cast(_Command, args._module)
    try:
        return module.run(args)
    except KeyboardInterrupt:
        print("organixctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
