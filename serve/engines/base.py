"""The engine interface every backend implements.

Routes validate a request and hand the engine an `ApiCall`: the parsed body *and* the exact
bytes the client sent. A proxying engine (vLLM child, upstream gateway) forwards those bytes
and streams the upstream's bytes back untouched; the local engine implements OpenAI semantics
from the parsed body. Either way the engine returns a finished Starlette `Response`, so the
route layer never cares which kind it talks to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from tunedesk.serve.auth import ApiKey
from tunedesk.serve.context import RequestContext
from tunedesk.serve.metrics import Metrics
from tunedesk.serve.protocol import ChatCompletionRequest, CompletionRequest
from tunedesk.serve.registry import ModelRegistry

B = TypeVar("B")


@dataclass
class ApiCall(Generic[B]):
    body: B
    """The validated request."""
    raw: bytes
    """The body exactly as received (proxies forward it unchanged)."""
    http: Request
    """The HTTP request: headers, and the receive channel disconnects arrive on."""
    ctx: RequestContext
    key: ApiKey
    deadline: float
    """time.monotonic() by which the whole response must be done."""


class Engine(ABC):
    kind: ClassVar[str]

    def __init__(self, registry: ModelRegistry, metrics: Metrics | None = None) -> None:
        self.registry = registry
        self.metrics = metrics or Metrics()

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Begin loading or launching; must return promptly (readiness is reported by ready())."""

    async def stop(self) -> None:  # noqa: B027 (optional hook)
        """Release models, threads, child processes, connections."""

    @abstractmethod
    async def ready(self) -> tuple[bool, str]:
        """(ready, reason) for /ready: True once requests for the default model can be served."""

    @abstractmethod
    async def models(self, call: ApiCall[None]) -> Response:
        """GET /v1/models."""

    @abstractmethod
    async def chat_completions(self, call: ApiCall[ChatCompletionRequest]) -> Response:
        """POST /v1/chat/completions."""

    @abstractmethod
    async def completions(self, call: ApiCall[CompletionRequest]) -> Response:
        """POST /v1/completions."""
