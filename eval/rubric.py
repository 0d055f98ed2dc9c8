"""Domain rubric: pass/fail checks on each answer, reported as pass rates per model.

A rubric is a YAML file (see `default_rubric.yaml`, the fund customer-service rubric, for the
format and every option). `Rubric.check(sample, answer)` returns {check name: True (pass),
False (fail) or None (does not apply)}; `rubric_rates` turns a model's results into rates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunedesk.eval.metrics import normalize_answer

DEFAULT_RUBRIC_PATH = Path(__file__).with_name("default_rubric.yaml")
CHECK_TYPES = ("require", "forbid", "refuse", "answer")
CONDITION_KEYS = (
    "topic_in",
    "reference_contains",
    "reference_regex",
    "question_contains",
    "question_regex",
    "reference_is_refusal",
)
# A claim and a negation before it must sit in the same clause: "虽然不保证收益，但保本" claims.
_CLAUSE_BREAK = re.compile(r"[。！？；，、,.!?;:：\n]|但是|但|却|可是|不过|然而|而且|并且")


class RubricError(ValueError):
    """The rubric file is malformed."""


@dataclass(frozen=True)
class RubricSample:
    """What a check may look at besides the answer."""

    question: str
    reference: str
    topic: str | None = None


@dataclass(frozen=True)
class Claim:
    term: str
    start: int
    negated: bool


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise RubricError(f"{where}: expected a string or a list of strings")


def _regexes(value: Any, where: str) -> tuple[re.Pattern[str], ...]:
    out = []
    for pattern in _strings(value, where):
        try:
            out.append(re.compile(pattern))
        except re.error as exc:
            raise RubricError(f"{where}: bad regular expression {pattern!r}: {exc}") from None
    return tuple(out)


@dataclass(frozen=True)
class Condition:
    """Any one of the listed tests being true makes the condition true."""

    topic_in: tuple[str, ...] = ()
    reference_contains: tuple[str, ...] = ()
    reference_regex: tuple[re.Pattern[str], ...] = ()
    question_contains: tuple[str, ...] = ()
    question_regex: tuple[re.Pattern[str], ...] = ()
    reference_is_refusal: bool = False

    @classmethod
    def parse(cls, raw: Any, where: str) -> Condition | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise RubricError(f"{where}: expected a mapping of conditions")
        unknown = set(raw) - set(CONDITION_KEYS)
        if unknown:
            raise RubricError(
                f"{where}: unknown condition {sorted(unknown)}; known: {', '.join(CONDITION_KEYS)}"
            )
        return cls(
            topic_in=_strings(raw.get("topic_in"), f"{where}.topic_in"),
            reference_contains=tuple(
                normalize_answer(s)
                for s in _strings(raw.get("reference_contains"), f"{where}.reference_contains")
            ),
            reference_regex=_regexes(raw.get("reference_regex"), f"{where}.reference_regex"),
            question_contains=tuple(
                normalize_answer(s)
                for s in _strings(raw.get("question_contains"), f"{where}.question_contains")
            ),
            question_regex=_regexes(raw.get("question_regex"), f"{where}.question_regex"),
            reference_is_refusal=bool(raw.get("reference_is_refusal", False)),
        )

    def holds(self, sample: RubricSample, is_refusal: Any) -> bool:
        ref_n = normalize_answer(sample.reference)
        q_n = normalize_answer(sample.question)
        return (
            (sample.topic is not None and sample.topic in self.topic_in)
            or any(s and s in ref_n for s in self.reference_contains)
            or any(r.search(sample.reference) for r in self.reference_regex)
            or any(s and s in q_n for s in self.question_contains)
            or any(r.search(sample.question) for r in self.question_regex)
            or (self.reference_is_refusal and is_refusal(sample.reference))
        )


@dataclass(frozen=True)
class Check:
    name: str
    type: str
    label: str
    applies_if: Condition | None = None
    unless: Condition | None = None
    phrases: tuple[str, ...] = ()  # require (normalised)
    terms: tuple[str, ...] = ()  # forbid
    negations_before: tuple[str, ...] = ()
    negations_after: tuple[str, ...] = ()
    negation_exceptions: tuple[str, ...] = ()
    window: int = 8


@dataclass
class Rubric:
    name: str
    checks: list[Check]
    refusal_patterns: tuple[re.Pattern[str], ...] = ()
    description: str = ""
    source: str = ""
    _term_res: dict[str, re.Pattern[str]] = field(default_factory=dict, repr=False)

    # --- loading -----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Any, source: str = "") -> Rubric:
        if not isinstance(raw, dict):
            raise RubricError(f"{source or 'rubric'}: expected a YAML mapping at the top level")
        checks: list[Check] = []
        raw_checks = raw.get("checks") or []
        if not isinstance(raw_checks, list):
            raise RubricError(f"{source}: `checks` must be a list")
        seen: set[str] = set()
        for i, rc in enumerate(raw_checks):
            where = f"{source}: checks[{i}]"
            if not isinstance(rc, dict) or not isinstance(rc.get("name"), str):
                raise RubricError(f"{where}: each check needs a `name`")
            name = rc["name"]
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise RubricError(f"{where}: name {name!r} may only use letters, digits, _ . -")
            if name in seen:
                raise RubricError(f"{where}: duplicate check name {name!r}")
            seen.add(name)
            kind = rc.get("type")
            if kind not in CHECK_TYPES:
                raise RubricError(f"{where} ({name}): type must be one of {', '.join(CHECK_TYPES)}")
            check = Check(
                name=name,
                type=kind,
                label=str(rc.get("label") or name),
                applies_if=Condition.parse(rc.get("applies_if"), f"{where}.applies_if"),
                unless=Condition.parse(rc.get("unless"), f"{where}.unless"),
                phrases=tuple(
                    normalize_answer(p) for p in _strings(rc.get("phrases"), f"{where}.phrases")
                ),
                terms=_strings(rc.get("terms"), f"{where}.terms"),
                negations_before=_strings(rc.get("negations_before"), f"{where}.negations_before"),
                negations_after=_strings(rc.get("negations_after"), f"{where}.negations_after"),
                negation_exceptions=_strings(
                    rc.get("negation_exceptions"), f"{where}.negation_exceptions"
                ),
                window=int(rc.get("window", 8)),
            )
            if kind == "require" and not check.phrases:
                raise RubricError(f"{where} ({name}): a require check needs `phrases`")
            if kind == "forbid" and not check.terms:
                raise RubricError(f"{where} ({name}): a forbid check needs `terms`")
            checks.append(check)
        refusal = _regexes(raw.get("refusal_patterns"), f"{source}: refusal_patterns")
        if not refusal and any(
            c.type in ("refuse", "answer")
            or any(cond and cond.reference_is_refusal for cond in (c.applies_if, c.unless))
            for c in checks
        ):
            raise RubricError(f"{source}: refusal checks need `refusal_patterns`")
        return cls(
            name=str(raw.get("name") or Path(source).stem or "rubric"),
            checks=checks,
            refusal_patterns=refusal,
            description=str(raw.get("description") or ""),
            source=source,
        )

    # --- scoring -----------------------------------------------------------------------------

    def is_refusal(self, text: str) -> bool:
        text = (text or "").strip()
        return any(p.search(text) for p in self.refusal_patterns)

    def applies(self, check: Check, sample: RubricSample) -> bool:
        if check.applies_if is not None and not check.applies_if.holds(sample, self.is_refusal):
            return False
        return not (check.unless is not None and check.unless.holds(sample, self.is_refusal))

    def claims(self, check: Check, text: str) -> list[Claim]:
        """Every occurrence of a forbidden term in `text`, with whether it is negated."""
        pattern = self._term_res.get(check.name)
        if pattern is None:
            terms = sorted(set(check.terms), key=len, reverse=True)  # longest first
            pattern = re.compile("|".join(re.escape(t) for t in terms))
            self._term_res[check.name] = pattern
        out = []
        for m in pattern.finditer(text or ""):
            before = _clause_tail(text[: m.start()])
            for word in check.negation_exceptions:  # before windowing: "特别" must not become "别"
                before = before.replace(word, "\x00" * len(word))
            before = before[-check.window :]
            after = _clause_head(text[m.end() :])[: check.window]
            negated = any(n in before for n in check.negations_before) or any(
                n in after for n in check.negations_after
            )
            out.append(Claim(m.group(0), m.start(), negated))
        return out

    def check_one(self, check: Check, sample: RubricSample, answer: str) -> bool | None:
        if not self.applies(check, sample):
            return None
        answer = answer or ""
        if check.type == "require":
            ans_n = normalize_answer(answer)
            return any(p in ans_n for p in check.phrases)
        if check.type == "forbid":
            return not any(not c.negated for c in self.claims(check, answer))
        if check.type == "refuse":
            return self.is_refusal(answer)
        return bool(answer.strip()) and not self.is_refusal(answer)  # "answer"

    def check(self, sample: RubricSample, answer: str) -> dict[str, bool | None]:
        return {c.name: self.check_one(c, sample, answer) for c in self.checks}

    def describe(self) -> list[dict[str, str]]:
        return [{"name": c.name, "label": c.label, "type": c.type} for c in self.checks]


def _clause_tail(text: str) -> str:
    parts = _CLAUSE_BREAK.split(text)
    return parts[-1] if parts else ""


def _clause_head(text: str) -> str:
    return _CLAUSE_BREAK.split(text, maxsplit=1)[0]


def load_rubric(path: str | Path | None = None) -> Rubric:
    """Load a rubric YAML file; None loads the default fund customer-service rubric."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_RUBRIC_PATH
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RubricError(f"can't read rubric {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise RubricError(f"{path}: not valid YAML: {exc}") from None
    return Rubric.from_dict(raw, source=str(path))


def rubric_rates(
    checks: Sequence[Check], results: Iterable[dict[str, bool | None]]
) -> dict[str, dict[str, Any]]:
    """{check: {"rate", "passed", "applicable"}}; rate is None when no sample applied."""
    results = list(results)
    out: dict[str, dict[str, Any]] = {}
    for c in checks:
        values = [r.get(c.name) for r in results if r.get(c.name) is not None]
        passed = sum(1 for v in values if v)
        out[c.name] = {
            "label": c.label,
            "rate": passed / len(values) if values else None,
            "passed": passed,
            "applicable": len(values),
        }
    return out
