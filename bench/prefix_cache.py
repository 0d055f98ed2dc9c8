"""Prefix cache: time to first token with and without it, side by side in one process.

    python bench/prefix_cache.py [--model DIR] [--requests 48] [--threads 1]

Two workloads on the transformers engine's batcher (the engine alone, no HTTP), each run with
the cache off and on, alternating, on the same weights:
- widget: a customer-service system prompt (~300 tokens, what a widget's `data-system` sends
  with every question) plus one question, at concurrency 1 and 8;
- conversation: one chat of 8 turns, each turn sending the whole history (as the widget and
  the UI do), one request at a time.
Prints TTFT p50 (submit to first token, measured where the engine produces it) and the ratio
off / on. The default model is the tiny base (2.7M parameters): the saving grows with the
model, since a prefill's cost does and a cache hit's barely does.
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
from tunedesk.serve.engines.local.sampling import SamplingParams
from tunedesk.serve.settings import ServeSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_step import _tiny_base  # noqa: E402 - the same cached tiny base, built once

SYSTEM = (
    "你是某基金公司的在线客服助手，服务对象是个人投资者。回答时请遵守以下要求：一、先直接回答问题，"
    "再补充必要的说明，整体不超过三句话；二、涉及申购费、赎回费、管理费、托管费、销售服务费等费率时，"
    "给出具体数字和适用条件，并提醒费率以基金合同和招募说明书为准；三、涉及赎回到账时间时，说明货币"
    "基金、债券基金、股票基金和QDII基金的一般到账时间，并提醒节假日顺延；四、涉及风险等级时，说明"
    "R1到R5的含义，并提醒投资者根据自身风险承受能力选择产品；五、不得承诺收益，不得推荐具体买卖时点，"
    "不得评价其他基金公司；六、遇到账户安全、投诉、资金异常等问题，请引导用户拨打客服热线或转人工；"
    "七、不确定的内容不要编造，请用户以官网公告为准。"
)
QUESTIONS = [
    "申购费怎么收？",
    "赎回多久到账？",
    "风险等级是什么意思？",
    "适合定投吗？",
    "管理费是多少？",
    "货币基金周末有收益吗？",
    "怎么修改分红方式？",
    "QDII基金什么时候确认份额？",
]


async def _one(batcher: StepBatcher, prompt: list[int], max_tokens: int) -> tuple[float, str]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    gen = Generation(batcher, [(prompt, params)], time.monotonic() + 600)
    first, text = None, ""
    while not gen.finished:
        for out in await gen.next_outputs():
            if first is None and out.tokens:
                first = out.at - start
            text += out.text
    gen.close()  # as the server does: the worker stops waiting for this request's reader
    assert first is not None
    return first, text


async def widget(batcher: StepBatcher, tok, requests: int, concurrency: int) -> list[float]:
    prompts = [
        encode_prompt(
            tok,
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{i}. {q}"}],
        )
        for i, q in enumerate(QUESTIONS * (requests // len(QUESTIONS) + 1))
    ][:requests]
    queue = iter(prompts)
    ttfts: list[float] = []

    async def worker() -> None:
        for p in queue:
            ttfts.append((await _one(batcher, p, 16))[0])

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return ttfts


async def conversation(batcher: StepBatcher, tok, turns: int) -> list[float]:
    history = [{"role": "system", "content": SYSTEM}]
    ttfts = []
    for q in QUESTIONS[:turns]:
        history.append({"role": "user", "content": q})
        ttft, answer = await _one(batcher, encode_prompt(tok, history), 48)
        history.append({"role": "assistant", "content": answer})
        ttfts.append(ttft)
    return ttfts[1:]  # the first turn has nothing to reuse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: build a tiny base)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3, help="alternating off/on rounds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or _tiny_base()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    system_tokens = len(encode_prompt(tok, [{"role": "system", "content": SYSTEM}]))
    print(f"model {path}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, ", end="")
    print(f"{args.threads} thread(s), system prompt {system_tokens} tokens")
    batchers = {}
    for label, cache_mb in (("off", 0), ("on", 256)):
        b = StepBatcher(
            model,
            tok,
            stop_ids=[tok.eos_token_id or 0],
            context_len=2048,
            max_batch=64,
            cpu_threads=args.threads,
            prefill_token_budget=ServeSettings().prefill_batch_tokens,  # as the server runs it
            prefix_cache_bytes=cache_mb << 20,
        )
        b.start()
        batchers[label] = b
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for label, b in batchers.items():
                for name, run in (
                    ("widget c=1", lambda b=b: widget(b, tok, args.requests, 1)),
                    ("widget c=8", lambda b=b: widget(b, tok, args.requests, 8)),
                    ("conversation", lambda b=b: conversation(b, tok, 8)),
                ):
                    results.setdefault((name, label), []).extend(asyncio.run(run()))
    finally:
        for b in batchers.values():
            b.stop()
    print("| workload | TTFT p50 off (ms) | TTFT p50 on (ms) | off / on |")
    print("|---|--:|--:|--:|")
    for name in ("widget c=1", "widget c=8", "conversation"):
        off = statistics.median(results[(name, "off")]) * 1000
        on = statistics.median(results[(name, "on")]) * 1000
        print(f"| {name} | {off:.2f} | {on:.2f} | {off / on:.2f} |")


if __name__ == "__main__":
    main()
