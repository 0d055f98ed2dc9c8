"""One decode step of the transformers engine: the model's own forward over a DynamicCache
(what transformers' generate runs) against the lean forward over the slab cache
(serve/engines/local/fastpath.py + slab.py), side by side in one process, same weights.

    python bench/decode_step.py [--model DIR] [--threads 1] [--steps 200]

Prints ms per step and tokens/s at batch 1, 8 and 32 with a 40-token prompt, and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from tunedesk.serve.engines.local.fastpath import LeanDecoder


def _tiny_base() -> str:
    from tunedesk.train.sample_data import generate_pairs
    from tunedesk.train.tiny_base import TinyBaseConfig, build_tiny_base

    out = Path(tempfile.gettempdir()) / "tunedesk-bench-decode" / "tiny-base"
    if not (out / "model.safetensors").exists():
        pairs = generate_pairs(400)
        texts = [p["prompt"] for p in pairs] + [p["completion"] for p in pairs]
        build_tiny_base(out, texts, TinyBaseConfig(), log=lambda _: None)
    return str(out)


def transformers_steps(model, batch: int, prompt: int, steps: int) -> float:
    ids = torch.randint(0, model.config.vocab_size - 1, (batch, prompt))
    mask = torch.ones_like(ids)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
    start = time.perf_counter()
    for i in range(steps):
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
        out = model(
            input_ids=out.logits[:, -1:].argmax(-1),
            attention_mask=mask,
            position_ids=torch.full((batch, 1), prompt + i),
            past_key_values=cache,
            logits_to_keep=1,
        )
    return (time.perf_counter() - start) / steps


def lean_steps(lean: LeanDecoder, batch: int, prompt: int, steps: int, vocab: int) -> float:
    ids = torch.randint(0, vocab - 1, (batch, prompt))
    mask = torch.ones_like(ids)
    slab = lean.new_slab(torch.device("cpu"))
    logits, cache = lean.prefill(ids, mask.cumsum(-1) - 1, mask)
    slab.join(cache, mask)
    start = time.perf_counter()
    for i in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        logits = lean.decode(nxt, torch.full((batch, 1), prompt + i), slab)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: build a tiny base)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or _tiny_base()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    lean = LeanDecoder(copy.deepcopy(model))
    vocab = model.config.vocab_size
    print(f"model {path}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, ", end="")
    print(f"{args.threads} thread(s), prompt {args.prompt}, {args.steps} steps")
    print(
        "| batch | transformers ms/step | lean ms/step | transformers tok/s | lean tok/s | ratio |"
    )
    print(
        "|------:|---------------------:|-------------:|-------------------:|-----------:|------:|"
    )
    with torch.inference_mode():
        for batch in (1, 8, 32):
            # Alternate and keep the best of two: both see the same machine noise.
            hf = min(transformers_steps(model, batch, args.prompt, args.steps) for _ in range(2))
            ln = min(lean_steps(lean, batch, args.prompt, args.steps, vocab) for _ in range(2))
            print(
                f"| {batch:>5} | {hf * 1000:>20.2f} | {ln * 1000:>12.2f} | {batch / hf:>18.0f} "
                f"| {batch / ln:>10.0f} | {hf / ln:>5.2f} |"
            )


if __name__ == "__main__":
    main()
