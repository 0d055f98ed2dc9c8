"""Rough serving throughput: N concurrent streaming chat requests, fixed-length outputs.

    python -m tunedesk.serve.bench --base-url http://127.0.0.1:8000/v1 --model tiny \\
        --concurrency 1 8 32 --max-tokens 64

Counts streamed content chunks as tokens (the local engine sends one chunk per token, minus
held-back bytes), and reports usage-based tokens/s from the final usage chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time


async def _one(client, model: str, max_tokens: int, i: int) -> tuple[int, float]:
    start = time.perf_counter()
    ttft = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"第{i}个问题：申购费怎么收？"}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},  # fixed-length outputs: comparable runs
    )
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return tokens, ttft or 0.0


async def run(base_url: str, model: str, concurrency: list[int], max_tokens: int) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    await _one(client, model, 4, 0)  # warm-up
    for n in concurrency:
        start = time.perf_counter()
        results = await asyncio.gather(*[_one(client, model, max_tokens, i) for i in range(n)])
        elapsed = time.perf_counter() - start
        tokens = sum(t for t, _ in results)
        ttfts = [f for _, f in results]
        print(
            f"concurrency {n:>3}: {tokens:>6} tokens in {elapsed:6.2f}s = "
            f"{tokens / elapsed:7.1f} tok/s total, {tokens / elapsed / n:6.1f} tok/s per stream, "
            f"TTFT median {statistics.median(ttfts) * 1000:.0f} ms"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    asyncio.run(run(args.base_url, args.model, args.concurrency, args.max_tokens))


if __name__ == "__main__":
    main()
