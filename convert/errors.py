"""The one error type the tool reports: a single line naming the file, the tensor and the rule broken."""

from __future__ import annotations

from pathlib import Path


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
            parts.append(self.file)
        if self.tensor:
            parts.append(f"tensor {self.tensor}")
        parts.append(self.rule)
        return ": ".join(parts)


def escape(text: str) -> str:
    """text for a one-line message: unchanged when printable, else with control characters (newlines
    included) written as Python escapes, so nothing from a file can start a second line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
