"""What verify found: one result per check, naming its file, tensor and rule, printed one line each."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from convert.common.errors import ConvertError, escape, shown


@dataclass(frozen=True)
class Result:
    check: str
    file: str | None
    ok: bool
    problem: str | None = None
    tensor: str | None = None

    def line(self) -> str:
        """One line whatever the names hold: file and tensor shown(), the problem escape()d."""
        tensor = self.tensor and f"tensor {shown(self.tensor)}"
        where = ": ".join(part for part in (self.file and shown(self.file), tensor) if part)
        return f"{'ok' if self.ok else 'FAILED'} {self.check}: {where}{': ' if where and self.problem else ''}" + (
            escape(self.problem or "")
        )


@dataclass
class Report:
    folder: str
    layout: str | None = None
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def add_error(self, check: str, error: ConvertError) -> None:
        self.results.append(Result(check, error.file, False, error.rule, error.tensor))

    def as_dict(self) -> dict:
        return {
            "folder": self.folder,
            "layout": self.layout,
            "ok": self.ok,
            "notes": self.notes,
            "results": [asdict(r) for r in self.results],
        }
