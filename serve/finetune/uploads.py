"""Uploaded training files: stored under the workspace, checked with prepare's own loader and
validator, so the API accepts exactly the data `tunedesk prepare` accepts.

Three outcomes of an upload:

- the file can't be read at all (not text, not JSON/JSONL/CSV, no line parses, no records):
  refused with a 400 that names the lines;
- every record has a problem (wrong format, no assistant answer, ...): stored with status
  "error" and the problems in `status_details`; a job using it fails with that reason;
- some or no records have problems: stored with status "processed" (problems, if any, listed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tunedesk.io import atomic_open
from tunedesk.serve.errors import BadRequest
from tunedesk.train.prepare.formats import FormatError, load_file
from tunedesk.train.prepare.records import Problem
from tunedesk.train.prepare.validate import check_record

# Suffixes `load_file` reads by name; anything else is stored (and parsed) as JSONL.
KNOWN_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
SHOWN_PROBLEMS = 5  # problems quoted in a message
KEPT_PROBLEMS = 50  # problems kept in the file's record


@dataclass
class FileCheck:
    format: str
    rows: int
    records: int
    usable: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "processed" if self.usable else "error"

    def details(self) -> str | None:
        if not self.problems:
            return None
        bad = self.rows - self.usable
        head = (
            f"No usable examples in {self.rows} rows"
            if not self.usable
            else f"{bad} of {self.rows} rows can't be used"
        )
        return f"{head}: {describe_problems(self.problems)}"

    def info(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "rows": self.rows,
            "records": self.records,
            "usable": self.usable,
            "problems": [problem_dict(p) for p in self.problems[:KEPT_PROBLEMS]],
            "problem_count": len(self.problems),
        }


def problem_dict(p: Problem) -> dict[str, Any]:
    return {"line": p.line, "code": p.code, "message": p.message, "field": p.field}


def describe_problem(p: Problem | dict[str, Any]) -> str:
    d = problem_dict(p) if isinstance(p, Problem) else p
    where = f"line {d['line']}: " if d.get("line") is not None else ""
    return f"{where}{d['message']} [{d['code']}]"


def describe_problems(
    problems: list[Problem] | list[dict[str, Any]], total: int | None = None
) -> str:
    shown = "; ".join(describe_problem(p) for p in problems[:SHOWN_PROBLEMS])
    more = (total if total is not None else len(problems)) - min(len(problems), SHOWN_PROBLEMS)
    return shown + (f" (and {more} more)" if more > 0 else "")


def stored_suffix(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    return suffix if suffix in KNOWN_SUFFIXES else ".jsonl"


def save_upload(src: BinaryIO, dest: Path, chunk: int = 1 << 20) -> int:
    """Copy the upload to `dest` atomically; returns its size in bytes."""
    size = 0
    with atomic_open(dest, "wb", encoding=None) as out:
        while block := src.read(chunk):
            out.write(block)
            size += len(block)
    return size


def check_file(path: Path, filename: str) -> FileCheck:
    """Load and validate a stored upload; raise BadRequest when it can't be read as a whole."""
    try:
        loaded = load_file(path)
    except FormatError as exc:
        message = str(exc).replace(str(path), filename, 1)
        raise BadRequest(
            f"Invalid file format: {message}", param="file", code="invalid_file_format"
        ) from None
    if loaded.rows_read == 0:
        raise BadRequest(
            f"Invalid file format: {filename} contains no records.",
            param="file",
            code="invalid_file_format",
        )
    load_errors = [p for p in loaded.problems if p.severity == "error"]
    if not loaded.records and load_errors and all(p.code == "bad_json" for p in load_errors):
        raise BadRequest(
            f"Invalid file format: {filename} is not JSONL (one JSON object per line): "
            f"{describe_problems(load_errors)}",
            param="file",
            code="invalid_file_format",
        )
    problems = list(load_errors)
    usable = 0
    for record in loaded.records:
        errors = [p for p in check_record(record) if p.severity == "error"]
        problems.extend(errors)
        usable += not errors
    problems.sort(key=lambda p: (p.line is None, p.line or 0))
    return FileCheck(loaded.format, loaded.rows_read, len(loaded.records), usable, problems)


def file_row(
    file_id: str, filename: str, purpose: str, path: Path, size: int, check: FileCheck | None
) -> dict[str, Any]:
    return {
        "id": file_id,
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
        "bytes": size,
        "status": check.status if check else "processed",
        "status_details": check.details() if check else None,
        "path": str(path),
        "info": check.info() if check else {},
    }
