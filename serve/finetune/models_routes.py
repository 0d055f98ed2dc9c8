"""DELETE /v1/models/{model}: the SDK's `client.models.delete(job.fine_tuned_model)`.

A plain function: FastAPI runs it in its thread pool, so removing merged weights from disk
never blocks the event loop that streams completions."""

from __future__ import annotations

from fastapi import APIRouter

from tunedesk.serve.deps import ContextDep
from tunedesk.serve.errors import ModelNotFound
from tunedesk.serve.finetune.deps import FineTuneKey, FineTuningDep

router = APIRouter()


@router.delete("/v1/models/{model:path}")  # `:path`, as the GET: names may hold a "/"
def delete_model(model: str, ft: FineTuningDep, key: FineTuneKey, ctx: ContextDep) -> dict:
    ctx.model = model
    if not key.allows_model(model):  # a key limited to some models deletes only those
        raise ModelNotFound(model)
    return ft.delete_model(model)
