"""A batch's key/value cache, left-padded so every row ends at the same column.

Each decode step appends one column for every row at once (one batched forward). Rows of
different lengths sit right-aligned, with padding on the left that the attention mask hides.
New rows join by padding the shorter side on the left; finished rows leave by index selection,
and columns that became padding for every remaining row are trimmed off the left.

Works on transformers' `DynamicCache` with full-attention layers (Qwen2, Llama, Mistral without
sliding window): sliding-window or hybrid caches keep a rolling window that can't be re-aligned
this way, and such models are refused at load.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def check_supported(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"the transformers engine batches full-attention caches only; this model uses "
                f"{type(layer).__name__} (serve it with --engine vllm)"
            )


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchCache:
    """The running batch's cache and its [B, T] attention mask (1 = real token)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def append(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add rows (a freshly prefilled group) below the current ones."""
        if self.cache is None or self.mask is None or self.rows == 0:
            self.cache, self.mask = cache, mask
            return
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        width = max(t_old, t_new)
        self.mask = torch.cat(
            [_pad_left(self.mask, width - t_old, 1), _pad_left(mask, width - t_new, 1)], dim=0
        )
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat(
                [_pad_left(old.keys, width - t_old, 2), _pad_left(new.keys, width - t_new, 2)]
            )
            old.values = torch.cat(
                [_pad_left(old.values, width - t_old, 2), _pad_left(new.values, width - t_new, 2)]
            )

    def grow_mask(self) -> torch.Tensor:
        """The mask for a decode step: one more real column for every row."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        return self.mask

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order); trim all-padding columns on the left."""
        if self.cache is None or self.mask is None:
            return
        if not indices:
            self.cache, self.mask = None, None
            return
        if len(indices) != self.rows:
            idx = torch.tensor(indices, device=self.mask.device)
            self.mask = self.mask.index_select(0, idx)
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, idx)
                layer.values = layer.values.index_select(0, idx)
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.mask.shape[1]
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def reset(self) -> None:
        self.cache, self.mask = None, None
