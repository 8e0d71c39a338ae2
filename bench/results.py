"""What a scenario reports: rows (gurutunnel, baseline, ratio, goal, pass) and details.

A row's ``ratio`` is gurutunnel / baseline from the same run. A goal is either on the ratio
(``ratio<=`` / ``ratio>=``) or on gurutunnel's value itself (``<=`` / ``>=``); ``passed`` is None
for a row without a goal (information) or whose baseline is missing, and False when gurutunnel's
own value is missing (the measurement did not complete: a storm that never finished, probes that
never got an answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .stats import ratio

GoalKind = Literal["ratio<=", "ratio>=", "<=", ">="]


@dataclass(frozen=True)
class Goal:
    kind: GoalKind
    value: float

    def text(self, unit: str) -> str:
        sign = "≤" if self.kind.endswith("<=") else "≥"
        if self.kind.startswith("ratio"):
            return f"{sign} {self.value:g}x baseline"
        return f"{sign} {self.value:g} {unit}".rstrip()

    def judge(self, value: float | None, ratio_value: float | None) -> bool | None:
        if value is None or math.isnan(value):
            return False  # gurutunnel's side did not complete: never "not judged"
        subject = ratio_value if self.kind.startswith("ratio") else value
        if subject is None or math.isnan(subject):
            return None
        return subject <= self.value if self.kind.endswith("<=") else subject >= self.value


@dataclass
class Row:
    metric: str
    unit: str
    gurutunnel: float | None
    baseline: float | None = None
    baseline_name: str | None = None
    goal: Goal | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return ratio(self.gurutunnel, self.baseline)

    @property
    def passed(self) -> bool | None:
        return None if self.goal is None else self.goal.judge(self.gurutunnel, self.ratio)

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "unit": self.unit,
            "gurutunnel": self.gurutunnel,
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "ratio": self.ratio,
            "goal": None
            if self.goal is None
            else {
                "kind": self.goal.kind,
                "value": self.goal.value,
                "text": self.goal.text(self.unit),
            },
            "passed": self.passed,
            "note": self.note,
        }


@dataclass
class ScenarioResult:
    key: str
    number: int
    title: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    """Raw series for the plots (latencies in ms, memory points, ...)."""
    duration_s: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "title": self.title,
            "rows": [row.to_json() for row in self.rows],
            "details": self.details,
            "samples": self.samples,
            "duration_s": self.duration_s,
            "error": self.error,
        }
