"""OpenAI-compatible endpoints: concurrent chat completions with the official `openai` client.

Every request is sent with temperature 0 and `max_tokens`; at most `concurrency` are in flight.
A sample's latency is its request's wall time; output tokens come from the response's usage.
A request that still fails after the client's retries is recorded as an error with an empty
answer (and scores 0); if every request fails the run stops with the first error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from tunedesk.eval.data import EvalSample, Generation


class EndpointError(RuntimeError):
    """The endpoint can't be used at all (unreachable, no such model, every request failed)."""


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    text = str(exc).strip() or type(exc).__name__
    return f"HTTP {status}: {text}" if status and "Error code" not in text else text


async def _resolve_model(client: Any, base_url: str) -> str:
    try:
        page = await client.models.list()
    except Exception as exc:
        raise EndpointError(
            f"{base_url}: can't list models to choose one ({_describe(exc)}); "
            "name the model as URL#model-name"
        ) from None
    names = [m.id for m in page.data]
    if len(names) != 1:
        raise EndpointError(
            f"{base_url} serves {len(names)} models ({', '.join(names) or 'none'}); "
            "name one as URL#model-name"
        )
    return names[0]


async def _generate(
    base_url: str,
    model: str | None,
    samples: Sequence[EvalSample],
    api_key: str,
    max_tokens: int,
    concurrency: int,
    timeout: float,
    progress: Callable[[int], None] | None,
) -> tuple[str, list[Generation], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=2)
    try:
        if model is None:
            model = await _resolve_model(client, base_url)
        sem = asyncio.Semaphore(max(1, concurrency))

        async def one(sample: EvalSample) -> Generation:
            async with sem:
                started = time.perf_counter()
                try:
                    resp = await client.chat.completions.create(
                        model=model,
                        messages=sample.prompt,
                        temperature=0,
                        max_tokens=max_tokens,
                    )
                except Exception as exc:
                    return Generation("", None, None, None, error=_describe(exc))
                finally:
                    if progress is not None:
                        progress(1)
                latency = time.perf_counter() - started
            choice = resp.choices[0] if resp.choices else None
            text = (choice.message.content or "") if choice is not None else ""
            usage = getattr(resp, "usage", None)
            tokens = getattr(usage, "completion_tokens", None) if usage is not None else None
            finish = getattr(choice, "finish_reason", None) if choice is not None else None
            return Generation(text.strip(), latency, tokens, finish)

        started = time.perf_counter()
        results = await asyncio.gather(*(one(s) for s in samples))
        wall = time.perf_counter() - started
    finally:
        await client.close()
    return model, list(results), wall


def generate(
    base_url: str,
    model: str | None,
    samples: Sequence[EvalSample],
    api_key: str = "EMPTY",
    max_tokens: int = 256,
    concurrency: int = 8,
    timeout: float = 120.0,
    progress: Callable[[int], None] | None = None,
) -> tuple[str, list[Generation], float]:
    """(model name used, one Generation per sample, wall time of the whole run in seconds)."""
    name, results, wall = asyncio.run(
        _generate(base_url, model, samples, api_key, max_tokens, concurrency, timeout, progress)
    )
    errors = [r.error for r in results if r.error]
    if results and len(errors) == len(results):
        raise EndpointError(f"{base_url} ({name}): every request failed; first: {errors[0]}")
    return name, results, wall
