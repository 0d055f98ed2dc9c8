"""The `transformers` engine: models loaded in this process, one batcher thread per model."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi.responses import JSONResponse
from starlette.responses import Response

from tunedesk.serve.engines.base import ApiCall, Engine
from tunedesk.serve.engines.local.models import LocalModels
from tunedesk.serve.engines.local.serving import LocalServing
from tunedesk.serve.errors import OpenAIError
from tunedesk.serve.metrics import Metrics
from tunedesk.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings

log = logging.getLogger("tunedesk.serve")


class TransformersEngine(Engine):
    kind = "transformers"

    def __init__(
        self, registry: ModelRegistry, settings: ServeSettings, metrics: Metrics | None = None
    ) -> None:
        super().__init__(registry, metrics)
        self.settings = settings
        self.local = LocalModels(registry, settings)
        self.serving = LocalServing(self.local, settings, self.metrics)
        self._warmup: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Load the default model in the background: /health answers during the load, /ready
        # turns 200 when it is done.
        if self.registry.default is not None:
            self._warmup = asyncio.create_task(self._load_default(self.registry.default))

    async def _load_default(self, name: str) -> None:
        with contextlib.suppress(OpenAIError):  # logged by the loader; /ready reports it
            await self.local.get(name)

    async def stop(self) -> None:
        if self._warmup is not None:
            self._warmup.cancel()
        await self.local.close()

    async def ready(self) -> tuple[bool, str]:
        name = self.registry.default
        if name is None:
            return False, "no model is registered"
        lm = self.local.loaded(name)
        if lm is not None:
            if lm.batcher.alive:
                return True, f"{name} is loaded"
            return False, f"{name}: its worker stopped"
        if self.local.failure(name):
            return False, f"{name} failed to load"
        return False, f"{name} is loading"

    async def models(self, call: ApiCall[None]) -> Response:
        cards = []
        for spec in self.registry.list():
            if not call.key.allows_model(spec.name):
                continue
            lm = self.local.loaded(spec.name)
            cards.append(
                ModelCard(
                    id=spec.name,
                    created=spec.created,
                    owned_by=spec.owned_by,
                    root=spec.parent or spec.name,
                    parent=spec.parent,
                    max_model_len=lm.context_len if lm else None,
                )
            )
        return JSONResponse(ModelList(data=cards).model_dump(mode="json"))

    async def chat_completions(self, call: ApiCall[ChatCompletionRequest]) -> Response:
        return await self.serving.chat(call)

    async def completions(self, call: ApiCall[CompletionRequest]) -> Response:
        return await self.serving.completion(call)
