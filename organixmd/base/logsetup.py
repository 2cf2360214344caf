"""Configure structlog once per process.

Output follows where it goes: under journald (``JOURNAL_STREAM`` set) native
journal fields via :mod:`systemd.journal`; on a terminal a readable console
format; otherwise one JSON object per line. Standard-library loggers (aiohttp,
botocore) are routed through the same pipeline so every line has one shape.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

_SHARED: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def _renderer(stream: TextIO) -> structlog.types.Processor:
    if stream.isatty():
        return structlog.dev.ConsoleRenderer(colors=True)
    return structlog.processors.JSONRenderer(sort_keys=False)


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog and stdlib logging. Idempotent: a second call reconfigures."""
    out = stream if stream is not None else sys.stderr
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM") and stream is None:
        from organixmd.base.journal import JournalHandler

        handler = JournalHandler()
    else:
        handler = logging.StreamHandler(out)
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    _renderer(out),
                ],
                foreign_pre_chain=[structlog.stdlib.add_logger_name, *_SHARED],
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Third-party chatter stays at warning unless we debug.
    for noisy in ("botocore", "aiobotocore", "aiohttp.access", "urllib3"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str, **context: Any) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name).bind(**context)
    return logger
