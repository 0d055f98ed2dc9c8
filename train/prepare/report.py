"""Readable console rendering of a prepare report (the full report is report.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def print_report(report: dict[str, Any], show: int = 20, out_dir: Path | None = None) -> None:
    console = Console(stderr=False, highlight=False)
    c = report["counts"]
    files = Table(title="inputs", show_edge=False)
    for col in ("file", "format", "rows", "records"):
        files.add_column(col)
    for f in report["inputs"]:
        files.add_row(f["path"], f["format"], str(f["rows"]), str(f["records"]))
    console.print(files)

    summary = Table(title="data", show_header=False, show_edge=False)
    summary.add_column()
    summary.add_column(justify="right")
    rows = [
        ("rows read", c["rows_read"]),
        ("records with errors (left out)", c["records_with_errors"]),
        ("exact duplicates removed", c["exact_duplicates_removed"]),
        ("too long, removed", c["too_long_removed"]),
        ("near-duplicate clusters", c["near_duplicate_clusters"]),
        ("near-duplicates removed", c["near_duplicates_removed"]),
        ("prompts with conflicting answers", c["conflicting_prompts"]),
        ("records with possible PII", c["pii_records"]),
        ("kept", c["kept"]),
        ("train / val / test", " / ".join(str(v) for v in c["splits"].values())),
    ]
    for name, value in rows:
        summary.add_row(name, str(value))
    console.print(summary)

    t = report["tokens"]
    tok = Table(title=f"tokens ({report['tokenizer']['name']})", show_edge=False)
    for col in ("", "p50", "p95", "max", "mean"):
        tok.add_column(col, justify="right")
    for name, key in (
        ("per example", "per_example"),
        ("trained per example", "trained_per_example"),
    ):
        s = t[key]
        tok.add_row(name, f"{s['p50']:.0f}", f"{s['p95']:.0f}", str(s["max"]), str(s["mean"]))
    console.print(tok)
    console.print(
        f"train split: {t['train_tokens_per_epoch']:,} tokens per epoch, of which "
        f"{t['trained_tokens_per_epoch']:,} are trained (answer) tokens"
    )

    problems = report["problems"]
    if problems:
        console.print(
            f"\n[bold]{c['errors']} error(s), {c['warnings']} warning(s)[/bold]: "
            + ", ".join(f"{k} {v}" for k, v in sorted(report["problem_counts"].items()))
        )
        for p in problems[:show]:
            style = "red" if p["severity"] == "error" else "yellow"
            field = f" ({p['field']})" if p.get("field") else ""
            console.print(
                f"  [{style}]{p['severity']}[/{style}] {p['location']}{field}: {p['message']}",
                markup=True,
                soft_wrap=True,
            )
        if len(problems) > show:
            console.print(f"  ... {len(problems) - show} more in report.json")
    if out_dir is not None:
        console.print(f"\nwrote {out_dir}/train.jsonl, val.jsonl, test.jsonl and report.json")
