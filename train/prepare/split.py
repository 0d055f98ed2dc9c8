"""Deterministic, leak-free train/val/test splits over groups of records.

Records that must not be separated (near-duplicates, conflicting answers to one question,
rows sharing a `group` label such as one fund or one template family) are merged into one
group first; whole groups are then dealt to the splits so each split's row count tracks its
target ratio. The deal order is a keyed hash of each group's label, so the same input and seed
always give the same split, independent of file order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

SPLITS = ("train", "val", "test")


def _order_key(seed: int, label: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{label}".encode(), digest_size=8).digest()


def assign_splits(
    group_of: Sequence[int],
    group_labels: dict[int, str],
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> list[str]:
    """Split name per record. `group_of[i]` is record i's group id; `group_labels` gives each
    group a stable label (its deal order is derived from it)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError("ratios must be three non-negative numbers, e.g. 0.8,0.1,0.1")
    total_ratio = sum(ratios)
    ratios = [r / total_ratio for r in ratios]
    sizes: dict[int, int] = {}
    for g in group_of:
        sizes[g] = sizes.get(g, 0) + 1
    order = sorted(sizes, key=lambda g: (_order_key(seed, group_labels[g]), group_labels[g]))
    counts = [0, 0, 0]
    placed = 0
    split_of_group: dict[int, int] = {}
    for g in order:
        placed += sizes[g]
        # The split furthest below its target share once this group is placed.
        deficit = [ratios[k] * placed - counts[k] for k in range(3)]
        k = max(range(3), key=lambda j: (deficit[j], -j))
        split_of_group[g] = k
        counts[k] += sizes[g]
    return [SPLITS[split_of_group[g]] for g in group_of]
