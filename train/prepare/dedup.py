"""Exact and near-duplicate detection over conversations, in linear time.

Near-duplicates use MinHash over character n-grams (language-agnostic: it works on Chinese
without word segmentation) with LSH banding. Everything is vectorised with numpy over the whole
corpus at once, and hashes are computed from code points rather than Python's salted `hash()`,
so results are identical from run to run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)


def conversation_key(messages: list[dict], tools: list | None = None) -> str:
    """A string that is equal for two conversations exactly when they render the same."""
    parts = []
    for m in messages:
        parts.append(f"{m.get('role')}\x1e{m.get('content')}\x1e{m.get('weight', 1)}")
        if m.get("tool_calls"):
            parts.append(json.dumps(m["tool_calls"], ensure_ascii=False, sort_keys=True))
    if tools:
        parts.append(json.dumps(tools, ensure_ascii=False, sort_keys=True))
    return "\x1f".join(parts)


def prompt_key(messages: list[dict]) -> str:
    """Everything before the final assistant turn: two records with the same prompt key and
    different answers are conflicting examples."""
    last = len(messages) - 1
    while last >= 0 and messages[last].get("role") != "assistant":
        last -= 1
    context = messages[:last] if last >= 0 else messages
    return "\x1f".join(f"{m.get('role')}\x1e{m.get('content')}" for m in context)


def dedup_text(messages: list[dict], roles: tuple[str, ...] = ("user", "assistant")) -> str:
    """The text that near-duplicate detection compares: the turns of these roles, lowercased,
    whitespace removed (so spacing differences don't hide a duplicate)."""
    parts = [m.get("content") or "" for m in messages if m.get("role") in roles]
    return "".join("".join(parts).lower().split())


def near_duplicate_examples(
    conversations: Sequence[list[dict]], threshold: float = 0.8, question_margin: float = 0.2
) -> np.ndarray:
    """Cluster id per conversation (the smallest member index). Near-duplicates are at least
    `threshold` similar as a whole (user and assistant turns) *and* their questions (user
    turns) are at least `threshold - question_margin` similar.

    The whole text alone lets a long shared answer dominate: every phrasing of one FAQ answer
    ("how is the management fee charged", "what does the management fee cost") then looks
    like a duplicate, whole intents are forced into one split, and a held-out test asks
    questions whose answers training never showed. Different questions with the same answer
    are what a held-out split should test. The looser bar on the questions keeps real
    near-duplicates together (a word or punctuation changed in a long question is ~0.86
    similar), while distinct phrasings score far lower (~0.1-0.3).
    """
    whole = near_duplicate_clusters([dedup_text(m) for m in conversations], threshold=threshold)
    questions = near_duplicate_clusters(
        [dedup_text(m, ("user",)) for m in conversations],
        threshold=max(0.0, threshold - question_margin),
    )
    first: dict[tuple[int, int], int] = {}
    out = np.empty(len(conversations), dtype=np.int64)
    for k, key in enumerate(zip(whole.tolist(), questions.tolist(), strict=True)):
        out[k] = first.setdefault(key, k)
    return out


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller index stays root, so cluster ids are deterministic.
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


def _shingle_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every character n-gram of every text, concatenated, plus each text's offset.

    A text shorter than n contributes one shingle (itself). Hashing is a polynomial over
    code points, computed for the whole corpus in a few array operations.
    """
    joined = "".join(texts)
    codes = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    counts = np.maximum(lengths - n + 1, 1)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    # Position of each shingle's first character in `codes`.
    local = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], counts)
    first = np.repeat(starts[:-1], counts) + local
    own_len = np.repeat(lengths, counts)
    h = np.zeros(offsets[-1], dtype=np.uint64)
    base = np.uint64(1_000_003)
    padded = np.concatenate([codes, np.zeros(n, dtype=np.uint64)])
    for k in range(n):
        # Characters past a short text's end are left out, not read from the next text.
        take = (local + k) < np.maximum(own_len, 1)
        h = h * base + np.where(take, padded[first + k] + np.uint64(1), np.uint64(0))
    return (h ^ (h >> np.uint64(29))) & _MASK32, offsets


def _chunks(texts: Sequence[str], max_chars: int) -> list[tuple[int, int]]:
    """Row ranges holding about `max_chars` characters each (bounds peak memory)."""
    ranges, lo, total = [], 0, 0
    for i, t in enumerate(texts):
        total += len(t) + 1
        if total >= max_chars:
            ranges.append((lo, i + 1))
            lo, total = i + 1, 0
    if lo < len(texts):
        ranges.append((lo, len(texts)))
    return ranges


def _mix32(h: np.ndarray) -> np.ndarray:
    """A 32-bit avalanche mix (murmur3's finaliser) of values below 2^32."""
    h = h & _MASK32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & _MASK32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & _MASK32
    h ^= h >> np.uint64(16)
    return h


def minhash_signatures(texts: Sequence[str], num_perm: int = 64, ngram: int = 3) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures over character n-grams.

    One-permutation hashing with densification (Shrivastava, 2017): each shingle is hashed
    once, its high bits pick one of `num_perm` bins and the rest is its value; a text's
    signature is the minimum per bin, and empty bins borrow from the next filled bin. That is
    O(shingles) rather than O(shingles x permutations), with the same similarity estimate.
    """
    if num_perm & (num_perm - 1):
        raise ValueError("num_perm must be a power of two")
    bits = num_perm.bit_length() - 1
    empty = np.uint32(0xFFFFFFFF)
    sig = np.full((len(texts), num_perm), empty, dtype=np.uint32)
    flat = sig.reshape(-1)
    for lo, hi in _chunks(texts, max_chars=2_000_000):
        hashes, offsets = _shingle_hashes(texts[lo:hi], ngram)
        h = _mix32(hashes)
        bins = (h >> np.uint64(32 - bits)).astype(np.int64)
        values = (h & np.uint64((1 << (32 - bits)) - 1)).astype(np.uint32)
        rows = np.repeat(np.arange(lo, hi, dtype=np.int64), np.diff(offsets))
        np.minimum.at(flat, rows * num_perm + bins, values)
    # Densify: an empty bin takes the value of the next filled bin to its right (cyclically),
    # tagged with the distance so borrowed values only match other borrowed-alike bins.
    filled = sig != empty
    if not filled.all():
        k = num_perm
        doubled = np.concatenate([sig, sig], axis=1)
        pos = np.where(np.concatenate([filled, filled], axis=1), np.arange(2 * k), 2 * k)
        nxt = np.minimum.accumulate(pos[:, ::-1], axis=1)[:, ::-1][:, :k]
        dist = (nxt - np.arange(k)).astype(np.uint32)
        borrowed = np.take_along_axis(doubled, nxt, axis=1) + dist * np.uint32(0x9E3779B1)
        sig = np.where(filled, sig, borrowed)
    return sig


def near_duplicate_clusters(
    texts: Sequence[str],
    threshold: float = 0.8,
    num_perm: int = 64,
    bands: int = 16,
    ngram: int = 3,
) -> np.ndarray:
    """Cluster id per text (the smallest member index); texts whose estimated Jaccard
    similarity is at least `threshold` share a cluster, transitively.

    LSH: the signature is cut into `bands` bands; texts that agree on a whole band become
    candidates, and candidates are confirmed on the full signature. With 16 bands of 4 rows a
    pair at Jaccard 0.8 is caught with probability above 0.999.
    """
    n = len(texts)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    sig = minhash_signatures(texts, num_perm=num_perm, ngram=ngram)
    rows = num_perm // bands
    uf = _UnionFind(n)
    for band in range(bands):
        # One uint64 per band (a polynomial of its values): collisions are harmless because
        # candidates are confirmed on the full signature below.
        keys = np.zeros(n, dtype=np.uint64)
        for col in range(band * rows, (band + 1) * rows):
            keys = keys * np.uint64(0x100000001B3) + sig[:, col].astype(np.uint64)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        same_as_prev = np.zeros(n, dtype=bool)
        same_as_prev[1:] = sorted_keys[1:] == sorted_keys[:-1]
        if not same_as_prev.any():
            continue
        # Each bucket's first member is its leader; compare every other member to it.
        group_start = np.maximum.accumulate(np.where(~same_as_prev, np.arange(n), 0))
        members = np.nonzero(same_as_prev)[0]
        leaders = order[group_start[members]]
        others = order[members]
        similarity = (sig[leaders] == sig[others]).mean(axis=1)
        for i, j in zip(
            leaders[similarity >= threshold], others[similarity >= threshold], strict=True
        ):
            uf.union(int(i), int(j))
    return np.fromiter((uf.find(i) for i in range(n)), dtype=np.int64, count=n)
