"""The model-facing half of the batcher: run a prefill or a decode step, keep the batch's cache.

Two runners behind one small interface:
- `LeanRunner`: fastpath.LeanDecoder over a slab.SlabCache, for the Llama-family models it
  reproduces exactly (the common case, and several times less Python per step).
- `TransformersRunner`: the model's own forward over a left-padded DynamicCache (kv.py), for
  every other full-attention model.

Rows are appended by `prefill` and dropped by `remove`, which returns the surviving rows' old
indices in their new order (the lean cache fills holes by moving the last rows).

The lean runner may also keep a prefix cache (prefix_cache.py): the batcher matches each prompt
against it and hands `prefill` the rest of the prompts with their matched blocks; the runner
stores every prompt's new whole blocks after the forward.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from tunedesk.serve.engines.local.fastpath import LeanDecoder, unsupported_reason
from tunedesk.serve.engines.local.kv import BatchCache, check_supported
from tunedesk.serve.engines.local.prefix_cache import (
    NO_SCOPE,
    Block,
    CacheScope,
    PrefixCache,
    gather,
)

log = logging.getLogger("tunedesk.serve")


class Runner(Protocol):
    name: str
    prefix_cache: PrefixCache | None

    @property
    def rows(self) -> int: ...

    def prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        prefixes: list[list[Block]] | None = None,
        scopes: list[CacheScope] | None = None,
    ) -> torch.Tensor:
        """Left-padded prompts [n, W] -> next-token logits [n, V]; their rows join the batch.
        With `prefixes` (only where `prefix_cache` is set): each row's cached blocks, all of
        the same length P, and ids/mask/positions are the rest of the prompts. `scopes`: the
        prefix cache scope each row's blocks are stored under."""

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row [B, 1] -> next-token logits [B, V]."""

    def store_row(self, row: int, tokens: list[int], scope: CacheScope = NO_SCOPE) -> None:
        """Keep a finished row's blocks in the prefix cache (where there is one)."""

    def remove(self, dead: list[int]) -> list[int]:
        """Drop rows; the survivors' old indices in their new order."""

    def reset(self) -> None: ...


class LeanRunner:
    name = "lean"

    def __init__(
        self, decoder: LeanDecoder, device: torch.device, prefix_cache: PrefixCache | None = None
    ) -> None:
        self.decoder = decoder
        self.slab = decoder.new_slab(device)
        self.prefix_cache = prefix_cache

    @property
    def rows(self) -> int:
        return self.slab.rows

    def prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        prefixes: list[list[Block]] | None = None,
        scopes: list[CacheScope] | None = None,
    ) -> torch.Tensor:
        past = gather(prefixes) if prefixes and prefixes[0] else None
        logits, cache = self.decoder.prefill(ids, positions, mask, past)
        if past is not None:
            seen = mask.new_ones((mask.shape[0], past[0][0].shape[2]))
            self.slab.join(cache, torch.cat([seen, mask], dim=1))
        else:
            self.slab.join(cache, mask)
        if self.prefix_cache is not None:
            rows = ids.shape[0]
            self._store(ids, mask, cache, prefixes or [[]] * rows, scopes or [NO_SCOPE] * rows)
        return logits

    def store_row(self, row: int, tokens: list[int], scope: CacheScope = NO_SCOPE) -> None:
        """Keep the whole blocks of a finished row's tokens (its prompt and every generated
        token the model has read: all but the last), from the slab, before the row leaves."""
        pc = self.prefix_cache
        if pc is None:
            return
        bs, slab = pc.block_size, self.slab
        blocks = len(tokens) // bs
        chain = pc.match(tokens, leave_last=False, scope=scope)
        if len(chain) >= blocks:
            return
        # The row's real cells, in order, are its tokens (left padding and the padding a
        # cached prefix leaves are masked out).
        cols = slab.mask[row, slab.start : slab.end].nonzero().flatten() + slab.start
        if cols.numel() != len(tokens):
            return  # never expected; a wrong block would be worse than none
        cols = cols[len(chain) * bs : blocks * bs]
        kv = torch.stack(
            [torch.stack((k[row].index_select(1, cols), v[row].index_select(1, cols)))
             for k, v in zip(slab.keys, slab.values, strict=True)]
        )  # fmt: skip
        pc.store(tokens[: blocks * bs], chain, kv, scope)

    def _store(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        cache: Any,
        prefixes: list[list[Block]],
        scopes: list[CacheScope],
    ) -> None:
        pc = self.prefix_cache
        assert pc is not None
        width, bs = ids.shape[1], pc.block_size
        for row, (real, chain, scope) in enumerate(zip(mask.bool(), prefixes, scopes, strict=True)):
            rest = ids[row][real].tolist()
            cached = len(chain) * bs
            new_blocks = (cached + len(rest)) // bs - len(chain)
            if new_blocks <= 0:
                continue
            # The row's tokens after its prefix sit right-aligned after the prefix columns.
            start = cached + width - len(rest)
            end = start + new_blocks * bs
            kv = torch.stack(
                [torch.stack((kv.keys[row, :, start:end], kv.values[row, :, start:end]))
                 for kv in cache.layers]
            )  # fmt: skip
            prompt = [t for b in chain for t in b.tokens] + rest
            pc.store(prompt, chain, kv, scope)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(ids, positions, self.slab)

    def remove(self, dead: list[int]) -> list[int]:
        return self.slab.remove(dead)

    def reset(self) -> None:
        self.slab.reset()


class TransformersRunner:
    name = "transformers"

    prefix_cache = None  # its DynamicCache path has no prefill over cached keys

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache = BatchCache()

    @property
    def rows(self) -> int:
        return self.cache.rows

    def prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        prefixes: list[list[Block]] | None = None,
        scopes: list[CacheScope] | None = None,
    ) -> torch.Tensor:
        if prefixes and prefixes[0]:
            raise ValueError("the transformers runner keeps no prefix cache")
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

    def store_row(self, row: int, tokens: list[int], scope: CacheScope = NO_SCOPE) -> None:
        pass

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


def make_runner(model: Any, lean: bool = True, prefix_cache_bytes: int = 0) -> Runner:
    """The lean runner where it reproduces the model exactly, else the transformers one. A
    prefix cache (lean only) of up to `prefix_cache_bytes`, none at 0."""
    if lean:
        reason = unsupported_reason(model)
        if reason is None:
            cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
            return LeanRunner(LeanDecoder(model), model.device, cache)
        log.info("serving %s with the transformers forward: %s", model.config.model_type, reason)
    return TransformersRunner(model)
