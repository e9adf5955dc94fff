"""What ``accelerate`` did to a model: replaced layers, skipped layers with reasons, notes."""
from __future__ import annotations

import dataclasses
from typing import Dict, List


class UnsupportedModelError(RuntimeError):
    """Raised by ``accelerate(model, strict=True)`` when some layer could not be replaced."""

    def __init__(self, report: "AccelerationReport"):
        self.report = report
        lines = [f"  {path}: {reason}" for path, reason in report.skipped.items()]
        if not report.replaced and not lines:
            lines = ["  no layer fastpatch knows was found"]
        super().__init__(f"fastpatch could not accelerate all of {report.model_class}:\n" + "\n".join(lines))


@dataclasses.dataclass
class AccelerationReport:
    """``replaced``: module path -> fused type; ``skipped``: module path -> why it was left alone."""

    model_class: str
    replaced: Dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: Dict[str, str] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)

    @property
    def fully_accelerated(self) -> bool:
        return bool(self.replaced) and not self.skipped

    def summary(self) -> str:
        return (f"fastpatch: {self.model_class}: replaced {len(self.replaced)} module(s), "
                f"left {len(self.skipped)} alone" + (f" ({len(self.notes)} note(s))" if self.notes else ""))

    def __str__(self) -> str:
        rows = [(path, "replaced", kind) for path, kind in self.replaced.items()]
        rows += [(path, "skipped", reason) for path, reason in self.skipped.items()]
        lines = [self.summary()]
        if rows:
            width = max(len(r[0]) for r in rows)
            lines += [f"  {path:<{width}}  {status:<8}  {detail}" for path, status, detail in rows]
        lines += [f"  note: {n}" for n in self.notes]
        if not self.replaced:
            lines.append("  nothing was replaced: the model runs exactly as before")
        return "\n".join(lines)
