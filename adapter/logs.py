"""Log output of the CLI and the service: one line per event, as text or JSON.

The service's events are written ``event=NAME key=value …``; the JSON form
keeps that message and adds the ``key=value`` pairs as fields, so a log
shipper (Loki, Elasticsearch, journald) can filter on ``event`` or ``job``
without parsing text. Patient data never reaches the logs unless the site
turns on ``service.log_patient_data``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from typing import Literal

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

#: ``key=value`` pairs of an event message (values run to the next space).
_PAIR = re.compile(r"(?:^|\s)([a-z_]+)=(\S*)")


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message,
    the message's ``key=value`` fields, and the traceback if there is one."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        if message.startswith("event="):
            for key, value in _PAIR.findall(message):
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: int, fmt: Literal["text", "json"] = "text") -> None:
    """Send log records of ``level`` and above to stderr in ``fmt`` (the application's one handler)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLineFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
