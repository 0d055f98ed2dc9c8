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

Blocks live in scopes (`CacheScope`): a chain starts at its API key's root, so prompts share
blocks only within a key. A shared cache answers a hit faster than a miss, and that timing
would tell one tenant whether another sent a given prefix. Callers of one key still share,
unless a request brings a salt (vLLM's `cache_salt`): its chain then branches off at its first
block, or, where the request says its system turn may be shared (`shared` tokens), at the
first block past that turn. A widget does the latter with a salt per visitor: every visitor
reuses the system prompt, which is in the page for anyone to read, and no visitor can time
another's conversation.

The cached keys carry their rotary position, so a block is only valid at the positions it was
computed at; every prompt's tokens sit at positions 0.. in the lean forward, so a prefix block
is always at the same positions wherever it is reused.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheScope:
    """Which cached blocks a prompt may use and which its own blocks join."""

    key: str = ""
    """The API key's name: chains start at the key's root (an open server's callers are one)."""
    salt: str | None = None
    """Branches the chain off, at the first block not wholly within `shared`: only prompts with
    the same key and salt share what follows."""
    shared: int = 0
    """Leading tokens still shared within the key despite the salt (a system turn whose text is
    public); whole blocks only."""

    def branch_at(self, block_size: int) -> int:
        """The index of the first salted block (-1: no salt)."""
        return -1 if self.salt is None else self.shared // block_size


Parent = Hashable
"""A block's id, or a chain's start: ("key", name) or ("salt", parent, salt). Made up where
needed, never stored apart from the blocks that use them: a salt per visitor costs nothing
once its blocks are evicted."""

NO_SCOPE = CacheScope()


class Block:
    __slots__ = ("id", "key", "tokens", "kv", "nbytes")

    def __init__(self, id: int, key: tuple[Parent, tuple[int, ...]], kv: torch.Tensor) -> None:
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
        self._blocks: OrderedDict[tuple[Parent, tuple[int, ...]], Block] = OrderedDict()
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._blocks)

    def match(
        self, prompt: Sequence[int], leave_last: bool = True, scope: CacheScope = NO_SCOPE
    ) -> list[Block]:
        """The cached blocks `prompt` starts with, leaving at least its last token uncached
        (a prompt to prefill needs its last position's logits; `leave_last=False` for tokens
        that are only being stored)."""
        bs = self.block_size
        usable = (len(prompt) - leave_last) // bs
        chain: list[Block] = []
        parent: Parent = ("key", scope.key)
        branch_at = scope.branch_at(bs)
        for i in range(usable):
            if i == branch_at:
                parent = ("salt", parent, scope.salt)
            block = self._blocks.get((parent, tuple(prompt[i * bs : (i + 1) * bs])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        self._touch(chain)
        return chain

    def store(
        self,
        prompt: Sequence[int],
        prefix: list[Block],
        kv: torch.Tensor,
        scope: CacheScope = NO_SCOPE,
    ) -> None:
        """Keep `prompt`'s whole blocks after `prefix` (the blocks it matched).

        `kv` holds the keys and values of the prompt's tokens from the end of `prefix` on
        ([layers, 2, kv_heads, tokens, head_dim]); a block already cached (another prompt of
        the same group stored it) is reused, not copied."""
        bs = self.block_size
        chain = list(prefix)
        parent: Parent = chain[-1].id if chain else ("key", scope.key)
        branch_at = scope.branch_at(bs)
        start = len(chain) * bs
        for i in range(len(chain), len(prompt) // bs):
            if i == branch_at:
                parent = ("salt", parent, scope.salt)
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
