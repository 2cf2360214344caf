"""The foundation every layer stands on: the error tree, the daemon's configuration
model, logging, atomic file writes and the JSON depth guard.

Owns: ``errors`` (the one exception tree), ``config`` (the frozen configuration
model), ``logsetup`` and ``journal`` (structured logs to stderr or the journal),
``fsutil`` (atomic writes, temporaries), ``jsondepth``.

May import: the standard library and third-party packages only; nothing else of
organixm.
"""
