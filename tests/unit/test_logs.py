from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import threading

import pytest

from b24queue.telemetry import logs


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
    ours, standard = logs._TextFormatter(), logging.Formatter(logs.TEXT_FORMAT)
    json_ours = logs._JsonFormatter()
    record = logging.LogRecord("b24queue.x", logging.INFO, "f.py", 1, "a=%s", ("b",), None)
    for created in (1764367200.001, 1764367200.999, 1764367201.5, 1764367200.25, 1764370800.0):
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == standard.format(record)
        assert ours.formatTime(record, "%H:%M:%S") == standard.formatTime(record, "%H:%M:%S")
        assert json.loads(json_ours.format(record))["ts"] == standard.formatTime(
            record, "%Y-%m-%dT%H:%M:%S"
        )


def test_text_lines_with_a_traceback_or_another_level_read_as_the_standard_ones() -> None:
    ours, standard = logs._TextFormatter(), logging.Formatter(logs.TEXT_FORMAT)
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    for level, info in ((logging.WARNING, None), (logging.ERROR, exc_info)):
        record = logging.LogRecord("b24queue.y", level, "f.py", 1, "x %d", (7,), info)
        expected = standard.format(record)
        record.exc_text = None  # the standard formatter caches it on the record
        assert ours.format(record) == expected
    assert "ValueError: boom" in expected


def _handler() -> tuple[logs._TurnHandler, io.StringIO]:
    stream = io.StringIO()
    handler = logs._TurnHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler, stream


def _record(text: str) -> logging.LogRecord:
    return logging.LogRecord("b24queue.z", logging.INFO, "f.py", 1, text, None, None)


def test_lines_of_one_loop_turn_are_written_together_at_its_end_in_order() -> None:
    handler, stream = _handler()

    async def turn() -> list[str]:
        seen = []
        for n in range(3):
            handler.handle(_record(f"line {n}"))
        seen.append(stream.getvalue())  # nothing yet: the turn is not over
        await asyncio.sleep(0)
        seen.append(stream.getvalue())
        handler.handle(_record("line 3"))
        await asyncio.sleep(0)
        seen.append(stream.getvalue())
        return seen

    assert asyncio.run(turn()) == [
        "",
        "line 0\nline 1\nline 2\n",
        "line 0\nline 1\nline 2\nline 3\n",
    ]


def test_outside_a_loop_lines_go_at_once_after_those_still_waiting() -> None:
    handler, stream = _handler()
    handler.handle(_record("at once"))
    assert stream.getvalue() == "at once\n"

    loop = asyncio.new_event_loop()
    loop.call_soon(handler.handle, _record("waiting"))
    loop.call_soon(loop.stop)  # stops before the write the line scheduled
    loop.run_forever()
    loop.close()
    assert stream.getvalue() == "at once\n"
    handler.handle(_record("after"))  # no loop: written now, the waiting line first
    assert stream.getvalue() == "at once\nwaiting\nafter\n"

    async def one_more() -> None:
        handler.handle(_record("last"))

    loop = asyncio.new_event_loop()
    loop.run_until_complete(one_more())
    loop.close()
    handler.flush()  # what logging does at exit
    assert stream.getvalue().endswith("after\nlast\n")


def test_a_line_from_another_thread_is_written_at_once() -> None:
    handler, stream = _handler()

    async def main() -> str:
        handler.handle(_record("loop"))
        thread = threading.Thread(target=handler.handle, args=(_record("thread"),))
        thread.start()
        thread.join()
        return stream.getvalue()

    assert asyncio.run(main()) == "loop\nthread\n"


def test_a_warning_goes_at_once_with_the_lines_before_it() -> None:
    """What a process says right before it exits (os._exit, a crash) must not wait for a turn
    of the loop that never comes."""
    handler, stream = _handler()

    async def turn() -> str:
        handler.handle(_record("info first"))
        warning = _record("then a warning")
        warning.levelno, warning.levelname = logging.WARNING, "WARNING"
        handler.handle(warning)
        return stream.getvalue()

    assert asyncio.run(turn()) == "info first\nthen a warning\n"
