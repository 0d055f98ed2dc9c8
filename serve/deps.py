"""FastAPI dependencies, as `Annotated` aliases the routes declare (full-stack-template style).

All of them are `async def` although none awaits anything slow: FastAPI runs a plain `def`
dependency in its thread pool, and those hops (four per request) made a burst of 32 requests
take ~30 ms to reach the engine, each waiting for the others' thread round trips.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from tunedesk.serve.admission import Admission
from tunedesk.serve.auth import ANONYMOUS, ApiKey, KeyStore, RateLimiter, bearer_token
from tunedesk.serve.context import RequestContext
from tunedesk.serve.engines.base import ApiCall, Engine
from tunedesk.serve.errors import AuthenticationFailed, PermissionDenied, RateLimited
from tunedesk.serve.metrics import Metrics
from tunedesk.serve.service import OpenAIService
from tunedesk.serve.settings import ServeSettings


@dataclass
class AppState:
    settings: ServeSettings
    engine: Engine
    keys: KeyStore
    admission: Admission
    metrics: Metrics
    service: OpenAIService
    rate_limiter: RateLimiter = field(default_factory=RateLimiter)


async def get_state(request: Request) -> AppState:
    return request.app.state.tunedesk


StateDep = Annotated[AppState, Depends(get_state)]


async def get_context(request: Request) -> RequestContext:
    ctx = getattr(request.state, "ctx", None)
    if ctx is None:  # app used without the access-log middleware (unit tests)
        ctx = request.state.ctx = RequestContext(request_id="local")
    return ctx


ContextDep = Annotated[RequestContext, Depends(get_context)]


async def authenticate(request: Request, state: StateDep, ctx: ContextDep) -> ApiKey:
    if state.keys.open:
        return ANONYMOUS
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise AuthenticationFailed(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    key = state.keys.verify(token)
    if key is None:
        # Never echo any part of the key: it may be a real key for another system.
        raise AuthenticationFailed("Incorrect API key provided.")
    ctx.key_name = key.name
    wait = state.rate_limiter.acquire(key, time.monotonic())
    if wait > 0:
        raise RateLimited(
            f"Rate limit reached for key {key.name}; try again in {wait:.1f} s.",
            retry_after_s=max(1, math.ceil(wait)),
        )
    return key


KeyDep = Annotated[ApiKey, Depends(authenticate)]


async def authorize_metrics(request: Request, state: StateDep, ctx: ContextDep) -> None:
    """/metrics is open without keys or with `public_metrics`; else it takes a key with the
    `metrics` scope (a widget key, public by design, has only `chat`)."""
    if state.keys.open or state.settings.public_metrics:
        return
    key = await authenticate(request, state, ctx)
    if not key.allows("metrics"):
        raise PermissionDenied("This API key may not read metrics.")


MetricsAccessDep = Annotated[None, Depends(authorize_metrics)]


async def make_call(request: Request, state: StateDep) -> ApiCall:
    # The context and the key by plain calls, not as dependencies of this one: FastAPI's
    # solving of each dependency costs more than the function it calls, and every request of
    # a burst waits for the requests ahead of it on the event loop.
    ctx = await get_context(request)
    key = await authenticate(request, state, ctx)
    # FastAPI has already read (and cached) the body to validate it: this costs no I/O.
    raw = await request.body()
    deadline = time.monotonic() + state.settings.request_timeout_s
    return ApiCall(body=None, raw=raw, http=request, ctx=ctx, key=key, deadline=deadline)


CallDep = Annotated[ApiCall, Depends(make_call)]


async def get_service(state: StateDep) -> OpenAIService:
    return state.service


ServiceDep = Annotated[OpenAIService, Depends(get_service)]
