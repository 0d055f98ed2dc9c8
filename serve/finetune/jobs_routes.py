"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events and checkpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from tunedesk.serve.deps import ContextDep
from tunedesk.serve.errors import ModelNotFound
from tunedesk.serve.finetune.deps import FineTuneKey, FineTuningDep
from tunedesk.serve.finetune.protocol import CreateJobRequest, job_object

router = APIRouter(prefix="/v1/fine_tuning/jobs")


@router.post("")
def create_job(
    body: CreateJobRequest, ft: FineTuningDep, key: FineTuneKey, ctx: ContextDep
) -> dict:
    ctx.model = body.model
    if not key.allows_model(body.model):  # a key limited to some models trains only those
        raise ModelNotFound(body.model)
    return job_object(ft.create_job(body))


@router.get("")
def list_jobs(
    ft: FineTuningDep,
    _key: FineTuneKey,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict:
    return ft.list_jobs(after, limit)


@router.get("/{job_id}")
def retrieve_job(job_id: str, ft: FineTuningDep, _key: FineTuneKey) -> dict:
    return job_object(ft.job(job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, ft: FineTuningDep, _key: FineTuneKey) -> dict:
    return job_object(ft.cancel_job(job_id))


@router.get("/{job_id}/events")
def list_events(
    job_id: str,
    ft: FineTuningDep,
    _key: FineTuneKey,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict:
    return ft.events(job_id, after, limit)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(
    job_id: str,
    ft: FineTuningDep,
    _key: FineTuneKey,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> dict:
    return ft.checkpoints(job_id, after, limit)
