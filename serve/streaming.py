"""Server-sent events, and responses that always clean up after themselves.

A streamed response holds a batch slot (and an engine sequence or upstream connection) until it
ends. Starlette only closes the body iterator if it was iterated, and drops it unclosed when the
client vanishes mid-stream, so `ManagedStreamingResponse` runs its cleanups in a `finally`
around the whole send: normal end, client disconnect, server shutdown or error alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tunedesk.serve.errors import ClientGone, OpenAIError

log = logging.getLogger("tunedesk.serve")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

T = TypeVar("T")
Cleanup = Callable[[], Any]


def sse(payload: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> bytes:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude=exclude)
    else:
        data = json.dumps(payload, ensure_ascii=False)
    return b"data: " + data.encode("utf-8") + b"\n\n"


def sse_error(err: OpenAIError) -> bytes:
    """An error after the stream started: the status is already 200, so it travels in-band."""
    return sse(err.body()) + DONE


class ManagedStreamingResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        kwargs.setdefault("media_type", "text/event-stream")
        kwargs.setdefault("headers", SSE_HEADERS)
        super().__init__(content, **kwargs)
        self._cleanups: list[Cleanup] = []

    def on_close(self, fn: Cleanup) -> None:
        self._cleanups.append(fn)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await run_cleanups([getattr(self.body_iterator, "aclose", None), *self._cleanups])


async def run_cleanups(fns: list[Cleanup | None]) -> None:
    for fn in reversed(fns):
        if fn is None:
            continue
        try:
            result = fn()
            if isinstance(result, Awaitable):
                await result
        except Exception:  # a failing cleanup must not skip the others
            log.exception("cleanup failed")


def release_when_sent(response: Response, fn: Cleanup) -> Response:
    """Run `fn` when `response` is fully sent (streams) or now (already complete bodies)."""
    if isinstance(response, ManagedStreamingResponse):
        response.on_close(fn)
    else:
        fn()
    return response


async def until_disconnected(request: Request) -> None:
    """Return when the client goes away. Only valid once the body has been read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (non-streamed requests:
    nothing is sent until the end, so this is the only way to notice and stop generating).
    Raises ClientGone once the work has stopped."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):  # cancelled, or failed on the way out
            await task
        raise ClientGone
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
