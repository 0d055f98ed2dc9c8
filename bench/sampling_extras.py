"""What a request's sampling extras cost: logprobs and a structured-output grammar against
plain greedy decoding, side by side on one batcher in one process.

    python bench/sampling_extras.py [--model DIR] [--requests 64] [--rounds 3] [--threads 1]

The transformers engine's batcher alone (no HTTP), closed loop at concurrency 1, 8 and 32,
64 tokens per request (`ignore_eos`). Variants, alternating round by round:
- free: greedy, nothing else (the path every request without extras takes);
- logprobs: greedy with `logprobs` and 5 alternatives per token (a log_softmax and a topk
  per row per step);
- json: greedy under a JSON schema (`{"answer": string}`, compact, llguidance's mask per row
  per step, and its parser advanced per token).
Prints output tokens/s per variant and its ratio to free. The grammar's mask costs more on a
bigger vocabulary (the tiny base has 6,000 tokens; Qwen2's has 151,646).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunedesk.chat_format import encode_prompt
from tunedesk.serve.engines.local.batcher import StepBatcher
from tunedesk.serve.engines.local.generation import Generation
from tunedesk.serve.engines.local.grammar import json_schema_grammar
from tunedesk.serve.engines.local.sampling import SamplingParams
from tunedesk.serve.settings import ServeSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_step import _tiny_base  # noqa: E402 - the same cached tiny base, built once

MAX_TOKENS = 64
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}


def variants() -> dict[str, SamplingParams]:
    base = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    return {
        "free": SamplingParams(**base),
        "logprobs": SamplingParams(**base, logprobs=5),
        "json": SamplingParams(**base, grammar=json_schema_grammar(SCHEMA, any_whitespace=False)),
    }


async def _one(batcher: StepBatcher, prompt: list[int], params: SamplingParams) -> int:
    gen = Generation(batcher, [(prompt, params)], time.monotonic() + 600)
    tokens = 0
    while not gen.finished:
        for out in await gen.next_outputs():
            tokens += out.tokens
    gen.close()
    return tokens


async def level(
    batcher: StepBatcher, prompts: list[list[int]], params: SamplingParams, concurrency: int
) -> tuple[int, float]:
    queue = iter(prompts)
    counts: list[int] = []

    async def worker() -> None:
        for p in queue:
            counts.append(await _one(batcher, p, params))

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return sum(counts), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: build a tiny base)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or _tiny_base()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    prompts = [
        encode_prompt(tok, [{"role": "user", "content": f"第{i}个问题：基金的费率是多少？"}])
        for i in range(args.requests)
    ]
    print(f"model {path}, vocab {len(tok)}, {args.threads} thread(s), {args.requests} requests")
    batcher = StepBatcher(
        model,
        tok,
        stop_ids=[tok.eos_token_id or 0],
        context_len=2048,
        max_batch=64,
        cpu_threads=args.threads,
        prefill_token_budget=ServeSettings().prefill_batch_tokens,  # as the server runs it
    )
    batcher.start()
    rates: dict[tuple[int, str], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for c in (1, 8, 32):
                for name, params in variants().items():
                    tokens, seconds = asyncio.run(level(batcher, prompts, params, c))
                    rates.setdefault((c, name), []).append(tokens / seconds)
    finally:
        batcher.stop()
    names = list(variants())
    print(
        "| c | "
        + " | ".join(f"{n} tok/s" for n in names)
        + " | "
        + " | ".join(f"{n} / free" for n in names[1:])
        + " |"
    )
    print("|--:|" + "--:|" * (2 * len(names) - 1))
    for c in (1, 8, 32):
        med = {n: statistics.median(rates[(c, n)]) for n in names}
        cells = [f"{med[n]:,.0f}" for n in names] + [
            f"{med[n] / med['free']:.2f}" for n in names[1:]
        ]
        print(f"| {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
