"""Exit codes of organixctl (documented in docs/operations.md)."""

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    #: An update is available or staged (``check``, ``status``).
    UPDATE_AVAILABLE = 1
    #: The daemon (or a local command) reported an error.
    ERROR = 2
    #: The control socket could not be reached.
    UNREACHABLE = 3
    #: The daemon refused the request: not uid 0 and not in the admin group.
    DENIED = 4
    #: Bad command-line usage (argparse's own code).
    USAGE = 64
