"""Text made safe to print: every character that could drive a terminal is shown as an escape.

Runner names, tags, ids and error messages come from upstream (or from the user) and end up
on terminals, in cron mail and in logs. A raw ESC can clear a screen or retitle a window, a
raw newline or carriage return can forge a whole output line, a Unicode line separator or a
bidi override can do the same to anything that renders Unicode. This module is the one owner
of that escaping; everything that prints text for people goes through it.

Which characters: the C0 controls (U+0000-U+001F), DEL, the C1 controls (U+0080-U+009F), the
line and paragraph separators (U+2028, U+2029), the bidi marks, embeddings, overrides and
isolates, and the invisible format characters that could make two names look alike (zero
width space, word joiner, byte order mark, tag characters; see ``UNPRINTABLE``). The zero
width joiner and non-joiner stay: scripts and emoji need them to be written at all. How:
with JSON's escapes (``\\n``, ``\\r``, ``\\t``, ``\\b``, ``\\f``, else ``\\u001b``), so a value
looks the same in a text report, in a stored JSON column and in ``--json`` output, and
``json.loads`` reads any of them back.

The backslash is escaped too (``\\\\``). That keeps the escaping injective: a name that
really is ``a\\nb`` (backslash, n) is shown ``a\\\\nb``, never like a name with a newline in
it, so two runners can never look alike on screen unless their names are equal.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

#: Every character printed only as an escape (the backslash is escaped as well).
UNPRINTABLE = frozenset(
    chr(code)
    for code in (
        *range(0x00, 0x20),
        *range(0x7F, 0xA0),
        0x061C,  # Arabic letter mark: a bidi mark
        0x180E,  # Mongolian vowel separator: invisible
        0x200B,  # zero width space
        *range(0x200E, 0x2010),  # left-to-right and right-to-left marks
        0x2028,
        0x2029,
        *range(0x202A, 0x202F),
        *range(0x2060, 0x2065),  # word joiner and the invisible operators
        *range(0x2066, 0x2070),  # bidi isolates, and the deprecated format controls
        0xFEFF,  # zero width no-break space (byte order mark)
        *range(0xFFF9, 0xFFFC),  # interlinear annotation controls
        0xE0001,
        *range(0xE0020, 0xE0080),  # tag characters: invisible text
    )
)

_SHORT = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", "\\": "\\\\"}
# json.dumps spells a character beyond U+FFFF as its two surrogates, as JSON must.
_ESCAPES = {char: _SHORT.get(char) or json.dumps(char)[1:-1] for char in UNPRINTABLE | {"\\"}}


def _any_of(chars: frozenset[str]) -> re.Pattern[str]:
    return re.compile("[" + "".join(re.escape(char) for char in sorted(chars)) + "]")


_IN_TEXT = _any_of(UNPRINTABLE | {"\\"})
# JSON text has escaped its backslashes and controls already; what it may still hold raw is
# the rest, and its own line breaks (layout, never inside a string), which stay.
_IN_JSON = _any_of(UNPRINTABLE - {"\n"})


def _escape(match: re.Match[str]) -> str:
    return _ESCAPES[match.group()]


def printable(text: str) -> str:
    """``text`` with every character in UNPRINTABLE, and the backslash, as its JSON escape.

    The result holds none of those characters raw, and distinct texts give distinct results
    (``json.loads('"' + result.replace('"', '\\\\"') + '"') == text``).
    """
    return _IN_TEXT.sub(_escape, text)


def printable_lines(text: str) -> str:
    """Multi-line text (a traceback) with each line through ``printable``; its newlines stay."""
    return "\n".join(printable(line) for line in text.split("\n"))


def printable_json(text: str) -> str:
    """JSON text (as ``json.dumps``/orjson write it) with what JSON leaves raw escaped.

    JSON escapes the C0 controls inside strings but not DEL, the C1 controls, the separators
    or the bidi controls: those become ``\\uXXXX``, which JSON reads back as the same
    character, so the result is the same JSON value. Its own line breaks (indentation) stay.
    """
    return _IN_JSON.sub(_escape, text)


class PrintableFormatter(logging.Formatter):
    """A log formatter that prints each message through ``printable``: one line per record.

    A traceback (``--debug``) keeps its own lines, each escaped the same way.
    """

    def format(self, record: logging.LogRecord) -> str:
        # A copy: other handlers of the same record must still see it as it was logged.
        message = printable(record.getMessage())
        shown = {**record.__dict__, "msg": message, "args": None, "exc_text": None}
        return super().format(logging.makeLogRecord(shown))

    def formatException(self, ei: Any) -> str:
        return printable_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return printable_lines(super().formatStack(stack_info))
