"""Log lines: the JSON form carries the event's key=value pairs as fields."""

from __future__ import annotations

import json
import logging

import pytest

from adapter.logs import JsonLineFormatter, configure
from config.service import ServiceConfig


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("adapter.service", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_event_fields_become_json_fields() -> None:
    line = JsonLineFormatter().format(_record("event=quarantined job=%d reason=%s", 7, "not a WSI: CT Image Storage"))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["level"] == "WARNING" and entry["logger"] == "adapter.service"
    assert entry["event"] == "quarantined" and entry["job"] == "7"
    assert entry["message"] == "event=quarantined job=7 reason=not a WSI: CT Image Storage"
    assert entry["time"].endswith("+00:00")


def test_plain_messages_and_tracebacks_stay_one_line() -> None:
    line = JsonLineFormatter().format(_record("storage SCP %s listening", "IHC", exc=True))
    entry = json.loads(line)
    assert "\n" not in line
    assert "event" not in entry and entry["message"] == "storage SCP IHC listening"
    assert "ValueError: boom" in entry["exception"]


def test_configure_replaces_the_handler(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure(logging.INFO, "json")
        configure(logging.INFO, "json")  # twice: still one line per event
        logging.getLogger("adapter.service").info("event=done job=%d alerts=%s", 3, "none")
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["event"] == "done"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_log_format_is_validated() -> None:
    with pytest.raises(ValueError, match="log_format"):
        ServiceConfig(service={"log_format": "xml"})
