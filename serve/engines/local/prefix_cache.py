"""Keys and values of prompt prefixes seen before, kept so the next prompt that starts the same
way skips prefilling them: a widget's system prompt, the chat template's header, and each
conversation's earlier turns (the widget and the UI send the whole history every turn). A
finished answer's blocks are kept too (prompt and answer, as the next turn will send them).

Prompts are cut into blocks of `block_size` tokens. A block is known by its parent block and
its own tokens, so a prompt's cached prefix is found by walking its blocks from the start
until one is missing (exact: no hashes to collide). Only whole blocks are kept, and a prompt
always leaves at least one token to prefill (its last position's logits are the first token).

Blocks are evicted least recently used first, once their bytes pass the budget. A hit makes its
whole chain recent, the first block most recent of all: a chain loses its tail before its
head, and a block whose parent is gone is never matched again and ages out.

Blocks live in scopes (the server's is the API key's name): a chain starts at its scope's
root, so prompts share blocks only within a scope. A shared cache answers a hit faster than a
miss, and that timing would tell one tenant whether another sent a given prefix. Callers of
one key still share (a widget's visitors all use its key: that is what shares its system
prompt); a request's `cache_salt` narrows its scope further, at the cost of that sharing.

The cached keys carry their rotary position, so a block is only valid at the positions it was
computed at; every prompt's tokens sit at positions 0.. in the lean forward, so a prefix block
is always at the same positions wherever it is reused.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import torch


class Block:
    __slots__ = ("id", "key", "tokens", "kv", "nbytes")

    def __init__(self, id: int, key: tuple[int, tuple[int, ...]], kv: torch.Tensor) -> None:
        self.id = id
        self.key = key
        self.tokens = key[1]
        self.kv = kv
        """[layers, 2 (keys, values), kv_heads, block_size, head_dim]"""
        self.nbytes = kv.numel() * kv.element_size()


class PrefixCache:
    def __init__(self, budget_bytes: int, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.budget_bytes = budget_bytes
        self.block_size = block_size
        self.bytes = 0
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], Block] = OrderedDict()
        self._ids = itertools.count(1)
        self._roots: dict[str, int] = {}  # scope -> the (non-positive) id its chains start at

    def __len__(self) -> int:
        return len(self._blocks)

    def _root(self, scope: str) -> int:
        return self._roots.setdefault(scope, -len(self._roots))

    def match(self, prompt: Sequence[int], leave_last: bool = True, scope: str = "") -> list[Block]:
        """The cached blocks `prompt` starts with, leaving at least its last token uncached
        (a prompt to prefill needs its last position's logits; `leave_last=False` for tokens
        that are only being stored)."""
        bs = self.block_size
        usable = (len(prompt) - leave_last) // bs
        chain: list[Block] = []
        parent = self._root(scope)
        for i in range(usable):
            block = self._blocks.get((parent, tuple(prompt[i * bs : (i + 1) * bs])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        self._touch(chain)
        return chain

    def store(
        self, prompt: Sequence[int], prefix: list[Block], kv: torch.Tensor, scope: str = ""
    ) -> None:
        """Keep `prompt`'s whole blocks after `prefix` (the blocks it matched).

        `kv` holds the keys and values of the prompt's tokens from the end of `prefix` on
        ([layers, 2, kv_heads, tokens, head_dim]); a block already cached (another prompt of
        the same group stored it) is reused, not copied."""
        bs = self.block_size
        chain = list(prefix)
        parent = chain[-1].id if chain else self._root(scope)
        start = len(chain) * bs
        for i in range(len(chain), len(prompt) // bs):
            key = (parent, tuple(prompt[i * bs : (i + 1) * bs]))
            block = self._blocks.get(key)
            if block is None:
                offset = i * bs - start
                block = Block(next(self._ids), key, kv[:, :, :, offset : offset + bs].clone())
                self._blocks[key] = block
                self.bytes += block.nbytes
            chain.append(block)
            parent = block.id
        self._touch(chain)
        self._evict()

    def _touch(self, chain: list[Block]) -> None:
        for block in reversed(chain):  # the head ends up most recent: evicted last
            if block.key in self._blocks:
                self._blocks.move_to_end(block.key)

    def _evict(self) -> None:
        while self.bytes > self.budget_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.bytes -= block.nbytes

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0


def gather(chains: list[list[Block]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Equal-length chains -> per layer (keys, values), each [rows, kv_heads, P, head_dim]."""
    rows = torch.stack([torch.cat([b.kv for b in chain], dim=3) for chain in chains])
    return [(rows[:, layer, 0], rows[:, layer, 1]) for layer in range(rows.shape[1])]
