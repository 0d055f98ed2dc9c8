"""`tunedesk eval`: score one or more models on a test set and write a report. Argument
parsing only; the work (torch, transformers, openai, sacrebleu) is imported inside the handler."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tunedesk import paths
from tunedesk.errors import CommandError

GATE_EXIT_CODE = 3

EPILOG = """\
models (--model, repeatable; the last one is the candidate that gates apply to by default):
  [LABEL=]PATH                  a model folder (or a hub id, org/name)
  [LABEL=]JOB_ID                a training job under runs/: its merged model
                                (models/<job-id>-merged) plus its loss curves in the report
  [LABEL=]http://HOST:PORT/v1#MODEL
                                an OpenAI-compatible endpoint and the model name to request;
                                without #MODEL the endpoint's only model is used

gates (repeatable; exit code 3 when any fails, after all outputs are written):
  --fail-under char_f1=0.4          the last model's char F1 must be >= 0.4
  --fail-under ft:em=0.2            the model labelled ft
  --fail-under no_forbidden_claims=1  a rubric check's pass rate
  --fail-over ft:latency_p95_s=2.0  an upper bound (loss, perplexity, latency, ...)

examples:
  tunedesk eval --model base=models/tiny-base --model ft=ftjob-0123abcd4567 \\
      --data data/prepared/test.jsonl --out runs/eval-ft --fail-under ft:char_f1=0.4
  tunedesk eval --model http://127.0.0.1:8000/v1#fund-assistant --out runs/eval-served
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score models on a test set (char F1, ROUGE-L, BLEU, domain rubric) with a report",
        description="Answers every test question with each model (greedy, batched for local "
        "models, concurrent for endpoints), scores the answers against the references "
        "(exact match, char F1, ROUGE-L, BLEU-4, chrF, length ratio, answer loss, latency) "
        "and a domain rubric, and writes summary.json, samples.jsonl and a self-contained "
        "report.html into --out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[LABEL=]SPEC",
        help="model folder, job id or endpoint URL#model (repeatable; see below)",
    )
    p.add_argument(
        "--data", type=Path, default=None, help="test JSONL (default: data/prepared/test.jsonl)"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--rubric",
        type=Path,
        default=None,
        help="domain rubric YAML (default: the built-in fund customer-service rubric)",
    )
    p.add_argument("--no-rubric", action="store_true", help="skip the domain rubric")
    p.add_argument(
        "--fail-under",
        action="append",
        default=[],
        metavar="[MODEL:]METRIC=VALUE",
        help="fail (exit 3) if the metric is below VALUE",
    )
    p.add_argument(
        "--fail-over",
        action="append",
        default=[],
        metavar="[MODEL:]METRIC=VALUE",
        help="fail (exit 3) if the metric is above VALUE",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N test records")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per answer (256)")
    p.add_argument("--batch-size", type=int, default=8, help="local models: prompts per batch")
    p.add_argument("--concurrency", type=int, default=8, help="endpoints: requests in flight")
    p.add_argument(
        "--api-key", default=None, help="endpoint API key (default: $OPENAI_API_KEY, else none)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="endpoint request timeout (s)")
    p.add_argument("--device", default="auto", help="local models: auto, cpu, cuda, cuda:1, mps")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="local models: auto = bfloat16 on a bf16 GPU, else float32",
    )
    p.add_argument(
        "--no-loss", action="store_true", help="local models: skip the reference-answer loss"
    )
    p.add_argument("--worst", type=int, default=20, help="worst samples shown in the report")
    p.set_defaults(handler=_eval)


def _positive(name: str, value: Any) -> None:
    if value is not None and value <= 0:
        raise CommandError(f"--{name} must be positive, got {value}")


def _eval(args: argparse.Namespace) -> int:
    from tunedesk.chat_format import ChatFormatError
    from tunedesk.eval.data import DataError, load_test_set
    from tunedesk.eval.endpoint import EndpointError
    from tunedesk.eval.gates import GateError, evaluate_gates, parse_gate, validate_gates
    from tunedesk.eval.rubric import RubricError, load_rubric
    from tunedesk.eval.runner import METRIC_KEYS, EvalOptions, ModelLoadError, run_eval
    from tunedesk.eval.runner import write_outputs as write
    from tunedesk.eval.specs import SpecError, resolve_all

    for name in ("limit", "max_tokens", "batch_size", "concurrency", "timeout"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.worst < 0:
        raise CommandError(f"--worst must be 0 or more, got {args.worst}")

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        gates = [parse_gate(g, "under") for g in args.fail_under]
        gates += [parse_gate(g, "over") for g in args.fail_over]
        data_path = args.data or paths.data_dir() / "prepared" / "test.jsonl"
        samples = load_test_set(data_path, limit=args.limit)
        rubric = None if args.no_rubric else load_rubric(args.rubric)
        specs = resolve_all(args.model)
        keys = set(METRIC_KEYS) | ({c.name for c in rubric.checks} if rubric else set())
        validate_gates(gates, [s.label for s in specs], keys)
    except (GateError, DataError, RubricError, SpecError) as exc:
        raise CommandError(str(exc)) from None

    opts = EvalOptions(
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
        timeout=args.timeout,
        device=args.device,
        dtype=args.dtype,
        compute_loss=not args.no_loss,
        progress=True,
    )
    log(f"evaluating {len(specs)} model(s) on {len(samples)} test records from {data_path}")
    try:
        result = run_eval(specs, samples, rubric, opts, data_path=data_path, log=log)
    except (EndpointError, ModelLoadError, ChatFormatError) as exc:
        raise CommandError(str(exc)) from None

    gate_results = evaluate_gates(gates, result.summary["models"])
    result.summary["gates"] = gate_results
    result.summary["passed"] = all(g["passed"] for g in gate_results)
    written = write(result, args.out, worst=args.worst)

    _print_summary(result.summary)
    for path in written.values():
        print(f"wrote {path}")
    failed = [g for g in gate_results if not g["passed"]]
    for g in gate_results:
        if g["passed"]:
            print(f"gate passed: {g['message']}")
    if failed:
        print(f"tunedesk eval: {len(failed)} of {len(gate_results)} gates failed:", file=sys.stderr)
        for g in failed:
            print(f"  FAILED {g['message']}", file=sys.stderr)
        return GATE_EXIT_CODE
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    keys = [
        ("em", "EM", "{:.3f}"),
        ("char_f1", "char F1", "{:.3f}"),
        ("rouge_l", "ROUGE-L", "{:.3f}"),
        ("bleu", "BLEU", "{:.1f}"),
        ("chrf", "chrF", "{:.1f}"),
        ("length_ratio", "len", "{:.2f}"),
        ("loss", "loss", "{:.3f}"),
        ("latency_s", "s/answer", "{:.2f}"),
        ("tokens_per_s", "tok/s", "{:.0f}"),
    ]
    table = Table(title=f"{summary['n']} test records", title_justify="left")
    table.add_column("model", no_wrap=True)
    for _, head, _ in keys:
        table.add_column(head, justify="right", no_wrap=True)
    for m in summary["models"]:
        cells = [m["label"]]
        for key, _, fmt in keys:
            v = m["metrics"].get(key)
            cells.append("–" if v is None else fmt.format(v))
        table.add_row(*cells)
    console.print(table)
    checks = (summary.get("rubric") or {}).get("checks", [])
    if checks:
        rubric = Table(title="rubric pass rates", title_justify="left")
        rubric.add_column("check", no_wrap=True)
        for m in summary["models"]:
            rubric.add_column(m["label"], justify="right", no_wrap=True)
        for c in checks:
            cells = [c["name"]]
            for m in summary["models"]:
                item = (m.get("rubric") or {}).get(c["name"]) or {}
                rate = item.get("rate")
                cells.append(
                    "–" if rate is None else f"{rate:.0%} ({item['passed']}/{item['applicable']})"
                )
            rubric.add_row(*cells)
        console.print(rubric)
