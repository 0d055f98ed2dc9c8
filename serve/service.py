"""What every OpenAI route does around the engine: check the key's scope and models, take a
slot from admission control (429 when full), hand off, and give the slot back when the response
has been sent. Engine-independent, so the gateway and the local engine behave the same."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import JSONResponse, Response

from tunedesk.serve.admission import Admission
from tunedesk.serve.engines.base import ApiCall, Engine
from tunedesk.serve.errors import BadGateway, ModelNotFound, PermissionDenied
from tunedesk.serve.protocol import ChatCompletionRequest, CompletionRequest
from tunedesk.serve.streaming import release_when_sent

B = TypeVar("B")


class OpenAIService:
    def __init__(self, engine: Engine, admission: Admission) -> None:
        self.engine = engine
        self.admission = admission

    @staticmethod
    def _authorize(call: ApiCall[Any], scope: str, model: str | None = None) -> None:
        if not call.key.allows(scope):
            raise PermissionDenied(f"This API key may not use {scope}.")
        if model is not None:
            call.ctx.model = model
            if not call.key.allows_model(model):
                raise ModelNotFound(model)

    async def _admitted(
        self, call: ApiCall[B], weight: int, handler: Callable[[ApiCall[B]], Awaitable[Response]]
    ) -> Response:
        ticket = self.admission.acquire(weight)
        try:
            response = await handler(call)
        except BaseException:
            ticket.release()
            raise
        return release_when_sent(response, ticket.release)

    async def models(self, call: ApiCall[None]) -> Response:
        self._authorize(call, "models")
        return await self.engine.models(call)

    async def model(self, call: ApiCall[None], model: str) -> Response:
        """One model's card, taken from the engine's list: vLLM serves no per-model route,
        and a card must read the same in both places."""
        self._authorize(call, "models", model)
        listed = await self.engine.models(call)
        if listed.status_code != 200:  # an upstream's error, relayed as it is
            return listed
        try:
            cards = [c for c in json.loads(listed.body)["data"] if c.get("id") == model]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BadGateway("The upstream's model list is not an OpenAI model list.") from None
        if not cards:
            raise ModelNotFound(model)
        return JSONResponse(cards[0])

    async def chat_completions(self, call: ApiCall[ChatCompletionRequest]) -> Response:
        self._authorize(call, "chat", call.body.model)
        return await self._admitted(call, call.body.num_sequences(), self.engine.chat_completions)

    async def completions(self, call: ApiCall[CompletionRequest]) -> Response:
        self._authorize(call, "completions", call.body.model)
        return await self._admitted(call, call.body.num_sequences(), self.engine.completions)
