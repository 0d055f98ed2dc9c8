"""Refuse request bodies over a size limit with 413, before they are buffered.

One limit for every route, except paths given their own (file uploads are far larger than any
chat request). Content-Length is checked up front; a chunked (or lying) body is counted as it
streams in and cut off the moment it passes the limit, so a client can't make the server
buffer gigabytes.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunedesk.serve.errors import PayloadTooLarge


class _TooLarge(HTTPException):
    # An HTTPException because FastAPI turns any other error raised while it reads the body
    # into a 400; this one it re-raises, and the error handlers render it as OpenAI's 413.
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"Request body is larger than the {max_bytes}-byte limit.")


def _error(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the {limit}-byte limit.")


class BodySizeLimitMiddleware:
    def __init__(
        self, app: ASGIApp, max_bytes: int, max_bytes_by_path: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_bytes_by_path = max_bytes_by_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes_by_path.get(scope["path"], self.max_bytes)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await _error(limit).response()(scope, receive, send)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:  # the body is read before any response byte; this always holds
                await _error(limit).response()(scope, receive, send)
