"""Log lines: the JSON form carries the event's key=value pairs as fields."""

from __future__ import annotations

import io
import json
import logging

import pytest

from adapter.logs import TEXT_FORMAT, JsonLineFormatter, TextFormatter, configure, event
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


def _emitted(fmt: str, name: str, **fields: object) -> str:
    """The line one event is written as, in ``fmt``."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    logger = logging.getLogger(f"tests.logs.{fmt}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    event(logger, name, logging.WARNING, **fields)
    return stream.getvalue()


def test_event_fields_become_json_fields_whole() -> None:
    line = _emitted("json", "quarantined", job=7, reason="not a WSI: CT Image Storage", file="a b.svs")
    assert line.count("\n") == 1 and line.endswith("\n")
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "tests.logs.json"
    # Taken from the record, not parsed from the text: values with spaces arrive whole, numbers as numbers.
    assert entry["event"] == "quarantined" and entry["job"] == 7
    assert entry["reason"] == "not a WSI: CT Image Storage" and entry["file"] == "a b.svs"
    assert entry["message"] == 'event=quarantined job=7 reason="not a WSI: CT Image Storage" file="a b.svs"'
    assert entry["time"].endswith("+00:00")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_newline_in_a_file_name_cannot_forge_a_log_line(fmt: str) -> None:
    name = "slide.svs\n2026-01-01 00:00:00,000 INFO adapter.service event=done job=1 alerts=none"
    out = _emitted(fmt, "file_skipped", file=name, reason="cannot be read")
    assert out.count("\n") == 1  # one line, whatever the file is called
    if fmt == "json":
        assert json.loads(out)["file"] == name
    else:
        assert "event=file_skipped" in out and "\\n2026" in out
        assert not out.split("event=file_skipped", 1)[1].startswith(" event=done")


def test_text_messages_with_control_characters_stay_one_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(TEXT_FORMAT))
    handler.emit(_record("%s: cannot be read yet", "x\ny\rz"))
    assert stream.getvalue().count("\n") == 1 and "x\\ny\\rz" in stream.getvalue()


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
        event(logging.getLogger("adapter.service"), "done", job=3, alerts="none")
        logging.getLogger("highdicom.seg").info("per-object detail a library logs")
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["event"] == "done"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_log_format_is_validated() -> None:
    with pytest.raises(ValueError, match="log_format"):
        ServiceConfig(service={"log_format": "xml"})
