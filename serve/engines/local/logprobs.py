"""Log probabilities of sampled tokens (`logprobs`, `top_logprobs`), on the worker side.

They come from the model's own distribution, before logit_bias, penalties, temperature and
top-k/top-p, as vLLM's default (`logprobs_mode="raw_logprobs"`) has them: a request means the
same on both engines, and a logprob says how likely the model found a token, whatever the
request did to pick it. One difference: the distribution is over the tokenizer's vocabulary,
without the embedding's padding rows past it, which this engine never samples.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class Candidate:
    token: str
    """The token's text (`tokenizer.decode([id])`, U+FFFD where it is part of a character)."""
    bytes: tuple[int, ...]
    """The token's own bytes: two tokens that each hold half of a Chinese character give the
    character's UTF-8 when their bytes are joined, which their texts can't."""
    logprob: float | None
    """None only for a prompt's first token, which nothing predicts."""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token (sampled, or of the prompt): its logprob and the `k` likeliest tokens at its
    position."""

    chosen: Candidate
    top: tuple[Candidate, ...] | None
    """None for a prompt's first token."""


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (bytes_to_unicode), inverted: which byte each char is."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece's byte tokens


class TokenTexts:
    """Each token id's text and bytes, worked out once per id."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        rust = getattr(tokenizer, "_tokenizer", None)
        decoder = getattr(rust, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._work_out(token_id)
        return hit

    def _work_out(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        text = self._tokenizer.decode([token_id])
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        raw: bytes | None = None
        if isinstance(piece, str):
            decoder = _byte_decoder()
            if self._byte_level and piece and all(c in decoder for c in piece):
                raw = bytes(decoder[c] for c in piece)
            elif m := _BYTE_FALLBACK.match(piece):
                raw = bytes([int(m.group(1), 16)])
        if raw is None or (raw.decode("utf-8", errors="replace") != text and "\ufffd" not in text):
            raw = text.encode("utf-8")  # special and added tokens: their text is their bytes
        return text, tuple(raw)


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], ks: list[int], texts: TokenTexts
) -> list[TokenLogprob]:
    """Row i of raw logits ([R, V]): token `tokens[i]`'s logprob and the top `ks[i]`.
    Batched: one log_softmax and one topk for the rows of a step, not one per row (per-row
    calls cost a fifth of a 32-row decode step on the tiny model)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(tokens, dtype=torch.long, device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, index).squeeze(1).tolist()
    width = min(max(ks, default=0), logprobs.shape[-1])
    ids: list[list[int]] = [[] for _ in tokens]
    values: list[list[float]] = [[] for _ in tokens]
    if width > 0:
        top_values, top_ids = torch.topk(logprobs, width)
        ids, values = top_ids.tolist(), top_values.tolist()

    def candidate(token_id: int, value: float) -> Candidate:
        text, raw = texts(token_id)
        return Candidate(text, raw, value)

    return [
        TokenLogprob(
            candidate(token, value),
            tuple(candidate(i, v) for i, v in zip(ids[row][:k], values[row][:k], strict=True)),
        )
        for row, (token, value, k) in enumerate(zip(tokens, chosen, ks, strict=True))
    ]


def prompt_logprobs(
    logits: torch.Tensor, prompt: list[int], k: int, texts: TokenTexts
) -> list[TokenLogprob]:
    """Every prompt token's logprob given the tokens before it, from the logits of a forward
    over the whole prompt ([S, V]); the first token has none (what `echo` with `logprobs`
    reports, and what evaluation harnesses score answers with)."""
    text, raw = texts(prompt[0])
    out = [TokenLogprob(Candidate(text, raw, None), None)]
    if len(prompt) > 1:
        out += token_logprobs(logits[: len(prompt) - 1], prompt[1:], [k] * (len(prompt) - 1), texts)
    return out
