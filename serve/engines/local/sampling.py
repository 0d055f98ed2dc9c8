"""Per-sequence sampling over one batched logits tensor.

Every row has its own temperature, top_p, penalties and random generator, so sequences that
share a forward pass still sample independently and a `seed` reproduces a sequence whatever
else is in the batch. Temperature 0 is greedy (argmax), computed for the whole batch at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch


def row_argmax(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first one on ties, as torch's). On CPU through numpy: torch's
    CPU argmax took 290 us over a [32, 6016] batch against numpy's 12 (torch 2.13, one
    thread), and it runs once per decode step."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.detach().numpy().argmax(axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row is free of NaN and infinities. Through numpy on CPU for the same
    reason (516 us against 26 for torch.isfinite(...).all(-1) over [32, 6016])."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return np.isfinite(logits.detach().numpy()).all(axis=-1).tolist()
    return torch.isfinite(logits).all(dim=-1).tolist()


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little")
        gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        return gen


def _apply_penalties(
    logits: torch.Tensor, generated: list[int], frequency: float, presence: float
) -> torch.Tensor:
    # OpenAI's definition: logit -= count * frequency_penalty + (count > 0) * presence_penalty.
    if not generated:
        return logits
    counts = torch.bincount(
        torch.tensor(generated, device=logits.device), minlength=logits.shape[-1]
    )[: logits.shape[-1]].to(logits.dtype)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token once the mass before it already reaches top_p (the first is always kept).
    drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    generated: list[list[int]],
) -> list[int]:
    """One next token per row of `logits` ([B, V], float32)."""
    greedy = row_argmax(logits) if any(p.greedy for p in params) else []
    out: list[int] = []
    for i, p in enumerate(params):
        penalised = p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        if p.greedy and not penalised:
            out.append(greedy[i])
            continue
        row = logits[i]
        if penalised:
            row = _apply_penalties(row, generated[i], p.frequency_penalty, p.presence_penalty)
        if p.greedy:
            out.append(int(row.argmax()))
            continue
        row = row / p.temperature
        if p.top_p < 1.0:
            row = _top_p_filter(row, p.top_p)
        probs = torch.softmax(row, dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=generators[i])))
    return out
