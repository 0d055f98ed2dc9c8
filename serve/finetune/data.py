"""Turn a job's uploaded files into the prepared splits the trainer reads: `tunedesk prepare`'s
pipeline (load, normalise, validate, de-duplicate), written to `runs/<job-id>/data/`.

The training file is split 90/10 into train/val only when no validation file was given; a
validation file is prepared on its own and used whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedesk.io import atomic_write_json, atomic_write_jsonl
from tunedesk.serve.finetune.uploads import describe_problems
from tunedesk.train.prepare.pipeline import FormatError, PrepareOptions, prepare

SPLIT_RATIOS = (0.9, 0.1, 0.0)
WHOLE = (1.0, 0.0, 0.0)
MIN_EXAMPLES = 10  # OpenAI's minimum; fewer only gets a warning here


class DataProblem(Exception):
    """The data can't be trained on; becomes the job's error object."""

    def __init__(self, code: str, param: str, message: str) -> None:
        super().__init__(message)
        self.code, self.param, self.message = code, param, message

    def error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}


@dataclass
class Upload:
    file_id: str
    filename: str
    path: Path


def _prepare(upload: Upload, ratios: tuple[float, float, float], seed: int, param: str):
    code = f"invalid_{param}"
    kind = param.replace("_", " ").capitalize()
    try:
        return prepare(
            [upload.path], None, PrepareOptions(ratios=ratios, seed=seed, min_examples=MIN_EXAMPLES)
        )
    except FormatError as exc:
        message = str(exc).replace(str(upload.path), upload.filename)
        raise DataProblem(
            code, param, f"{kind} {upload.file_id} can't be read: {message}"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataProblem(code, param, f"{kind} {upload.file_id} can't be read: {exc}") from None


def _errors(report: dict[str, Any]) -> list[dict[str, Any]]:
    errors = [p for p in report["problems"] if p["severity"] == "error"]
    return sorted(errors, key=lambda p: (p.get("line") is None, p.get("line") or 0))


def _no_examples(upload: Upload, report: dict[str, Any], param: str) -> DataProblem:
    errors = _errors(report)
    kind = param.replace("_", " ").capitalize()
    why = describe_problems(errors, report["counts"]["errors"]) if errors else "it has no records"
    return DataProblem(
        f"invalid_{param}",
        param,
        f"{kind} {upload.file_id} ({upload.filename}) has no usable examples: {why}",
    )


def summarize(upload: Upload, report: dict[str, Any], used: int) -> tuple[str, str]:
    """(level, message) describing what preparation kept and left out of one file."""
    counts = report["counts"]
    message = f"File {upload.file_id} ({upload.filename}): {used} usable examples"
    left_out = counts["rows_read"] - counts["kept"]
    level = "info"
    if left_out > 0:
        level = "warning"
        errors = _errors(report)
        message += f", {left_out} left out"
        if errors:
            message += f" ({describe_problems(errors, counts['errors'])})"
        elif counts["exact_duplicates_removed"]:
            message += f" ({counts['exact_duplicates_removed']} exact duplicates)"
    warnings: dict[str, int] = {}
    for p in report["problems"]:
        if p["severity"] == "warning" and p["code"] != "duplicate":
            warnings[p["code"]] = warnings.get(p["code"], 0) + 1
    if warnings:
        message += "; warnings: " + ", ".join(f"{n} {code}" for code, n in sorted(warnings.items()))
    return level, message


def prepare_job_data(
    out_dir: Path, training: Upload, validation: Upload | None, seed: int
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Write train.jsonl (and val.jsonl when there is validation data) and report.json to
    `out_dir`. Returns counts and the (level, message) events to log; raises DataProblem."""
    train_result = _prepare(training, WHOLE if validation else SPLIT_RATIOS, seed, "training_file")
    train_rows = train_result.splits["train"]
    if not train_rows:
        raise _no_examples(training, train_result.report, "training_file")
    val_rows = [] if validation else train_result.splits["val"]
    events = [summarize(training, train_result.report, train_result.usable)]
    reports = {"training_file": train_result.report}
    if validation is not None:
        val_result = _prepare(validation, WHOLE, seed, "validation_file")
        val_rows = val_result.splits["train"]
        if not val_rows:
            raise _no_examples(validation, val_result.report, "validation_file")
        events.append(summarize(validation, val_result.report, len(val_rows)))
        reports["validation_file"] = val_result.report
    atomic_write_jsonl(out_dir / "train.jsonl", train_rows)
    if val_rows:
        atomic_write_jsonl(out_dir / "val.jsonl", val_rows)
    atomic_write_json(out_dir / "report.json", reports)
    counts = {"train_examples": len(train_rows), "val_examples": len(val_rows)}
    split = "" if validation else " (split from the training file)"
    events.append(
        (
            "info",
            f"Prepared {len(train_rows)} training and {len(val_rows)} validation examples{split}",
        )
    )
    return counts, events
