"""The worker: one thread in the server that moves API jobs through their stages.

    validate   prepare the uploaded files into runs/<id>/data/      (in this thread; quick)
    queue      wait for a free slot (`finetune_max_jobs`, default 1)
    train      `JobStore.start(job)`: a training subprocess in its own session; watched through
               status.json, never run in the server process
    merge      `python -m tunedesk merge runs/<id> --out runs/<id>/merged` (a subprocess)
    done       the merged model is registered as ft:<base>:<suffix>:<id> (and each checkpoint
               as ...:ckpt-step-N), the results CSV is stored as a file

Training processes outlive the server: stopping the server leaves them running, and the next
server on the same workspace picks them up. On start the worker reconciles what the database
says with what the job folders say: a job still training is watched again; one whose training
process died while no server was watching is resumed from its newest checkpoint
(`JobStore.start(job, resume=True)`, at most MAX_RESUMES times) and otherwise failed with the
reason; an interrupted merge runs again; succeeded jobs' models are registered again.

Only one worker acts on a workspace at a time (an exclusive lock on data/finetune.lock); a
second server on the same workspace serves the API and leaves the work to the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tunedesk.io import atomic_write_text
from tunedesk.serve.finetune import protocol
from tunedesk.serve.finetune.data import DataProblem, Upload, prepare_job_data
from tunedesk.serve.finetune.store import FineTuneStore, new_file_id
from tunedesk.serve.registry import ModelRegistry
from tunedesk.train.jobs import TERMINAL, Job, JobError, JobStore, pid_alive

log = logging.getLogger("tunedesk.serve.finetune")

MAX_RESUMES = 2
MERGED = "merged"
MERGE_LOG = "merge.log"
RESULTS_FILENAME = "step_metrics.csv"


def settle_failed(job: Job, error: dict[str, Any]) -> None:
    """Record a failure that happened outside the training process (bad data, failed merge)
    in the job's status.json, so `tunedesk jobs list` agrees with the API. A job whose
    training process is alive is left to that process (see `Job.fail`)."""
    if job.status_path.is_file():
        job.fail(error["code"], error["message"])


@dataclass(frozen=True)
class Checkpoint:
    step: int
    adapter: Path
    created_at: int
    final: bool
    """The end of training: what was merged into the fine-tuned model."""


def list_checkpoints(job_dir: Path) -> list[Checkpoint]:
    """The job's usable checkpoints, newest step first: every kept `checkpoints/step-N`, and
    the final adapter (at the last step) once training has succeeded."""
    found: dict[int, Checkpoint] = {}
    for d in (job_dir / "checkpoints").glob("step-*"):
        step = d.name.removeprefix("step-")
        if step.isdigit() and (d / "adapter" / "adapter_config.json").is_file():
            found[int(step)] = Checkpoint(int(step), d / "adapter", int(d.stat().st_mtime), False)
    summary_path = job_dir / "summary.json"
    adapter = job_dir / "adapter"
    if (adapter / "adapter_config.json").is_file() and summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            summary = {}
        if summary.get("status") == "succeeded" and isinstance(summary.get("step"), int):
            step = summary["step"]
            found[step] = Checkpoint(step, adapter, int(adapter.stat().st_mtime), True)
    return [found[s] for s in sorted(found, reverse=True)]


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    kept = [ln for ln in text.splitlines() if ln.strip() and "it/s]" not in ln]
    return " | ".join(kept[-lines:])


class Worker:
    def __init__(
        self,
        store: FineTuneStore,
        jobs: JobStore,
        registry: ModelRegistry,
        home: Path,
        files_dir: Path,
        max_jobs: int = 1,
        poll_s: float = 0.5,
    ) -> None:
        self.store = store
        self.jobs = jobs
        self.registry = registry
        self.home = home
        self.files_dir = files_dir
        self.max_jobs = max(1, max_jobs)
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._merges: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
        self._reconciling: set[str] = set()
        self._lock_file: IO[str] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether this worker holds the workspace (False: another server's worker does)."""
        return self._lock_file is not None

    def start(self) -> None:
        lock_path = self.home / "data" / "finetune.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "a+")  # noqa: SIM115 - held for the worker's lifetime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            log.warning(
                "another server runs the fine-tuning worker of %s; this one only serves the API",
                self.home,
            )
            return
        self._lock_file = lock
        self._reconciling = {r["id"] for r in self.store.active_jobs()}
        self._register_succeeded()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="finetune-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the thread. Training processes keep running (the next server adopts them);
        an unfinished merge is stopped and runs again on the next start."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
        for job_id, (proc, out) in list(self._merges.items()):
            self._kill(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            out.close()
            del self._merges[job_id]
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception:  # one bad job must not stop the worker
                log.exception("fine-tuning worker: tick failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    # -- one pass ---------------------------------------------------------------------------

    def tick(self) -> None:
        for row in self.store.active_jobs():
            if self._stopping.is_set():
                return
            try:
                stage = row["stage"]
                if stage == "validate":
                    self._validate(row)
                elif stage == "train":
                    self._watch_training(row)
                elif stage == "merge":
                    self._watch_merge(row)
            except Exception as exc:
                log.exception("fine-tuning job %s: %s", row["id"], exc)
                # A job the worker can't follow must not keep training unwatched.
                with contextlib.suppress(Exception):
                    self.jobs.cancel(row["id"])
                self._fail(row, "internal_error", f"{type(exc).__name__}: {exc}")
        busy = sum(1 for r in self.store.active_jobs() if r["stage"] in ("train", "merge"))
        for row in self.store.jobs_in_stage("queue"):
            if busy >= self.max_jobs or self._stopping.is_set():
                break
            if self.store.update_job(row["id"], expect_stage="queue", stage="train"):
                busy += 1
                self._launch(self.jobs.get(row["id"]), row)

    def _job(self, row: dict[str, Any]) -> Job | None:
        job = Job(self.jobs.root / row["id"])
        if not job.status_path.is_file():
            self._fail(row, "job_folder_missing", f"the job folder {job.dir} was removed")
            return None
        return job

    def _fail(self, row: dict[str, Any], code: str, message: str, param: str | None = None) -> None:
        error = {"code": code, "message": message, "param": param}
        updated = self.store.update_job(
            row["id"],
            expect_status=("validating_files", "queued", "running"),
            status="failed",
            stage="done",
            error=error,
            finished_at=int(time.time()),
        )
        if not updated:  # cancelled meanwhile: just stop tracking it
            self.store.update_job(row["id"], stage="done")
            return
        job = Job(self.jobs.root / row["id"])
        settle_failed(job, error)
        log.warning("fine-tuning job %s failed: %s", row["id"], message)

    # -- validate ---------------------------------------------------------------------------

    def _upload(self, file_id: str | None) -> Upload | None:
        if file_id is None:
            return None
        f = self.store.get_file(file_id)
        if f is None or not Path(f["path"]).is_file():
            return None
        return Upload(f["id"], f["filename"], Path(f["path"]))

    def _validate(self, row: dict[str, Any]) -> None:
        job = self._job(row)
        if job is None:
            return
        training = self._upload(row["training_file"])
        if training is None:
            self._fail(
                row,
                "invalid_training_file",
                f"The training file {row['training_file']} was deleted before the job ran.",
                "training_file",
            )
            return
        validation = self._upload(row["validation_file"])
        if row["validation_file"] and validation is None:
            self._fail(
                row,
                "invalid_validation_file",
                f"The validation file {row['validation_file']} was deleted before the job ran.",
                "validation_file",
            )
            return
        job.add_event(f"Validating training file: {training.file_id}")
        try:
            counts, events = prepare_job_data(job.dir / "data", training, validation, row["seed"])
        except DataProblem as exc:
            self._fail(row, exc.code, exc.message, exc.param)
            return
        for level, message in events:
            job.add_event(message, level=level, data=counts)
        if self.store.update_job(
            row["id"],
            expect_stage="validate",
            expect_status="validating_files",
            stage="queue",
            status="queued",
        ):
            job.add_event("Files validated; the job is queued")

    # -- train ------------------------------------------------------------------------------

    def _launch(self, job: Job, row: dict[str, Any], resume: bool = False) -> None:
        try:
            self.jobs.start(job, resume=resume)
        except JobError as exc:
            self._fail(row, "start_failed", str(exc))

    def _watch_training(self, row: dict[str, Any]) -> None:
        job = self._job(row)
        if job is None:
            return
        info = job.info()  # marks a job whose process died as failed
        status = info["status"]
        # Only the first look after the server started may resume a job whose process died:
        # it died while nobody watched. Later deaths (OOM, kill -9) fail the job.
        reconciling = row["id"] in self._reconciling
        self._reconciling.discard(row["id"])
        if row["status"] == "cancelled":
            if status in TERMINAL:
                self.store.update_job(row["id"], stage="done")
            elif status == "queued" and not info.get("pid"):
                with contextlib.suppress(JobError):
                    self.jobs.cancel(row["id"])
            return
        if status == "queued":
            if not info.get("pid"):  # the server stopped between the stage change and start()
                self._launch(job, row)
            return
        if status in ("running", "cancelling"):
            self.store.update_job(row["id"], expect_status="queued", status="running")
            return
        if status == "succeeded":
            if self.store.update_job(
                row["id"], expect_stage="train", stage="merge", status="running"
            ):
                self._start_merge(job, row)
            return
        if status == "cancelled":  # e.g. `tunedesk jobs cancel` from a shell
            self.store.update_job(
                row["id"], status="cancelled", stage="done", finished_at=int(time.time())
            )
            return
        error = info.get("error") or {}
        if reconciling and error.get("code") == "process_exited" and row["resumes"] < MAX_RESUMES:
            ckpts = sorted((job.dir / "checkpoints").glob("step-*"))
            where = f"its newest checkpoint ({ckpts[-1].name})" if ckpts else "the start"
            job.add_event(
                f"The training process stopped while the server was down: resuming from {where}",
                level="warning",
            )
            self.store.update_job(row["id"], resumes=row["resumes"] + 1)
            self._launch(job, row, resume=True)
            return
        message = error.get("message") or "training failed"
        self._fail(row, error.get("code") or "training_error", message)

    # -- merge ------------------------------------------------------------------------------

    def _start_merge(self, job: Job, row: dict[str, Any]) -> None:
        cmd = [
            sys.executable,
            "-m",
            "tunedesk",
            "merge",
            str(job.dir),
            "--out",
            str(job.dir / MERGED),
        ]
        env = dict(os.environ, TUNEDESK_HOME=str(self.home), PYTHONUNBUFFERED="1")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        out = open(job.dir / MERGE_LOG, "ab")  # noqa: SIM115 - closed when the merge ends
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.home),
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            out.close()
            self._fail(row, "merge_failed", f"could not start the merge: {exc}")
            return
        self._merges[row["id"]] = (proc, out)
        self.store.update_job(row["id"], merge_pid=proc.pid)
        job.add_event("Merging the adapter into the base model", data={"pid": proc.pid})

    @staticmethod
    def _kill(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)

    def _stale_merge(self, row: dict[str, Any]) -> None:
        """Stop a merge left running by a server that died (its command line names the job)."""
        pid = row.get("merge_pid")
        if not pid or not pid_alive(pid):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if row["id"].encode() in cmdline and b"merge" in cmdline:
            self._kill(pid)

    def _watch_merge(self, row: dict[str, Any]) -> None:
        job = self._job(row)
        if job is None:
            return
        running = self._merges.get(row["id"])
        if row["status"] == "cancelled":
            if running is not None:
                self._kill(running[0].pid)
                running[0].wait(timeout=10)
                running[1].close()
                del self._merges[row["id"]]
            self.store.update_job(row["id"], stage="done")
            return
        if running is None:  # interrupted by a server restart: merge again
            self._stale_merge(row)
            self._start_merge(job, row)
            return
        proc, out = running
        code = proc.poll()
        if code is None:
            return
        out.close()
        del self._merges[row["id"]]
        if code != 0:
            tail = _tail(job.dir / MERGE_LOG)
            self._fail(row, "merge_failed", f"merging the adapter failed (exit {code}): {tail}")
            return
        self._finish(job, row)

    # -- done -------------------------------------------------------------------------------

    def served_names(self, row: dict[str, Any], job_dir: Path) -> list[str]:
        """The names a succeeded job's models are served under: the fine-tune, then each
        checkpoint's `...:ckpt-step-N`."""
        return [row["ft_name"]] + [
            protocol.checkpoint_model(row["ft_name"], c.step) for c in list_checkpoints(job_dir)
        ]

    def _register(self, row: dict[str, Any], job_dir: Path) -> bool:
        """Serve the merged model as ft:..., and every checkpoint as ft:...:ckpt-step-N (the
        last one is the merged model itself; earlier ones are adapters on the base). Names
        deleted through `DELETE /v1/models` stay unserved; the last checkpoint goes with the
        fine-tune, whose merged weights it is."""
        merged = job_dir / MERGED
        deleted = self.store.deleted_models()
        ft_deleted = row["ft_name"] in deleted
        if not ft_deleted:
            if not (merged / "config.json").is_file():
                log.warning(
                    "fine-tuned model %s: %s is missing; not served", row["ft_name"], merged
                )
                return False
            self.registry.register(row["ft_name"], str(merged), parent=row["parent"], replace=True)
        for ckpt in list_checkpoints(job_dir):
            name = protocol.checkpoint_model(row["ft_name"], ckpt.step)
            if name in deleted or (ckpt.final and ft_deleted):
                continue
            if ckpt.final:
                self.registry.register(name, str(merged), parent=row["ft_name"], replace=True)
            else:
                self.registry.register(
                    name,
                    row["base_path"],
                    adapter=str(ckpt.adapter),
                    parent=row["ft_name"],
                    replace=True,
                )
        return True

    def _register_succeeded(self) -> None:
        for row in self.store.jobs_in_stage("done"):
            if row["status"] == "succeeded":
                try:
                    self._register(row, self.jobs.root / row["id"])
                except ValueError as exc:
                    log.warning("can't serve %s: %s", row["ft_name"], exc)

    def _finish(self, job: Job, row: dict[str, Any]) -> None:
        info = job.info()
        if not self._register(row, job.dir):
            self._fail(row, "merge_failed", f"the merged model {job.dir / MERGED} is missing")
            return
        file_id = new_file_id()
        path = self.files_dir / f"{file_id}.csv"
        csv_text = job.results_csv()
        atomic_write_text(path, csv_text)
        now = int(time.time())
        with self.store.transaction():
            done = self.store.update_job(
                row["id"],
                expect_status="running",
                status="succeeded",
                stage="done",
                fine_tuned_model=row["ft_name"],
                trained_tokens=info.get("trained_tokens"),
                finished_at=now,
                result_files=[file_id],
            )
            if done:
                self.store.add_file(
                    {
                        "id": file_id,
                        "created_at": now,
                        "filename": RESULTS_FILENAME,
                        "purpose": "fine-tune-results",
                        "bytes": len(csv_text.encode("utf-8")),
                        "status": "processed",
                        "status_details": None,
                        "path": str(path),
                        "info": {"job": row["id"]},
                    }
                )
        if done:
            job.add_event(f"New fine-tuned model created: {row['ft_name']}")
            job.add_event("The job has successfully completed")
        else:  # cancelled during the merge
            path.unlink(missing_ok=True)
            for name in self.served_names(row, job.dir):
                self.registry.unregister(name)
            self.store.update_job(row["id"], stage="done")
