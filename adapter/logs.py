"""Log output of the CLI and the service: one line per event, as text or JSON.

The service logs its events with :func:`event`: the text form is
``event=NAME key=value …`` (a value with spaces, quotes, ``=`` or control
characters is written as a JSON string, so a file name with a newline cannot
forge a second line); the JSON form (python-json-logger) carries ``event``
and every field as its own JSON member, taken from the log record, not
parsed back out of the text. Patient data never reaches the logs unless the
site turns on ``service.log_patient_data``. Libraries' chatter (pynetdicom's
per-association lines, highdicom's per-object INFO lines) is kept at WARNING
unless ``--verbose``.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Literal

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

#: Loggers of libraries that log an INFO line per association or per object.
CHATTY_LIBRARIES = ("pynetdicom", "highdicom", "wsidicom")

#: The attribute of a log record that holds an event's fields.
FIELDS = "event_fields"

_PLAIN = re.compile(r"^[^\s\"'=\\\x00-\x1f\x7f]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _text(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and _PLAIN.match(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one event: ``event=name key=value …`` with the fields on the record for JSON."""
    if not logger.isEnabledFor(level):
        return
    message = " ".join([f"event={name}", *(f"{k}={_text(v)}" for k, v in fields.items())])
    logger.log(level, "%s", message, extra={FIELDS: {"event": name, **fields}}, stacklevel=2)


def _escape(match: re.Match[str]) -> str:
    return json.dumps(match.group(0))[1:-1]


class TextFormatter(logging.Formatter):
    """The text form; control characters in a message are escaped (``\\n``), so a message is one line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(_escape, record.message)
        return super().formatMessage(record)


class JsonLineFormatter(JsonFormatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the event's
    fields as members, and the traceback if there is one."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "exc_info": "exception"},
            timestamp=False,
            json_ensure_ascii=False,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        import datetime as dt

        return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        fields = log_data.pop(FIELDS, None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                plain = isinstance(value, (int, float, bool)) or value is None
                log_data.setdefault(key, value if plain else str(value))


def configure(level: int, fmt: Literal["text", "json"] = "text") -> None:
    """Send log records of ``level`` and above to stderr in ``fmt`` (the application's one handler)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLineFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
