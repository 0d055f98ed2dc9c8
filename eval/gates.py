"""Quality gates: `--fail-under [MODEL:]METRIC=VALUE` and `--fail-over [MODEL:]METRIC=VALUE`.

A gate without MODEL applies to the last --model (the candidate). METRIC is any key of a
model's `metrics` in summary.json or the name of a rubric check (its pass rate); an unmeasured
metric (e.g. loss of an endpoint) fails its gate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Friendly spellings accepted on the command line.
ALIASES = {
    "exact_match": "em",
    "f1": "char_f1",
    "rougel": "rouge_l",
    "rouge-l": "rouge_l",
    "ppl": "perplexity",
    "latency": "latency_s",
    "tps": "tokens_per_s",
}
_GATE = re.compile(r"^(?:(?P<model>[A-Za-z0-9_.-]+):)?(?P<metric>[A-Za-z0-9_.-]+)=(?P<value>.+)$")


class GateError(ValueError):
    """A gate that can't be parsed or names an unknown model or metric."""


@dataclass(frozen=True)
class Gate:
    model: str | None
    metric: str
    op: str  # "under" (fail if value < threshold) or "over" (fail if value > threshold)
    threshold: float
    raw: str

    @property
    def flag(self) -> str:
        return f"--fail-{self.op} {self.raw}"


def parse_gate(text: str, op: str) -> Gate:
    m = _GATE.match(text.strip())
    if not m:
        raise GateError(
            f"--fail-{op} {text!r}: expected METRIC=VALUE or MODEL:METRIC=VALUE, "
            "e.g. char_f1=0.4 or ft:char_f1=0.4"
        )
    try:
        threshold = float(m.group("value"))
    except ValueError:
        raise GateError(f"--fail-{op} {text!r}: {m.group('value')!r} is not a number") from None
    if threshold != threshold:
        raise GateError(f"--fail-{op} {text!r}: the threshold is NaN")
    metric = m.group("metric")
    metric = ALIASES.get(metric.lower(), metric)
    if metric.startswith("rubric."):
        metric = metric[len("rubric.") :]
    return Gate(m.group("model"), metric, op, threshold, text.strip())


def validate_gates(gates: list[Gate], labels: list[str], metric_keys: set[str]) -> None:
    for g in gates:
        if g.model is not None and g.model not in labels:
            raise GateError(
                f"{g.flag}: no model labelled {g.model!r} (models: {', '.join(labels)})"
            )
        if g.metric not in metric_keys:
            raise GateError(
                f"{g.flag}: unknown metric {g.metric!r}; known: {', '.join(sorted(metric_keys))}"
            )


def metric_value(model_summary: dict[str, Any], key: str) -> float | None:
    metrics = model_summary.get("metrics", {})
    if key in metrics:
        return metrics[key]
    item = model_summary.get("rubric", {}).get(key)
    return item.get("rate") if isinstance(item, dict) else None


def evaluate_gates(gates: list[Gate], models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per gate: {gate, model, metric, op, threshold, value, passed, message}."""
    by_label = {m["label"]: m for m in models}
    results = []
    for g in gates:
        label = g.model or models[-1]["label"]
        value = metric_value(by_label[label], g.metric)
        if value is None:
            passed = False
            message = f"{label}: {g.metric} was not measured ({g.flag})"
        else:
            passed = value >= g.threshold if g.op == "under" else value <= g.threshold
            sign = (
                (">=" if g.op == "under" else "<=") if passed else ("<" if g.op == "under" else ">")
            )
            message = f"{label}: {g.metric} = {value:.4g} {sign} {g.threshold:g} ({g.flag})"
        results.append(
            {
                "gate": g.flag,
                "model": label,
                "metric": g.metric,
                "op": g.op,
                "threshold": g.threshold,
                "value": value,
                "passed": passed,
                "message": message,
            }
        )
    return results
