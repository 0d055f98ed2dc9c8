"""One JSON line per request, plus the request counter and latency histogram.

Pure ASGI rather than BaseHTTPMiddleware: that one buffers streaming bodies through an extra
task and hides client disconnects from the endpoint, which is exactly what SSE must see.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunedesk.serve.context import RequestContext
from tunedesk.serve.metrics import Metrics

access_log = logging.getLogger("tunedesk.serve.access")


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id" and 0 < len(value) <= 128:
            return value.decode("latin-1")
    return uuid.uuid4().hex


def _route_label(scope: Scope) -> str:
    # The route's template, not the raw path: unknown paths must not explode label cardinality.
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, log_content: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.log_content = log_content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext(request_id=_request_id(scope))
        scope.setdefault("state", {})["ctx"] = ctx
        status = 500
        header = (b"x-request-id", ctx.request_id.encode("latin-1"))

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - ctx.started
            route = _route_label(scope)
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_latency.labels(route=route).observe(elapsed)
            access_log.info(
                json.dumps(self._record(scope, ctx, status, elapsed), ensure_ascii=False)
            )

    def _record(
        self, scope: Scope, ctx: RequestContext, status: int, elapsed: float
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "request_id": ctx.request_id,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": status,
            "model": ctx.model,
            "key": ctx.key_name,
            "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": ctx.completion_tokens,
            "latency_ms": round(elapsed * 1000, 1),
            "ttft_ms": ctx.ttft_ms,
        }
        if ctx.cached_tokens:
            record["cached_tokens"] = ctx.cached_tokens
        if ctx.finish_reasons:
            record["finish_reasons"] = ctx.finish_reasons
        if ctx.error_code:
            record["error"] = ctx.error_code
        if ctx.disconnected:
            record["disconnected"] = True
        if self.log_content and ctx.content is not None:
            record["content"] = ctx.content
        return record
