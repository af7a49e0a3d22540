"""The one error type the tool reports: a single line naming the file, the tensor and the rule broken.

Names in messages come from the input (tensor names, pickle globals, shard names from an index, file names in a
folder, JSON keys) and may hold any character. A line break in one would split the "one line" error in two, and
the second could read like another message; bidi overrides and other invisible characters could make a line read
unlike what it says. So every line is escaped where names enter it: shown() for a field that is a name, escape()
for text that may have names inside it; log records are escaped by a filter on the tool's logger.
"""

from __future__ import annotations

import logging
from pathlib import Path


def shown(name: str) -> str:
    """A name from a file as messages show it: as it is when every character is printable (plain names stay
    readable), else repr-quoted, so \\n, \\x00, \\u202e and lone surrogates appear as escapes. A printable name that
    could be mistaken for such an escape (a backslash, a leading quote) is quoted too, so the two never look
    alike."""
    if name.isprintable() and "\\" not in name and not name.startswith(("'", '"')):
        return name
    return repr(name)


class _OneLineRecords(logging.Filter):
    """Every record of the tool's logger as one line: string arguments (names, labels) shown(), the message
    escape()d. The record then carries the finished message and no arguments, whatever formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = tuple(shown(a) if isinstance(a, str) else a for a in args)
        record.msg = escape(record.getMessage())
        record.args = ()
        return True


logging.getLogger("mixtral-convert").addFilter(_OneLineRecords())


class ConvertError(Exception):
    """A problem with the input, the output location or the request, reported as one line."""

    def __init__(self, rule: str, *, file: str | Path | None = None, tensor: str | None = None) -> None:
        self.rule = rule
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        super().__init__(self.line())

    def line(self) -> str:
        parts = []
        if self.file:
            parts.append(shown(self.file))
        if self.tensor:
            parts.append(f"tensor {shown(self.tensor)}")
        parts.append(escape(self.rule))  # the rule may embed names (a pickle global, a shard from an index)
        return ": ".join(parts)


def escape(text: str) -> str:
    """text for a one-line message: unchanged when printable, else with control characters (newlines
    included) written as Python escapes, so nothing from a file can start a second line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
