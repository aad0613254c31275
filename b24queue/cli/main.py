"""`b24queue` command line: the parser, logging, the exit. The only module that reads argv,
configures logging and exits; what each command does is its own module, listed in `COMMANDS`.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, 3 broker unreachable.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from b24queue import process
from b24queue.cli import dlq, portals, publish, send, services, spool, status, topology
from b24queue.errors import (
    EXIT_BROKER,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    B24QueueError,
    ConfigError,
)
from b24queue.secrets import redaction
from b24queue.settings import Settings, load_settings

log = logging.getLogger("b24queue")

__all__ = ["EXIT_BROKER", "EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "main", "run"]

# Each command module's `add_parser(commands)` adds its command(s), each parser with its `run`
# (and `settings_flags`: which of its flags override which setting). A new command: a module here.
COMMANDS = (services, topology, status, dlq, spool, portals, send, publish)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="b24queue",
        description="Bitrix24 events into a queue, answered at once, processed reliably later.",
    )
    parser.add_argument("--log-format", choices=("text", "json"), help="default: text")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(settings_flags={})
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags beat the environment: only the ones given become overrides."""
    flags = {"log_format": "log_format", "log_level": "log_level", **args.settings_flags}
    return {
        setting: getattr(args, flag)
        for flag, setting in flags.items()
        if getattr(args, flag, None) is not None
    }


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(**_flag_overrides(args))
    except ConfigError as exc:
        print(f"b24queue: {redaction.redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    process.start_logging(settings)
    command: Callable[[Settings, argparse.Namespace], int] = args.run
    try:
        return command(settings, args)
    except B24QueueError as exc:  # each error class says what to exit with
        log.error("%s", exc)
        return exc.exit_code
