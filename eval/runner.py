"""Run every model on the test set, score the answers, and build summary.json / samples.jsonl.

`run_eval` is the whole evaluation without the command line around it: resolve nothing, write
nothing; `write_outputs` writes the three output files atomically.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunedesk.eval import metrics as M
from tunedesk.eval.data import EvalSample, Generation
from tunedesk.eval.rubric import Rubric, RubricSample, rubric_rates
from tunedesk.eval.specs import ModelSpec, read_job_curves


class ModelLoadError(RuntimeError):
    """A local model (or its tokenizer) can't be loaded, or runs out of memory."""


@dataclass(frozen=True)
class MetricInfo:
    key: str
    label: str
    family: str
    better: str  # "higher", "lower", "one" (closest to 1), "none"
    fmt: str = "{:.3f}"
    help: str = ""


# Every key of a model's "metrics" in summary.json, in report order.
METRICS: tuple[MetricInfo, ...] = (
    MetricInfo("em", "Exact match", "overlap", "higher", help="normalised strings equal"),
    MetricInfo("char_f1", "Char F1", "overlap", "higher", help="CMRC-2018 tokens, bag overlap"),
    MetricInfo("char_precision", "Char precision", "overlap", "higher"),
    MetricInfo("char_recall", "Char recall", "overlap", "higher"),
    MetricInfo("rouge_l", "ROUGE-L (char)", "overlap", "higher", help="LCS F1 on characters"),
    MetricInfo("bleu", "BLEU-4 (corpus)", "sacrebleu", "higher", "{:.2f}", "tokenize=zh, 0-100"),
    MetricInfo("sentence_bleu", "BLEU-4 (sentence mean)", "sacrebleu", "higher", "{:.2f}"),
    MetricInfo("chrf", "chrF (corpus)", "sacrebleu", "higher", "{:.2f}", "0-100"),
    MetricInfo("sentence_chrf", "chrF (sentence mean)", "sacrebleu", "higher", "{:.2f}"),
    MetricInfo("length_ratio", "Length ratio", "length", "one", "{:.2f}", "answer / reference"),
    MetricInfo("loss", "Answer loss (nats)", "loss", "lower", help="reference answer tokens"),
    MetricInfo("perplexity", "Answer perplexity", "loss", "lower", "{:.2f}"),
    MetricInfo("latency_s", "Latency mean (s)", "speed", "lower", "{:.3f}"),
    MetricInfo("latency_p50_s", "Latency p50 (s)", "speed", "lower", "{:.3f}"),
    MetricInfo("latency_p95_s", "Latency p95 (s)", "speed", "lower", "{:.3f}"),
    MetricInfo("tokens_per_s", "Output tokens/s", "speed", "higher", "{:.1f}"),
    MetricInfo("output_tokens", "Output tokens (mean)", "speed", "none", "{:.1f}"),
    MetricInfo("truncated", "Hit max tokens", "health", "lower", "{:.1%}"),
    MetricInfo("error_rate", "Failed requests", "health", "lower", "{:.1%}"),
)
METRIC_KEYS = tuple(m.key for m in METRICS)
PER_SAMPLE_KEYS = (
    "em",
    "char_f1",
    "char_precision",
    "char_recall",
    "rouge_l",
    "bleu",
    "chrf",
    "length_ratio",
)


@dataclass
class EvalOptions:
    max_tokens: int = 256
    batch_size: int = 8
    concurrency: int = 8
    api_key: str = "EMPTY"
    timeout: float = 120.0
    device: str = "auto"
    dtype: str = "auto"
    compute_loss: bool = True
    progress: bool = True


@dataclass
class ModelRun:
    spec: ModelSpec
    generations: list[Generation]
    wall_s: float
    losses: list[tuple[float, int]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q", file=sys.stderr, disable=not enabled, leave=True)


def run_model(
    spec: ModelSpec,
    samples: Sequence[EvalSample],
    opts: EvalOptions,
    log: Callable[[str], None] = print,
) -> ModelRun:
    """Generate answers (and, for local models, measure the reference-answer loss)."""
    if spec.kind == "endpoint":
        from tunedesk.eval import endpoint

        assert spec.base_url is not None
        log(f"{spec.label}: endpoint {spec.base_url} (concurrency {opts.concurrency})")
        with _bar(len(samples), f"{spec.label}: answer", opts.progress) as bar:
            name, gens, wall = endpoint.generate(
                spec.base_url,
                spec.endpoint_model,
                samples,
                api_key=opts.api_key,
                max_tokens=opts.max_tokens,
                concurrency=opts.concurrency,
                timeout=opts.timeout,
                progress=bar.update,
            )
        spec.endpoint_model = name
        return ModelRun(spec, gens, wall, None, {"endpoint_model": name})

    from tunedesk.eval import local

    assert spec.path is not None
    started = time.perf_counter()
    try:
        lm = local.load_local(spec.path, device=opts.device, dtype=opts.dtype)
    except Exception as exc:  # OSError, ValueError, ... from transformers
        raise ModelLoadError(f"{spec.label}: can't load {spec.path}: {exc}") from exc
    log(
        f"{spec.label}: local model {spec.path} on {lm.device} ({lm.dtype}), loaded in "
        f"{time.perf_counter() - started:.1f}s; batch size {opts.batch_size}"
    )
    try:
        with _bar(len(samples), f"{spec.label}: answer", opts.progress) as bar:
            gens, wall = local.generate(
                lm, samples, opts.max_tokens, opts.batch_size, progress=bar.update
            )
        losses = None
        if opts.compute_loss:
            with _bar(len(samples), f"{spec.label}: loss", opts.progress) as bar:
                losses = local.answer_losses(lm, samples, opts.batch_size, progress=bar.update)
        info = {"device": str(lm.device), "dtype": lm.dtype}
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if "out of memory" not in str(exc).lower():
            raise
        raise ModelLoadError(
            f"{spec.label}: out of memory on {lm.device} at batch size {opts.batch_size}; "
            "lower --batch-size or --max-tokens"
        ) from None
    finally:
        lm.close()
        del lm
        gc.collect()
    return ModelRun(spec, gens, wall, losses, info)


def _rubric_sample(s: EvalSample) -> RubricSample:
    return RubricSample(question=s.question, reference=s.reference, topic=s.topic)


def score_run(
    run: ModelRun, samples: Sequence[EvalSample], rubric: Rubric | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the model's entry in summary.json, its per-sample scores)."""
    preds = [g.answer for g in run.generations]
    refs = [s.reference for s in samples]
    per: list[dict[str, Any]] = []
    for i, (s, g) in enumerate(zip(samples, run.generations, strict=True)):
        scores: dict[str, Any] = M.sample_scores(g.answer, s.reference)
        if run.losses is not None:
            nll, n_tok = run.losses[i]
            scores["loss"] = nll / n_tok if n_tok else None
            scores["answer_tokens"] = n_tok
        scores["latency_s"] = g.latency_s
        scores["output_tokens"] = g.output_tokens
        scores["finish_reason"] = g.finish_reason
        if g.error:
            scores["error"] = g.error
        if rubric is not None:
            scores["rubric"] = rubric.check(_rubric_sample(s), g.answer)
        per.append(scores)

    metrics: dict[str, float | None] = {k: None for k in METRIC_KEYS}
    for key in ("em", "char_f1", "char_precision", "char_recall", "rouge_l", "length_ratio"):
        metrics[key] = M.mean([p[key] for p in per])
    metrics["bleu"] = M.corpus_bleu(preds, refs)
    metrics["chrf"] = M.corpus_chrf(preds, refs)
    metrics["sentence_bleu"] = M.mean([p["bleu"] for p in per])
    metrics["sentence_chrf"] = M.mean([p["chrf"] for p in per])
    if run.losses is not None:
        total_nll = sum(n for n, _ in run.losses)
        total_tok = sum(t for _, t in run.losses)
        if total_tok:
            metrics["loss"] = total_nll / total_tok  # token-weighted over the whole set
            metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
    latencies = [g.latency_s for g in run.generations if g.latency_s is not None and not g.error]
    metrics["latency_s"] = M.mean(latencies)
    metrics["latency_p50_s"] = M.percentile(latencies, 50)
    metrics["latency_p95_s"] = M.percentile(latencies, 95)
    tokens = [g.output_tokens for g in run.generations if not g.error]
    if tokens and all(t is not None for t in tokens):
        metrics["output_tokens"] = M.mean(tokens)
        metrics["tokens_per_s"] = sum(tokens) / run.wall_s if run.wall_s > 0 else None
    n = len(samples)
    metrics["truncated"] = sum(g.finish_reason == "length" for g in run.generations) / n
    errors = sum(1 for g in run.generations if g.error)
    metrics["error_rate"] = errors / n

    entry: dict[str, Any] = run.spec.describe()
    entry.update(run.info)
    entry.update(
        {
            "n": n,
            "errors": errors,
            "generation_wall_s": run.wall_s,
            "metrics": metrics,
            "rubric": rubric_rates(rubric.checks, [p["rubric"] for p in per]) if rubric else {},
            "by_topic": _by_topic(samples, per),
        }
    )
    return entry, per


def _by_topic(samples: Sequence[EvalSample], per: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for s, p in zip(samples, per, strict=True):
        if s.topic is not None:
            groups.setdefault(s.topic, []).append(p)
    return {
        topic: {
            "n": len(ps),
            "em": M.mean([p["em"] for p in ps]),
            "char_f1": M.mean([p["char_f1"] for p in ps]),
            "rouge_l": M.mean([p["rouge_l"] for p in ps]),
        }
        for topic, ps in sorted(groups.items())
    }


@dataclass
class EvalResult:
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    curves: dict[str, dict[str, Any]]  # model label -> job loss curves


def run_eval(
    specs: Sequence[ModelSpec],
    samples: Sequence[EvalSample],
    rubric: Rubric | None,
    opts: EvalOptions,
    data_path: str | Path = "",
    log: Callable[[str], None] = print,
) -> EvalResult:
    models: list[dict[str, Any]] = []
    per_model: list[list[dict[str, Any]]] = []
    answers: list[list[str]] = []
    curves: dict[str, dict[str, Any]] = {}
    for k, spec in enumerate(specs, 1):
        log(f"[{k}/{len(specs)}] {spec.label}")
        run = run_model(spec, samples, opts, log=log)
        entry, per = score_run(run, samples, rubric)
        if spec.run_dir is not None:
            job_curves = read_job_curves(spec.run_dir)
            if job_curves is not None:
                curves[spec.label] = job_curves
                entry["base_model"] = job_curves.get("base_model")
        models.append(entry)
        per_model.append(per)
        answers.append([g.answer for g in run.generations])

    rows = []
    for i, s in enumerate(samples):
        rows.append(
            {
                "index": s.index,
                "question": s.question,
                "reference": s.reference,
                "meta": s.meta,
                "prompt": s.prompt,
                "answers": {m["label"]: answers[j][i] for j, m in enumerate(models)},
                "scores": {m["label"]: per_model[j][i] for j, m in enumerate(models)},
            }
        )
    summary = {
        "tool": "tunedesk eval",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": str(data_path),
        "n": len(samples),
        "settings": {
            "max_tokens": opts.max_tokens,
            "batch_size": opts.batch_size,
            "concurrency": opts.concurrency,
            "temperature": 0,
        },
        "rubric": (
            {
                "name": rubric.name,
                "source": rubric.source,
                "description": rubric.description,
                "checks": rubric.describe(),
            }
            if rubric is not None
            else None
        ),
        "metric_definitions": {m.key: {"label": m.label, "better": m.better} for m in METRICS},
        "models": models,
        "gates": [],
        "passed": True,
    }
    return EvalResult(summary, rows, curves)


def write_outputs(result: EvalResult, out_dir: str | Path, worst: int = 20) -> dict[str, Path]:
    from tunedesk.eval.report import render_report
    from tunedesk.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

    out = Path(out_dir)
    paths = {
        "samples": out / "samples.jsonl",
        "summary": out / "summary.json",
        "report": out / "report.html",
    }
    atomic_write_jsonl(paths["samples"], result.rows)
    atomic_write_json(paths["summary"], result.summary)
    atomic_write_text(
        paths["report"], render_report(result.summary, result.rows, result.curves, worst)
    )
    return paths
