"""Local models: left-padded greedy batch generation and answer-token loss with transformers.

Prompts are rendered with the shared chat format (`encode_prompt`: the model's own chat
template, tokenised exactly as in training); generation is greedy, stops on the template's
end-of-turn/eos ids (`stop_token_ids`), and ignores the sampling settings in the model's
generation_config (no repetition penalty), so scores are reproducible. The loss is the mean
cross-entropy over the reference answer's tokens only (`encode_conversation`'s loss mask, with
earlier assistant turns of a multi-turn prompt masked out).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunedesk.chat_format import encode_conversation, encode_prompt, stop_token_ids
from tunedesk.eval.data import EvalSample, Generation


@dataclass
class LocalModel:
    model: Any
    tokenizer: Any
    device: Any
    dtype: str

    def close(self) -> None:
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _pick_device(device: str) -> Any:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def _pick_dtype(dtype: str, device: Any) -> Any:
    import torch

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_local(path: str, device: str = "auto", dtype: str = "auto") -> LocalModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = _pick_device(device)
    torch_dtype = _pick_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(dev).eval()
    return LocalModel(model, tokenizer, dev, str(torch_dtype).replace("torch.", ""))


def _pad_id(tokenizer: Any, stops: Sequence[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(stops[0]) if stops else 0


def generation_stops(lm: LocalModel) -> list[int]:
    """`stop_token_ids` (end of turn, eos) plus any eos ids of the model's generation config
    (e.g. Qwen's <|endoftext|>), which transformers and vLLM also stop on by default."""
    stops = stop_token_ids(lm.tokenizer)
    extra = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    for tid in extra if isinstance(extra, list) else [extra]:
        if isinstance(tid, int) and tid >= 0 and tid not in stops:
            stops.append(tid)
    return stops


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def generate(
    lm: LocalModel,
    samples: Sequence[EvalSample],
    max_tokens: int = 256,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Generation], float]:
    """Greedy answers for every sample, and the total generation wall time in seconds.

    A sample's latency is the wall time of the batch that produced it (the answers of a batch
    arrive together). Prompts are batched by length, longest first, so an out-of-memory error
    shows up on the first batch.
    """
    import torch
    from transformers import GenerationConfig

    tok, model = lm.tokenizer, lm.model
    stops = generation_stops(lm)
    pad = _pad_id(tok, stops)
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        eos_token_id=stops or None,
        pad_token_id=pad,
    )
    prompts = [encode_prompt(tok, s.prompt) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (-len(prompts[i]), i))
    results: list[Generation | None] = [None] * len(samples)
    total = 0.0
    for batch in _batches(order, max(1, batch_size)):
        width = max(len(prompts[i]) for i in batch)
        ids = [[pad] * (width - len(prompts[i])) + prompts[i] for i in batch]
        mask = [[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch]
        input_ids = torch.tensor(ids, dtype=torch.long, device=lm.device)
        attention_mask = torch.tensor(mask, dtype=torch.long, device=lm.device)
        _sync(lm.device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config
            )
        _sync(lm.device)
        elapsed = time.perf_counter() - started
        total += elapsed
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), None)
            finish = "length" if cut is None else "stop"
            kept = new if cut is None else new[:cut]
            text = tok.decode(kept, skip_special_tokens=True).strip()
            results[i] = Generation(text, elapsed, len(kept), finish)
        if progress is not None:
            progress(len(batch))
    return [r for r in results if r is not None], total


def answer_losses(
    lm: LocalModel,
    samples: Sequence[EvalSample],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """(summed cross-entropy in nats, number of tokens) over each reference answer's tokens."""
    import torch
    import torch.nn.functional as F

    tok, model = lm.tokenizer, lm.model
    encoded = []
    for s in samples:
        # Earlier assistant turns are context here: weight 0 keeps them out of the mask.
        prompt = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in s.prompt]
        enc = encode_conversation(tok, [*prompt, {"role": "assistant", "content": s.reference}])
        encoded.append(enc)
    pad = _pad_id(tok, stop_token_ids(tok))
    order = sorted(range(len(samples)), key=lambda i: (-len(encoded[i].input_ids), i))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(samples)
    for batch in _batches(order, max(1, batch_size)):
        width = max(len(encoded[i].input_ids) for i in batch)
        ids, labels, mask = [], [], []
        for i in batch:
            enc = encoded[i]
            padding = width - len(enc.input_ids)
            ids.append(enc.input_ids + [pad] * padding)
            labels.append(enc.labels + [-100] * padding)
            mask.append([1] * len(enc.input_ids) + [0] * padding)
        input_ids = torch.tensor(ids, dtype=torch.long, device=lm.device)
        label_t = torch.tensor(labels, dtype=torch.long, device=lm.device)
        attention_mask = torch.tensor(mask, dtype=torch.long, device=lm.device)
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            shifted = label_t[:, 1:]
            nll = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=-100, reduction="none"
            )
            sums = nll.sum(dim=1).tolist()
            counts = (shifted != -100).sum(dim=1).tolist()
        for row, i in enumerate(batch):
            out[i] = (float(sums[row]), int(counts[row]))
        if progress is not None:
            progress(len(batch))
    return out
