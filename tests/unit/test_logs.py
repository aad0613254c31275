from __future__ import annotations

import json
import logging

import pytest

from b24queue import logs


def test_json_lines_carry_the_outcome_fields(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logs.configure("INFO", "json")
        logging.getLogger("b24queue.delivery").info(
            "event=ONX queue=q outcome=ack",
            extra={"event": "ONX", "queue": "q", "message_id": "m1", "outcome": "ack"},
        )
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    record = json.loads(line)
    assert record["msg"] == "event=ONX queue=q outcome=ack"
    assert (record["event"], record["queue"], record["message_id"], record["outcome"]) == (
        "ONX",
        "q",
        "m1",
        "ack",
    )
    assert record["level"] == "INFO" and record["logger"] == "b24queue.delivery"


def test_text_lines_read_as_the_standard_formatter_writes_them() -> None:
    """The time text is cached per second: a cached one must be the one strftime would give."""
    fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    ours, standard = logs._Formatter(fmt), logging.Formatter(fmt)
    json_ours = logs._JsonFormatter()
    record = logging.LogRecord("b24queue.x", logging.INFO, "f.py", 1, "a=%s", ("b",), None)
    for created in (1764367200.001, 1764367200.999, 1764367201.5, 1764367200.25, 1764370800.0):
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == standard.format(record)
        assert ours.formatTime(record, "%H:%M:%S") == standard.formatTime(record, "%H:%M:%S")
        assert json.loads(json_ours.format(record))["ts"] == standard.formatTime(
            record, "%Y-%m-%dT%H:%M:%S"
        )
