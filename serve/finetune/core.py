"""`FineTuning`: the files, the jobs and the worker of one workspace, behind the routes.

Workspace layout (the server's TUNEDESK_HOME, or its working directory):

    data/finetune.sqlite3    file and job records (WAL)
    data/files/<file-id>.*   uploaded files and results CSVs, written atomically
    runs/<job-id>/           the training job (tunedesk.train.jobs): status.json, events,
                             metrics, checkpoints/, adapter/, and from this API data/ (the
                             prepared splits), merged/ (the merged model), merge.log
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO

from tunedesk.serve.errors import BadRequest, ModelNotFound, NotFound, PermissionDenied
from tunedesk.serve.finetune import plan, protocol
from tunedesk.serve.finetune.protocol import TERMINAL, CreateJobRequest
from tunedesk.serve.finetune.store import FineTuneStore, new_file_id
from tunedesk.serve.finetune.uploads import check_file, file_row, save_upload, stored_suffix
from tunedesk.serve.finetune.worker import MERGED, Worker, list_checkpoints, settle_failed
from tunedesk.serve.registry import ModelRegistry
from tunedesk.train.jobs import Job, JobError, JobStore, new_job_id

log = logging.getLogger("tunedesk.serve.finetune")

PURPOSE = "fine-tune"


class FineTuning:
    def __init__(
        self, home: Path, registry: ModelRegistry, max_jobs: int = 1, poll_s: float = 0.5
    ) -> None:
        self.home = Path(home).resolve()
        self.files_dir = self.home / "data" / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.store = FineTuneStore(self.home / "data" / "finetune.sqlite3")
        self.jobs = JobStore(self.home / "runs")
        self.registry = registry
        self.worker = Worker(
            self.store, self.jobs, registry, self.home, self.files_dir, max_jobs, poll_s
        )

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.store.close()

    # -- files ----------------------------------------------------------------------------------

    def upload(self, src: BinaryIO, filename: str | None, purpose: str) -> dict[str, Any]:
        if purpose != PURPOSE:
            raise BadRequest(
                f"Invalid purpose {purpose!r}: this server stores files for fine-tuning only "
                f"(purpose '{PURPOSE}').",
                param="purpose",
            )
        name = Path(filename or "").name or "upload.jsonl"
        file_id = new_file_id()
        path = self.files_dir / f"{file_id}{stored_suffix(name)}"
        size = save_upload(src, path)
        try:
            check = check_file(path, name)
        except BadRequest:
            path.unlink(missing_ok=True)
            raise
        return self.store.add_file(file_row(file_id, name, purpose, path, size, check))

    def file(self, file_id: str) -> dict[str, Any]:
        row = self.store.get_file(file_id)
        if row is None:
            raise NotFound(f"No such File object: {file_id}", param="id")
        return row

    def list_files(
        self, purpose: str | None, after: str | None, limit: int, order: str
    ) -> dict[str, Any]:
        rows, more = self.store.list_files(purpose, after, limit, ascending=order == "asc")
        return protocol.page([protocol.file_object(r) for r in rows], more)

    def delete_file(self, file_id: str) -> dict[str, Any]:
        row = self.file(file_id)
        self.store.delete_file(file_id)
        Path(row["path"]).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- jobs -----------------------------------------------------------------------------------

    def _input_file(self, file_id: str, param: str) -> dict[str, Any]:
        row = self.store.get_file(file_id)
        if row is None:
            raise BadRequest(
                f"Invalid file id {file_id!r}: no such file.", param=param, code=f"invalid_{param}"
            )
        if row["purpose"] != PURPOSE:
            raise BadRequest(
                f"File {file_id} has purpose {row['purpose']!r}; fine-tuning needs '{PURPOSE}'.",
                param=param,
                code=f"invalid_{param}",
            )
        return row

    def create_job(self, req: CreateJobRequest) -> dict[str, Any]:
        if req.method is not None and req.method.type != "supervised":
            raise BadRequest(
                f"Fine-tuning method {req.method.type!r} is not supported; use 'supervised'.",
                param="method.type",
            )
        if req.integrations:
            raise BadRequest("Integrations are not supported.", param="integrations")
        suffix = plan.check_suffix(req.suffix)
        self._input_file(req.training_file, "training_file")
        if req.validation_file:
            self._input_file(req.validation_file, "validation_file")
        base = plan.resolve_base_model(req.model, self.registry, self.home)
        job_id = new_job_id()
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        cfg, hyperparameters, options = plan.build_config(
            req,
            base_path=base.path,
            job_dir=self.jobs.root / job_id,
            runs_dir=self.jobs.root,
            seed=seed,
            home=self.home,
        )
        # The training job exists from the start (same id, same folder), so `tunedesk jobs
        # list` shows it at once; the worker starts it once the files are prepared.
        job = self.jobs.create(cfg, job_id=job_id)
        try:
            row = self._add_job(req, job_id, base, suffix, seed, hyperparameters, options)
        except BaseException as exc:
            settle_failed(job, {"code": "internal_error", "message": f"not recorded: {exc}"})
            raise
        job.add_event(
            f"Fine-tuning job created through the API: {req.model} on {req.training_file}"
        )
        self.worker.wake()
        return row

    def _add_job(
        self,
        req: CreateJobRequest,
        job_id: str,
        base: plan.BaseModelRef,
        suffix: str | None,
        seed: int,
        hyperparameters: dict[str, Any],
        options: dict[str, Any],
    ) -> dict[str, Any]:
        return self.store.add_job(
            {
                "id": job_id,
                "created_at": int(time.time()),
                "model": req.model,
                "base_path": base.path,
                "parent": base.parent,
                "ft_name": plan.ft_model_name(base.family, suffix, job_id),
                "training_file": req.training_file,
                "validation_file": req.validation_file or None,
                "suffix": suffix,
                "seed": seed,
                "hyperparameters": hyperparameters,
                "options": options,
                "metadata": req.metadata,
                "status": "validating_files",
                "stage": "validate",
            }
        )

    def job(self, job_id: str) -> dict[str, Any]:
        row = self.store.get_job(job_id)
        if row is None:
            raise NotFound(f"Could not find fine-tuning job {job_id}.", param="fine_tuning_job_id")
        return row

    def list_jobs(self, after: str | None, limit: int) -> dict[str, Any]:
        rows, more = self.store.list_jobs(after, limit)
        return protocol.page([protocol.job_object(r) for r in rows], more)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        row = self.job(job_id)
        if row["status"] in TERMINAL:
            raise BadRequest(
                f"Job {job_id} has already {row['status']}; it can't be cancelled.",
                param="fine_tuning_job_id",
            )
        now = int(time.time())
        not_started = self.store.update_job(
            job_id,
            expect_stage=("validate", "queue"),
            status="cancelled",
            stage="done",
            finished_at=now,
        )
        if not not_started:
            # Training or merging: the worker winds the process down and then stops tracking.
            self.store.update_job(
                job_id,
                expect_status=("validating_files", "queued", "running"),
                status="cancelled",
                finished_at=now,
            )
        with contextlib.suppress(JobError):
            self.jobs.cancel(job_id)  # queued: cancelled now; running: SIGTERM, checkpoint
        if row["stage"] == "merge":
            Job(self.jobs.root / job_id).add_event("Job cancelled during the merge")
        self.worker.wake()
        return self.job(job_id)

    def events(self, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
        self.job(job_id)
        job = Job(self.jobs.root / job_id)
        events = job.events() if job.events_path.is_file() else []
        indexed = list(enumerate(events, 1))[::-1]  # newest first
        if after is not None:
            cursor = protocol.event_index(after)
            if cursor is not None:
                indexed = [(i, e) for i, e in indexed if i < cursor]
        data = [protocol.event_object(job_id, i, e) for i, e in indexed[:limit]]
        return protocol.page(data, len(indexed) > limit)

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
        row = self.job(job_id)
        job = Job(self.jobs.root / job_id)
        found = list_checkpoints(job.dir)
        if after is not None:
            cursor = protocol.event_index(after)  # same "<...>-<number>" shape
            if cursor is not None:
                found = [c for c in found if c.step < cursor]
        metrics = job.metrics() if job.metrics_path.is_file() else []
        data = [
            {
                "id": protocol.checkpoint_id(job_id, c.step),
                "object": "fine_tuning.job.checkpoint",
                "created_at": c.created_at,
                "fine_tuned_model_checkpoint": protocol.checkpoint_model(row["ft_name"], c.step),
                "fine_tuning_job_id": job_id,
                "metrics": protocol.checkpoint_metrics(metrics, c.step),
                "step_number": c.step,
            }
            for c in found[:limit]
        ]
        return protocol.page(data, len(found) > limit)

    # -- models ---------------------------------------------------------------------------------

    def delete_model(self, name: str) -> dict[str, Any]:
        """`DELETE /v1/models/{name}` for a model a job of this API made. The name stops being
        served, now and after a restart. Deleting the fine-tune itself also deletes its merged
        weights (the job keeps its adapter, so `tunedesk merge runs/<id>` can rebuild them)
        and the last checkpoint's name, which served those weights; an earlier checkpoint's
        name goes alone. The job's record is kept, `fine_tuned_model` included, as OpenAI
        keeps it."""
        row = self._job_serving(name)
        if row is None:
            if name in self.registry:
                raise PermissionDenied(
                    f"The model `{name}` was not made by this server's fine-tuning API; only "
                    "fine-tuned models and their checkpoints can be deleted.",
                    param="model",
                )
            raise ModelNotFound(name)
        job_dir = self.jobs.root / row["id"]
        names = [name]
        if name == row["ft_name"]:
            final = [c for c in list_checkpoints(job_dir) if c.final]
            names += [protocol.checkpoint_model(name, c.step) for c in final]
        now = int(time.time())
        with self.store.transaction():
            for n in names:
                self.store.add_deleted_model(n, row["id"], now)
        for n in names:
            self.registry.unregister(n)
        if name == row["ft_name"]:
            self._remove_merged(job_dir)
        Job(job_dir).add_event(f"Fine-tuned model deleted: {name}")
        return {"id": name, "object": "model", "deleted": True}

    def _job_serving(self, name: str) -> dict[str, Any] | None:
        """The succeeded job one of whose served names is `name`, if it is still served."""
        if name not in self.registry:
            return None
        for row in self.store.jobs_in_stage("done"):
            if row["status"] == "succeeded" and name in self.worker.served_names(
                row, self.jobs.root / row["id"]
            ):
                return row
        return None

    @staticmethod
    def _remove_merged(job_dir: Path) -> None:
        # Renamed first, so the folder stops being a loadable model in one step even if the
        # removal is cut short; a leftover `merged.deleted` is only disk to reclaim.
        merged = job_dir / MERGED
        trash = job_dir / f"{MERGED}.deleted"
        shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            merged.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
