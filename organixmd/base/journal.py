"""A logging handler that sends structlog events to journald as native fields."""

from __future__ import annotations

import logging
from typing import Any

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

#: Stable MESSAGE_IDs for the events an operator searches for (journalctl MESSAGE_ID=...).
MESSAGE_IDS = {
    "update_found": "6f1d1c2a9c3e4b8e8d7f0a1b2c3d4e51",
    "install_done": "6f1d1c2a9c3e4b8e8d7f0a1b2c3d4e52",
    "flipped": "6f1d1c2a9c3e4b8e8d7f0a1b2c3d4e53",
    "committed": "6f1d1c2a9c3e4b8e8d7f0a1b2c3d4e54",
    "fell_back": "6f1d1c2a9c3e4b8e8d7f0a1b2c3d4e55",
}


class JournalHandler(logging.Handler):
    """Writes each record with its structlog keys as upper-case journal fields."""

    def emit(self, record: logging.LogRecord) -> None:
        from systemd import journal

        try:
            event: Any = record.msg
            fields: dict[str, Any] = {}
            if isinstance(event, dict):
                event = dict(event)
                message = str(event.pop("event", ""))
                for key, value in event.items():
                    if key.startswith("_"):
                        continue
                    fields[key.upper()] = str(value)
            else:
                message = record.getMessage()
            message_id = MESSAGE_IDS.get(message)
            if message_id:
                fields["MESSAGE_ID"] = message_id
            details = " ".join(f"{k.lower()}={v}" for k, v in fields.items() if k != "MESSAGE_ID")
            journal.send(
                f"{message} {details}".strip(),
                PRIORITY=str(_PRIORITY.get(record.levelno, 6)),
                SYSLOG_IDENTIFIER="organixmd",
                LOGGER=record.name,
                EVENT=message,
                **fields,
            )
        except Exception:
            self.handleError(record)
