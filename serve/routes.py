"""HTTP routes: parse, then hand off to the service. No logic lives here."""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.responses import Response

from tunedesk.serve.deps import CallDep, MetricsAccessDep, ServiceDep, StateDep
from tunedesk.serve.errors import Unavailable
from tunedesk.serve.protocol import ChatCompletionRequest, CompletionRequest

router = APIRouter()


@router.get("/health", include_in_schema=False)
async def health() -> dict[str, str]:
    """Liveness: the process answers. Always open, never touches the model."""
    return {"status": "ok"}


@router.get("/ready", include_in_schema=False)
async def ready(state: StateDep) -> Response:
    """Readiness: the default model can serve requests (503 while loading or broken)."""
    ok, reason = await state.engine.ready()
    if not ok:
        return Unavailable(f"Not ready: {reason}.", code="not_ready").response()
    return JSONResponse({"status": "ready", "detail": reason})


@router.get("/metrics", include_in_schema=False)
async def metrics(state: StateDep, _: MetricsAccessDep) -> Response:
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models")
async def list_models(call: CallDep, service: ServiceDep) -> Response:
    return await service.models(call)


@router.get("/v1/models/{model:path}")  # `:path`: served names may hold a "/" (org/name)
async def retrieve_model(model: str, call: CallDep, service: ServiceDep) -> Response:
    return await service.model(call, model)


@router.post("/v1/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest, call: CallDep, service: ServiceDep
) -> Response:
    return await service.chat_completions(replace(call, body=body))


@router.post("/v1/completions")
async def create_completion(
    body: CompletionRequest, call: CallDep, service: ServiceDep
) -> Response:
    return await service.completions(replace(call, body=body))
