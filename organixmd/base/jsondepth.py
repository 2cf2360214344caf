"""A bound on JSON nesting, checked before any JSON is decoded.

:func:`json.loads` recurses once per nested array or object, so a small document
such as ``[[[[...]]]]`` 1,000 levels deep (2 KB) ends in ``RecursionError`` and
one 100,000 deep may exhaust the C stack. Catching ``RecursionError`` afterwards
is not enough: the limit depends on the caller's stack and pydantic recurses
again on what was decoded. So every untrusted document (a release's meta, a
control-socket body) is scanned first: brackets are counted outside strings, and
a document that nests deeper than the caller's limit is refused by name.

The scan is one regular expression over the bytes (C speed, no recursion). It
does not validate JSON: a document that passes still goes to :func:`json.loads`,
which reports every other mistake.
"""

from __future__ import annotations

import re

# A complete string token (escapes skipped, so an escaped quote does not end it),
# or one bracket. Everything else is skipped by finditer. An unterminated string
# matches nothing, so its contents are scanned as structure: the document is
# invalid JSON either way, and the worst outcome is a depth error instead of a
# syntax error.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")


def too_deep(data: bytes, limit: int) -> int | None:
    """The byte offset where ``data`` first nests deeper than ``limit``, or ``None``."""
    depth = 0
    for match in _TOKENS.finditer(data):
        first = data[match.start()]
        if first in _OPEN:
            depth += 1
            if depth > limit:
                return match.start()
        elif first in _CLOSE:
            # Unbalanced closers are json.loads's to report; never go below zero.
            depth = max(depth - 1, 0)
    return None
