"""Fine-tuning jobs: an id, a folder, a status, an event log. Modelled on OpenAI's fine-tuning
jobs so an HTTP API (/v1/fine_tuning/jobs) can sit directly on top of this module.

Every run is a job `ftjob-<12 hex>` with folder `runs/<id>/`:

    config.yaml      the resolved TrainConfig
    status.json      the job object (status, pid, timestamps, error, summary); atomic rewrites
    events.jsonl     {"created_at", "level", "type": "message"|"metrics", "message", "data"}
    metrics.jsonl    one row per logged step ("split": "train" | "val"), written by the loop
    train.log        the training process's log
    checkpoints/     step-N/ (resumable) and best/
    adapter/         the final LoRA adapter, tokenizer and chat template

Status: queued -> running -> succeeded | failed | cancelled ("cancelling" while a cancel
request waits for the next step boundary). Transitions are read-modify-write under a file
lock, so the training process and a `cancel` never overwrite each other. Reading a job whose
process is gone (killed, crashed, OOM-killed) marks it failed with the reason.

The API, all of it:

    store = JobStore()                      # runs/ of the workspace, or JobStore(path)
    job = store.create(cfg)                 # queued, config.yaml written
    store.start(job)                        # background process (`tunedesk train --detach`)
    store.run(job)                          # or: train in this process (foreground)
    store.get("ftjob-3fa")                  # prefix match; JobNotFound otherwise
    store.list()                            # newest first
    store.cancel(job.id)                    # queued: cancelled now; running: SIGTERM
    job.info() / job.status / job.events() / job.read_events(offset) / job.metrics()
    job.results() / job.results_csv()       # OpenAI-style per-step results
    job.add_event(message, level, type, data) / job.fail(code, message)

No torch import at module level: listing and cancelling jobs stays instant.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunedesk import paths
from tunedesk.io import atomic_write_json, atomic_write_text, read_jsonl
from tunedesk.train.config import TrainConfig, dump_yaml, resolve_path

log = logging.getLogger("tunedesk.train.jobs")

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running", "cancelling")
ID_PREFIX = "ftjob-"

RESULT_COLUMNS = (
    "step",
    "epoch",
    "train_loss",
    "train_accuracy",
    "train_sequence_accuracy",
    "valid_loss",
    "valid_token_accuracy",
    "valid_sequence_accuracy",
    "learning_rate",
    "tokens_per_second",
    "elapsed_tokens",
    "elapsed_seconds",
)
# metrics.jsonl key per results column, for each split.
_TRAIN_COLUMNS = {
    "epoch": "epoch",
    "train_loss": "loss",
    "train_accuracy": "token_accuracy",
    "train_sequence_accuracy": "sequence_accuracy",
    "learning_rate": "lr",
    "tokens_per_second": "tokens_per_second",
    "elapsed_tokens": "trained_tokens",
    "elapsed_seconds": "elapsed_seconds",
}
_VAL_COLUMNS = {
    "valid_loss": "loss",
    "valid_token_accuracy": "token_accuracy",
    "valid_sequence_accuracy": "sequence_accuracy",
}


class JobError(Exception):
    """A job operation can't be done (unknown id, wrong state)."""


class JobNotFound(JobError):
    """No job matches the id (or prefix)."""


# What a job id may look like (it names a folder: nothing that could step outside runs/).
_ID_RE = re.compile(r"ftjob-[A-Za-z0-9_-]{1,64}")


def new_job_id() -> str:
    return ID_PREFIX + secrets.token_hex(6)


def _process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether process `pid` runs (a zombie counts as dead; so does a pid reused by another
    process when `start_time` was recorded)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): os.kill is all we have
    if stat[stat.rfind(")") + 2 :].split()[:1] == ["Z"]:
        return False
    return start_time is None or _process_start_time(pid) == start_time


class Job:
    """One job folder. Cheap to construct; every accessor reads the files afresh."""

    def __init__(self, job_dir: Path) -> None:
        self.dir = Path(job_dir)
        self.id = self.dir.name

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    # -- paths ----------------------------------------------------------------------------------

    @property
    def status_path(self) -> Path:
        return self.dir / "status.json"

    @property
    def events_path(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.dir / "train.log"

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def adapter_dir(self) -> Path:
        return self.dir / "adapter"

    # -- state ----------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The job object (status.json), after checking that an active job's process lives."""
        data = self._read()
        if (
            data["status"] in ACTIVE
            and data.get("pid")
            and not pid_alive(data["pid"], data.get("pid_start"))
        ):
            data = self._mark_dead()
        return data

    @property
    def status(self) -> str:
        return self.info()["status"]

    def config(self) -> TrainConfig:
        from tunedesk.config import load_config

        return load_config(TrainConfig, self.config_path)

    def _read(self) -> dict[str, Any]:
        return json.loads(self.status_path.read_text(encoding="utf-8"))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read status.json under an exclusive lock; write it back (atomically) on exit."""
        with open(self.dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self._read()
                before = json.dumps(data, sort_keys=True)
                yield data
                if json.dumps(data, sort_keys=True) != before:
                    atomic_write_json(self.status_path, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _mark_dead(self) -> dict[str, Any]:
        """The process of an active job is gone: failed (or cancelled, if that was asked)."""
        with self._locked() as data:
            pid = data.get("pid")
            if data["status"] not in ACTIVE or not pid or pid_alive(pid, data.get("pid_start")):
                return data  # someone else already settled it
            now = int(time.time())
            if data["status"] == "cancelling":
                data.update(status="cancelled", finished_at=now)
                self.add_event("Job cancelled (the training process has exited)")
            else:
                message = f"the training process exited unexpectedly (pid {pid})"
                data.update(
                    status="failed",
                    finished_at=now,
                    error={"code": "process_exited", "message": message},
                )
                self.add_event(f"Job failed: {message}", level="error")
        return data

    def fail(self, code: str, message: str) -> bool:
        """Record a failure found outside the training process (bad data, a failed merge).

        A job whose training process may still act on it (running, cancelling) or that has
        already ended failed or cancelled is left alone; returns whether the job changed.
        """
        with self._locked() as data:
            if data["status"] in ("running", "cancelling", "failed", "cancelled"):
                return False
            data.update(
                status="failed",
                finished_at=int(time.time()),
                error={"code": code, "message": message},
            )
        self.add_event(f"Job failed: {message}", level="error", data={"error": data["error"]})
        return True

    # -- logs -----------------------------------------------------------------------------------

    def add_event(
        self,
        message: str,
        level: str = "info",
        type: str = "message",  # noqa: A002 - the field's name in OpenAI's events
        data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one event line (a single write, so concurrent writers don't interleave)."""
        row = {
            "created_at": int(time.time()),
            "level": level,
            "type": type,
            "message": message,
            "data": data or {},
        }
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return row

    def events(self) -> list[dict[str, Any]]:
        """All events, oldest first."""
        return read_jsonl(self.events_path) if self.events_path.exists() else []

    def read_events(self, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Events appended since byte `offset` (complete lines only) and the next offset."""
        return _read_new_lines(self.events_path, offset)

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl rows, oldest first."""
        return read_jsonl(self.metrics_path) if self.metrics_path.exists() else []

    def results(self) -> list[dict[str, Any]]:
        """One row per logged step, train and validation metrics side by side (the columns of
        OpenAI's legacy fine-tune results file)."""
        rows: dict[int, dict[str, Any]] = {}
        for m in self.metrics():
            row = rows.setdefault(m["step"], dict.fromkeys(RESULT_COLUMNS) | {"step": m["step"]})
            columns = _TRAIN_COLUMNS if m.get("split") == "train" else _VAL_COLUMNS
            for column, key in columns.items():
                if key in m:
                    row[column] = m[key]
        return [rows[s] for s in sorted(rows)]

    def results_csv(self) -> str:
        """`results()` as CSV text (empty cells where a split wasn't logged at that step)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.results():
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return buf.getvalue()


def _read_new_lines(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
    rows = [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]
    return rows, offset + end


class JobStore:
    """The jobs under one runs folder."""

    def __init__(self, runs_dir: str | Path | None = None) -> None:
        self.root = resolve_path(runs_dir) if runs_dir is not None else paths.runs_dir()

    # -- create / find --------------------------------------------------------------------------

    def create(self, cfg: TrainConfig, job_id: str | None = None) -> Job:
        """A new queued job holding `cfg` (validated); `job_id` picks the id (else random)."""
        cfg.validate()
        job_id = job_id or new_job_id()
        if not _ID_RE.fullmatch(job_id):
            raise JobError(f"job id {job_id!r} must look like {ID_PREFIX}<12 hex digits>")
        job_dir = self.root / job_id
        try:
            job_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            # Under `accelerate launch` every process gets the same --job-id and the others
            # may make the folder (and their logs in it) before rank 0 creates the job: a job
            # is a folder with a status file, and until then the folder is nobody's.
            if (job_dir / "status.json").exists() or not job_dir.is_dir():
                raise JobError(f"job {job_id} already exists in {self.root}") from None
        job = Job(job_dir)
        atomic_write_text(job.config_path, dump_yaml(cfg))
        data_dir = resolve_path(cfg.data_dir)
        atomic_write_json(
            job.status_path,
            {
                "id": job_id,
                "object": "fine_tuning.job",
                "status": "queued",
                "model": cfg.base_model,
                "created_at": int(time.time()),
                "started_at": None,
                "finished_at": None,
                "fine_tuned_model": None,
                "error": None,
                "pid": None,
                "pid_start": None,
                "training_file": str(resolve_path(cfg.train_file or data_dir / "train.jsonl")),
                "validation_file": str(resolve_path(cfg.val_file or data_dir / "val.jsonl")),
                "hyperparameters": {
                    "n_epochs": cfg.epochs,
                    "batch_size": cfg.batch_size,
                    "learning_rate": cfg.lr,
                    "lora_r": cfg.lora_r,
                    "quantization": cfg.quantization,
                },
                "seed": cfg.seed,
                "trained_tokens": None,
                "result_files": ["metrics.jsonl"],
                "summary": None,
            },
        )
        job.add_event(f"Created fine-tuning job: {job_id}")
        return job

    def get(self, job_id: str) -> Job:
        """The job with this id, or the only one whose id starts with it (`ftjob-` optional)."""
        prefix = job_id if job_id.startswith(ID_PREFIX) else ID_PREFIX + job_id
        if not _ID_RE.fullmatch(prefix):
            raise JobNotFound(f"no job {job_id!r} (ids look like {ID_PREFIX}<12 hex digits>)")
        if (self.root / prefix / "status.json").is_file():
            return Job(self.root / prefix)
        matches = [p for p in self._dirs() if p.name.startswith(prefix)]
        if len(matches) == 1:
            return Job(matches[0])
        if not matches:
            raise JobNotFound(f"no job {job_id!r} in {self.root}")
        names = ", ".join(sorted(p.name for p in matches))
        raise JobNotFound(f"job id {job_id!r} is ambiguous: {names}")

    def list(self) -> list[Job]:
        """All jobs, newest first."""
        jobs = []
        for d in self._dirs():
            try:
                created = json.loads((d / "status.json").read_text(encoding="utf-8"))["created_at"]
            except (OSError, ValueError, KeyError):
                continue
            jobs.append((created, d.name, Job(d)))
        return [job for _, _, job in sorted(jobs, key=lambda t: (t[0], t[1]), reverse=True)]

    def _dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [
            p
            for p in self.root.iterdir()
            if p.name.startswith(ID_PREFIX) and (p / "status.json").is_file()
        ]

    # -- run ------------------------------------------------------------------------------------

    def start(self, job: Job, resume: bool = False) -> Job:
        """Train `job` in a background process (own session, output to train.log); returns at
        once with the pid recorded. What `tunedesk train --detach` and an HTTP API call."""
        job.info()  # settle a dead previous process first
        with job._locked() as data:
            if data["status"] in ("running", "cancelling"):
                raise JobError(f"job {job.id} is already {data['status']}")
            if data["status"] != "queued":
                if not resume:
                    raise JobError(f"job {job.id} is {data['status']}; use resume to continue it")
                # Queued before the process exists: it only runs a job it finds queued.
                data.update(status="queued", error=None, finished_at=None, pid=None)
        cmd = [sys.executable, "-m", "tunedesk.cli", "train", str(job.config_path)]
        cmd += ["--job-id", job.id, "--detached-child"]
        if resume:
            cmd += ["--resume", job.id]
        env = dict(os.environ, TUNEDESK_HOME=str(paths.home()), PYTHONUNBUFFERED="1")
        # See tunedesk.train.loop: spinning OpenMP waiters slow a busy CPU down badly.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            with open(job.log_path, "ab") as out:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=str(paths.home()),
                    env=env,
                    start_new_session=True,  # a Ctrl-C in the launching shell doesn't reach it
                )
        except OSError as exc:
            with job._locked() as data:
                message = f"could not start the training process: {exc}"
                data.update(status="failed", error={"code": "start_failed", "message": message})
            raise JobError(message) from exc
        with job._locked() as data:
            if data["status"] == "queued" and not data.get("pid"):
                # (If the process already marked itself running, it recorded its own pid.)
                data.update(pid=proc.pid, pid_start=_process_start_time(proc.pid))
        job.add_event(f"Job queued (pid {proc.pid})", data={"pid": proc.pid})
        return job

    def run(
        self, job: Job, resume: bool = False, progress: bool = True, spawned: bool = False
    ) -> dict[str, Any]:
        """Train `job` in this process, keeping status.json and events.jsonl up to date.

        Returns the job object at the end. Training errors end as status "failed" with an
        error code and message (not as exceptions), as a background job would. `spawned`:
        this process was started by `start()`, so it only runs a job still queued (a cancel
        may have come first). Resuming a finished job (say, with a larger max_steps) is allowed.
        """
        from tunedesk.config import ConfigError
        from tunedesk.train.loop import TrainingError, run_training

        job.info()  # settle a dead previous process first
        with job._locked() as data:
            if spawned and data["status"] != "queued":
                return data  # cancelled while it waited to start
            if data["status"] == "queued" and not spawned and data.get("pid"):
                raise JobError(f"job {job.id} is being started by pid {data['pid']}")
            if data["status"] in ("running", "cancelling"):
                raise JobError(f"job {job.id} is already running (pid {data.get('pid')})")
            if data["status"] != "queued" and not resume:
                raise JobError(f"job {job.id} is {data['status']}; resume it to continue")
            data.update(
                status="running",
                pid=os.getpid(),
                pid_start=_process_start_time(os.getpid()),
                started_at=data.get("started_at") or int(time.time()),
                finished_at=None,
                error=None,
            )
        job.add_event("Job resumed" if resume else "Job started", data={"pid": os.getpid()})

        def on_event(level: str, kind: str, message: str, data: dict[str, Any]) -> None:
            job.add_event(message, level=level, type=kind, data=data)

        error: dict[str, str] | None = None
        summary: dict[str, Any] | None = None
        try:
            cfg = job.config()
            summary = run_training(
                cfg, job.dir, resume=resume, progress=progress, on_event=on_event
            )
        except ConfigError as exc:
            error = {"code": "config_error", "message": str(exc)}
        except TrainingError as exc:
            error = {"code": exc.code, "message": str(exc)}
        except KeyboardInterrupt:
            error = {"code": "interrupted", "message": "interrupted (Ctrl-C twice)"}
        except Exception as exc:
            log.error("training failed:\n%s", traceback.format_exc())
            code = "out_of_memory" if "OutOfMemoryError" in type(exc).__name__ else "training_error"
            message = f"{type(exc).__name__}: {exc}"
            if code == "out_of_memory":
                message += " (lower batch_size or max_seq_len, or raise grad_accum)"
            error = {"code": code, "message": message}

        with job._locked() as data:
            data["finished_at"] = int(time.time())
            if error is not None:
                # Ctrl-C twice in a foreground run is a (hard) cancel, not a failure.
                interrupted = error["code"] == "interrupted"
                data.update(status="cancelled" if interrupted else "failed", error=error)
            elif summary["status"] == "cancelled":
                data.update(status="cancelled")
            else:
                data.update(
                    status="succeeded",
                    fine_tuned_model=summary["adapter_dir"],
                    trained_tokens=summary["trained_tokens"],
                )
            if summary is not None:
                data["summary"] = summary
            final = dict(data)
        if final["status"] == "succeeded":
            job.add_event(f"New fine-tuned adapter created: {final['fine_tuned_model']}")
            job.add_event("Job succeeded", data={"summary": summary})
        elif final["status"] == "cancelled":
            job.add_event("Job cancelled", data={"step": (summary or {}).get("step")})
        else:
            job.add_event(
                f"Job failed: {final['error']['message']}",
                level="error",
                data={"error": final["error"]},
            )
        return final

    def cancel(self, job_id: str) -> Job:
        """Cancel: a queued job at once; a running one gets SIGTERM and stops at the next step
        boundary with a checkpoint (status "cancelling" until it has)."""
        job = self.get(job_id)
        job.info()  # settle a dead process first
        signal_pid = None
        with job._locked() as data:
            status = data["status"]
            if status in TERMINAL:
                raise JobError(f"job {job.id} is already {status}")
            if status == "queued":
                data.update(status="cancelled", finished_at=int(time.time()))
                signal_pid = data.get("pid")  # started but not yet running: it exits on its own
                job.add_event("Job cancelled")
            else:
                data["status"] = "cancelling"
                signal_pid = data.get("pid")
                job.add_event("Cancellation requested: stopping at the next step")
        if signal_pid and pid_alive(signal_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(signal_pid, signal.SIGTERM)
        return job
