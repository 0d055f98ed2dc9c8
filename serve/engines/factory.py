"""Settings -> engine. Engine modules are imported only when chosen (torch, httpx, vLLM)."""

from __future__ import annotations

from tunedesk.errors import CommandError
from tunedesk.serve.engines.base import Engine
from tunedesk.serve.metrics import Metrics
from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings


def build_engine(
    settings: ServeSettings, registry: ModelRegistry, metrics: Metrics | None = None
) -> Engine:
    if settings.engine == "transformers":
        from tunedesk.serve.engines.local.engine import TransformersEngine

        return TransformersEngine(registry, settings, metrics)
    if settings.engine == "vllm":
        from tunedesk.serve.engines.vllm import VLLMEngine, ensure_vllm_installed

        ensure_vllm_installed()
        return VLLMEngine(registry, settings, metrics)
    if settings.engine == "upstream":
        from tunedesk.serve.engines.proxy import ProxyEngine

        if not settings.upstream_url:
            raise CommandError("--engine upstream needs --upstream-url URL")
        key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        return ProxyEngine(
            registry,
            settings.upstream_url,
            api_key=key,
            timeout_s=settings.request_timeout_s,
            ask_usage=settings.upstream_usage,
            salt_by_key=settings.upstream_cache_salt,
            metrics=metrics,
        )
    raise CommandError(f"unknown engine {settings.engine!r}")
