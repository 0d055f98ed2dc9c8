"""`tunedesk prepare`: load, validate, clean, de-duplicate and split a fine-tuning dataset.

Read top to bottom: load every input -> normalise text -> structural checks -> PII -> exact
duplicates -> conflicting answers -> token lengths -> near-duplicates -> grouped split ->
atomic writes of train/val/test.jsonl and report.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tunedesk.io import atomic_write_json, atomic_write_jsonl

from .dedup import conversation_key, near_duplicate_examples, prompt_key
from .formats import FormatError, load_file
from .normalize import normalize_record
from .pii import MASKS, find_pii, mask_pii
from .records import Problem, Record
from .split import SPLITS, assign_splits
from .tokens import EstimatingCounter, TokenCounter
from .validate import check_record


@dataclass
class PrepareOptions:
    """Settings of `tunedesk prepare`."""

    format: str | None = None
    """Input format (prompt_completion, chat, alpaca, sharegpt, csv); None detects it per file."""
    question_col: str | None = None
    """CSV/TSV column holding the question (default: detected, e.g. question, 问题)."""
    answer_col: str | None = None
    """CSV/TSV column holding the answer (default: detected, e.g. answer, 答案)."""
    max_tokens: int = 2048
    """Examples longer than this many tokens (whole rendered conversation) are errors."""
    long_answer_tokens: int = 1024
    """Answers longer than this many tokens get a warning."""
    min_examples: int = 100
    """Fewer usable examples than this gets a warning: too few to fine-tune on reliably."""
    near_dup_threshold: float = 0.8
    """Estimated Jaccard similarity (character 3-grams) at which two examples are near-duplicates
    (their questions alone must be at least this minus 0.2 similar: see near_duplicate_examples)."""
    near_dup: Literal["group", "remove", "off"] = "group"
    """group: keep near-duplicates but in one split; remove: keep one per cluster; off: skip."""
    mask_pii: bool = False
    """Replace phone, ID card, bank card and e-mail numbers with placeholders such as [手机号]."""
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """train/val/test shares."""
    seed: int = 0
    """Seed of the split: the same input and seed always give the same split."""
    group_field: str = "group"
    """Input field whose equal values must land in the same split (missing: no grouping)."""
    strict: bool = False
    """Exit non-zero when any record has an error, not only when nothing usable remains."""


@dataclass
class PrepareResult:
    report: dict[str, Any]
    splits: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def usable(self) -> int:
        return self.report["counts"]["kept"]


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"p50": 0, "p95": 0, "max": 0, "mean": 0}
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": int(values.max()),
        "mean": round(float(values.mean()), 1),
    }


def _output_row(record: Record, group_field: str) -> dict[str, Any]:
    row: dict[str, Any] = {"messages": record.messages}
    if record.tools:
        row["tools"] = record.tools
    # Other source columns stay behind: they may hold anything (names, notes, PII).
    wanted = ("group", "dataset", "topic", group_field)
    meta = {k: v for k, v in record.meta.items() if k in wanted}
    meta["source"] = record.location()
    row["meta"] = meta
    return row


def load_inputs(
    inputs: Sequence[str | Path], opts: PrepareOptions
) -> tuple[list[Record], list[Problem], list[dict[str, Any]]]:
    records: list[Record] = []
    problems: list[Problem] = []
    files: list[dict[str, Any]] = []
    for path in inputs:
        result = load_file(
            path, opts.format, question_col=opts.question_col, answer_col=opts.answer_col
        )
        records.extend(result.records)
        problems.extend(result.problems)
        files.append(
            {
                "path": str(path),
                "format": result.format,
                "rows": result.rows_read,
                "records": len(result.records),
            }
        )
    return records, problems, files


def prepare(
    inputs: Sequence[str | Path],
    out_dir: str | Path | None,
    opts: PrepareOptions | None = None,
    tokenizer: Any = None,
    tokenizer_name: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> PrepareResult:
    """Run the whole preparation; writes outputs when `out_dir` is given.

    Raises FormatError for an input that can't be read at all, or a `group_field` that no
    record has. Bad records are reported in the result's report and left out; nothing else
    raises.
    """
    opts = opts or PrepareOptions()
    started = time.perf_counter()
    records, problems, files = load_inputs(inputs, opts)
    rows_read = sum(f["rows"] for f in files)
    log(f"loaded {len(records)} records from {rows_read} rows in {len(files)} file(s)")

    named = opts.group_field != "group"
    for r in records:
        normalize_record(r)
        if named and opts.group_field in r.meta:
            r.meta["group"] = r.meta[opts.group_field]
    if named and records and not any(opts.group_field in r.meta for r in records):
        # A misspelt field would otherwise give a plain split without a word.
        seen = sorted({k for r in records for k in r.meta})
        raise FormatError(
            f"--group-field {opts.group_field!r}: no record has that field"
            + (f" (fields found: {', '.join(seen)})" if seen else "")
        )

    bad: set[int] = set()
    for i, r in enumerate(records):
        for p in check_record(r):
            problems.append(p)
            if p.severity == "error":
                bad.add(i)

    pii_counts = {kind: 0 for kind in MASKS}
    pii_rows = 0
    for r in records:
        found = False
        for j, m in enumerate(r.messages):
            content = m.get("content") or ""
            hits = find_pii(content)
            if not hits:
                continue
            found = True
            for h in hits:
                pii_counts[h.kind] += 1
            kinds = sorted({h.kind for h in hits})
            problems.append(
                Problem(
                    "warning",
                    "pii",
                    f"possible personal data ({', '.join(kinds)})"
                    + (" masked" if opts.mask_pii else "; use --mask-pii to mask it"),
                    r.file,
                    r.line,
                    f"messages[{j}].content",
                )
            )
            if opts.mask_pii:
                m["content"] = mask_pii(content, hits)
        pii_rows += found

    # Exact duplicates: keep the first occurrence.
    first_seen: dict[str, int] = {}
    duplicates = 0
    for i, r in enumerate(records):
        if i in bad:
            continue
        key = conversation_key(r.messages, r.tools)
        if key in first_seen:
            duplicates += 1
            bad.add(i)
            problems.append(
                Problem(
                    "warning",
                    "duplicate",
                    f"exact duplicate of {records[first_seen[key]].location()}; removed",
                    r.file,
                    r.line,
                )
            )
        else:
            first_seen[key] = i
    kept = [i for i in range(len(records)) if i not in bad]

    # Conflicting answers: the same prompt answered differently.
    by_prompt: dict[str, list[int]] = {}
    for i in kept:
        by_prompt.setdefault(prompt_key(records[i].messages), []).append(i)
    conflicts = [ids for ids in by_prompt.values() if len(ids) > 1]
    for ids in conflicts:
        where = ", ".join(records[i].location() for i in ids[:5])
        more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
        first = records[ids[0]]
        problems.append(
            Problem(
                "warning",
                "conflicting_answers",
                f"the same prompt has {len(ids)} different answers: {where}{more}",
                first.file,
                first.line,
            )
        )

    counter: TokenCounter = (
        TokenCounter(tokenizer, tokenizer_name or "tokenizer")
        if tokenizer is not None
        else EstimatingCounter()
    )
    kept_records = [records[i] for i in kept]
    total_tokens, loss_tokens, answer_tokens = counter.count(kept_records)
    too_long: set[int] = set()
    for k, i in enumerate(kept):
        r = records[i]
        if total_tokens[k] > opts.max_tokens:
            too_long.add(i)
            problems.append(
                Problem(
                    "error",
                    "too_long",
                    f"{int(total_tokens[k])} tokens, over the limit of {opts.max_tokens} "
                    "(raise --max-tokens or shorten it)",
                    r.file,
                    r.line,
                    "messages",
                )
            )
        elif answer_tokens[k] > opts.long_answer_tokens:
            problems.append(
                Problem(
                    "warning",
                    "long_answer",
                    f"an answer of {int(answer_tokens[k])} tokens (over {opts.long_answer_tokens})",
                    r.file,
                    r.line,
                    "messages",
                )
            )
    keep_mask = np.array([i not in too_long for i in kept], dtype=bool)
    kept = [i for i in kept if i not in too_long]
    total_tokens, loss_tokens = total_tokens[keep_mask], loss_tokens[keep_mask]

    # Near-duplicates, and the groups that must not straddle splits.
    parent = list(range(len(kept)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    near_clusters = 0
    near_removed: set[int] = set()
    if opts.near_dup != "off" and kept:
        cluster = near_duplicate_examples(
            [records[i].messages for i in kept], threshold=opts.near_dup_threshold
        )
        sizes = np.bincount(cluster, minlength=len(kept))
        near_clusters = int((sizes > 1).sum())
        for k, c in enumerate(cluster):
            if c != k:
                if opts.near_dup == "remove":
                    near_removed.add(k)
                else:
                    union(k, int(c))
        for c in np.nonzero(sizes > 1)[0]:
            lead = records[kept[int(c)]]
            problems.append(
                Problem(
                    "warning",
                    "near_duplicate",
                    f"{int(sizes[c]) - 1} near-duplicate(s) of this example (similarity >= "
                    f"{opts.near_dup_threshold})"
                    + ("; removed" if opts.near_dup == "remove" else "; kept in one split"),
                    lead.file,
                    lead.line,
                )
            )
    position = {i: k for k, i in enumerate(kept)}
    for ids in conflicts:
        live = [position[i] for i in ids if i in position]
        for k in live[1:]:
            union(live[0], k)
    label_owner: dict[str, int] = {}
    for k, i in enumerate(kept):
        label = records[i].meta.get("group")
        if label is not None:
            label = str(label)
            if label in label_owner:
                union(label_owner[label], k)
            else:
                label_owner[label] = k

    final = [k for k in range(len(kept)) if k not in near_removed]
    group_of = [find(k) for k in final]
    labels: dict[int, str] = {}
    for k in final:
        g = find(k)
        if g not in labels:
            r = records[kept[g]]
            labels[g] = str(r.meta.get("group") or conversation_key(r.messages, r.tools))
    split_names = assign_splits(group_of, labels, opts.ratios, opts.seed)

    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    split_tokens = {name: 0 for name in SPLITS}
    for k, name in zip(final, split_names, strict=True):
        splits[name].append(_output_row(records[kept[k]], opts.group_field))
        split_tokens[name] += int(total_tokens[k])
    final_mask = np.zeros(len(kept), dtype=bool)
    final_mask[final] = True

    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    if len(final) < opts.min_examples:
        warnings.append(
            Problem(
                "warning",
                "few_examples",
                f"only {len(final)} usable examples; at least {opts.min_examples} are "
                "recommended for fine-tuning",
                ", ".join(f["path"] for f in files),
            )
        )
    by_code: dict[str, int] = {}
    for p in errors + warnings:
        by_code[p.code] = by_code.get(p.code, 0) + 1
    report: dict[str, Any] = {
        "inputs": files,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "tokenizer": {"name": counter.name, "exact": counter.exact},
        "counts": {
            "rows_read": rows_read,
            "records": len(records),
            "errors": len(errors),
            "warnings": len(warnings),
            "records_with_errors": len({(p.file, p.line) for p in errors}),
            "exact_duplicates_removed": duplicates,
            "too_long_removed": len(too_long),
            "near_duplicate_clusters": near_clusters,
            "near_duplicates_removed": len(near_removed),
            "conflicting_prompts": len(conflicts),
            "pii_records": pii_rows,
            "pii": pii_counts,
            "kept": len(final),
            "splits": {name: len(rows) for name, rows in splits.items()},
            "groups": len(set(group_of)),
        },
        "problem_counts": by_code,
        "tokens": {
            "per_example": _percentiles(total_tokens[final_mask]),
            "trained_per_example": _percentiles(loss_tokens[final_mask]),
            "train_tokens_per_epoch": split_tokens["train"],
            "trained_tokens_per_epoch": int(
                sum(loss_tokens[k] for k, n in zip(final, split_names, strict=True) if n == "train")
            ),
            "per_split": split_tokens,
        },
        "problems": [asdict(p) | {"location": p.location()} for p in errors + warnings],
        "seconds": round(time.perf_counter() - started, 3),
    }
    if out_dir is not None:
        out = Path(out_dir)
        for name, rows in splits.items():
            atomic_write_jsonl(out / f"{name}.jsonl", rows)
        report["seconds"] = round(time.perf_counter() - started, 3)
        atomic_write_json(out / "report.json", report)
    return PrepareResult(report=report, splits=splits)


__all__ = ["FormatError", "PrepareOptions", "PrepareResult", "prepare"]
