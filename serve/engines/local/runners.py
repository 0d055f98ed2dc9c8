"""The model-facing half of the batcher: run a prefill or a decode step, keep the batch's cache.

Two runners behind one small interface:
- `LeanRunner`: fastpath.LeanDecoder over a slab.SlabCache, for the Llama-family models it
  reproduces exactly (the common case, and several times less Python per step).
- `TransformersRunner`: the model's own forward over a left-padded DynamicCache (kv.py), for
  every other full-attention model.

Rows are appended by `prefill` and dropped by `remove`, which returns the surviving rows' old
indices in their new order (the lean cache fills holes by moving the last rows).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from tunedesk.serve.engines.local.fastpath import LeanDecoder, unsupported_reason
from tunedesk.serve.engines.local.kv import BatchCache, check_supported

log = logging.getLogger("tunedesk.serve")


class Runner(Protocol):
    name: str

    @property
    def rows(self) -> int: ...

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Left-padded prompts [n, W] -> next-token logits [n, V]; their rows join the batch."""

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row [B, 1] -> next-token logits [B, V]."""

    def remove(self, dead: list[int]) -> list[int]:
        """Drop rows; the survivors' old indices in their new order."""

    def reset(self) -> None: ...


class LeanRunner:
    name = "lean"

    def __init__(self, decoder: LeanDecoder, device: torch.device) -> None:
        self.decoder = decoder
        self.slab = decoder.new_slab(device)

    @property
    def rows(self) -> int:
        return self.slab.rows

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        logits, cache = self.decoder.prefill(ids, positions, mask)
        self.slab.join(cache, mask)
        return logits

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(ids, positions, self.slab)

    def remove(self, dead: list[int]) -> list[int]:
        return self.slab.remove(dead)

    def reset(self) -> None:
        self.slab.reset()


class TransformersRunner:
    name = "transformers"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache = BatchCache()

    @property
    def rows(self) -> int:
        return self.cache.rows

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        check_supported(cache)
        self.cache.append(cache, mask)
        return out.logits[:, -1, :]

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=self.cache.grow_mask(),
            position_ids=positions,
            past_key_values=self.cache.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def remove(self, dead: list[int]) -> list[int]:
        dead_set = set(dead)
        keep = [i for i in range(self.rows) if i not in dead_set]
        self.cache.keep(keep)
        return keep

    def reset(self) -> None:
        self.cache.reset()


def make_runner(model: Any, lean: bool = True) -> Runner:
    """The lean runner where it reproduces the model exactly, else the transformers one."""
    if lean:
        reason = unsupported_reason(model)
        if reason is None:
            return LeanRunner(LeanDecoder(model), model.device)
        log.info("serving %s with the transformers forward: %s", model.config.model_type, reason)
    return TransformersRunner(model)
