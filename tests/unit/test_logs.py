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
