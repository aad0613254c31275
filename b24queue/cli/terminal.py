"""The operator's terminal: text from messages, portals and brokers made safe to print on it
(`safe`), and a question asked on it (`confirm`).

What the CLI prints from a message (an event name, a portal, a handler's error quoting event
data, a broker's reason) is someone else's text: an escape sequence in it would be run by the
terminal (retitle it, rewrite what is on the screen, in some terminals answer with keystrokes),
a newline would forge a line of the listing, and a bidirectional override would show its text
in another order than it is. `safe` writes every such character as an escape (`\\x1b`,
`\\u202e`) and leaves every other character, non-Latin letters included, as it is. JSON output
needs none of it: `json.dumps` escapes them itself.
"""

from __future__ import annotations

import sys

from b24queue.errors import ConfigError

# C0 controls (newline and tab included), DEL, C1 controls; the bidirectional embeddings,
# overrides and isolates (U+202A-202E, U+2066-2069) and marks (U+200E, U+200F, U+061C); the
# line and paragraph separators (U+2028, U+2029).
_CONTROLS = [
    *range(0x00, 0x20),
    *range(0x7F, 0xA0),
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
    0x200E,
    0x200F,
    0x061C,
    0x2028,
    0x2029,
]
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _CONTROLS}


def safe(value: object) -> str:
    """`str(value)` with every control character, and every character that reorders or breaks
    the text, written as an escape."""
    return str(value).translate(_ESCAPES)


def confirm(question: str) -> bool:
    """Ask `question` on the terminal; without one, refuse (the command's --yes says yes)."""
    if not sys.stdin.isatty():
        raise ConfigError(f"{question} Refusing without a terminal to ask: pass --yes")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
