"""Training data: tokenise prepared splits and cut them into length-grouped, resumable batches.

- `tokenize_split` turns each `{"messages", "tools"}` line into input ids and labels with
  `tunedesk.chat_format.encode_conversation` (the same rendering the server uses), labels being
  -100 everywhere the loss mask is 0. Examples longer than `max_seq_len` are dropped and
  counted, never truncated: a truncated example would teach the model to stop mid-answer.
- `LengthGroupedBatcher` makes each epoch's batches a pure function of (seed, epoch): shuffle,
  sort by length inside mega-batches of ~50 batches, cut, shuffle the batch order. Similar
  lengths share a batch, so padding to the batch's own longest example wastes little, while
  the order stays random. Because nothing depends on state, resuming at (epoch, batch index)
  replays exactly the batches an uninterrupted run would have seen.
- `collate` pads one micro-batch; each row is one example, padding is masked out of attention
  and loss, so examples never attend to each other.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunedesk.chat_format import IGNORE_INDEX, ChatFormatError, encode_conversation


@dataclass
class Example:
    """One tokenised conversation."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class TokenizedSplit:
    """A tokenised split plus what was left out of it and why."""

    examples: list[Example]
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> count: too_long, no_trained_tokens, render_error."""
    total_lines: int = 0

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def n_loss_tokens(self) -> int:
        return sum(e.n_loss_tokens for e in self.examples)


class DataError(ValueError):
    """A split is missing, unreadable or has nothing to train on."""


def tokenize_split(path: str | Path, tokenizer: Any, max_seq_len: int) -> TokenizedSplit:
    """Tokenise a prepared JSONL split (`{"messages": [...], "tools"?: [...]}` per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found (run `tunedesk prepare` first or set the file)")
    out = TokenizedSplit(examples=[])
    dropped = {"too_long": 0, "no_trained_tokens": 0, "render_error": 0}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            out.total_lines += 1
            try:
                row = json.loads(line)
                enc = encode_conversation(tokenizer, row["messages"], row.get("tools"))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{lineno}: not a prepared chat record ({exc})") from None
            except ChatFormatError:
                dropped["render_error"] += 1
                continue
            if len(enc.input_ids) > max_seq_len:
                dropped["too_long"] += 1
                continue
            if enc.n_loss_tokens == 0:  # e.g. every assistant turn has weight 0
                dropped["no_trained_tokens"] += 1
                continue
            out.examples.append(Example(input_ids=enc.input_ids, labels=enc.labels))
    out.dropped = {k: v for k, v in dropped.items() if v}
    return out


class LengthGroupedBatcher:
    """Deterministic, resumable length-grouped batches of example indices.

    `batch_size` is the number of sequences per optimizer step. A final batch smaller than
    `min_batch_size` (processes x accumulation steps: each micro-step on each process needs at
    least one example) is dropped.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        mega_batch_mult: int = 50,
        min_batch_size: int = 1,
    ) -> None:
        if not lengths:
            raise DataError("no training examples left to batch")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega = batch_size * mega_batch_mult
        self.min_batch_size = min_batch_size
        n = len(self.lengths)
        full, rest = divmod(n, batch_size)
        # How many batches an epoch has is independent of the shuffle (only the last
        # mega-batch can end in a short batch), so the schedule can be sized up front.
        self._n_batches = full + (1 if rest >= min_batch_size else 0)
        if self._n_batches == 0:
            raise DataError(
                f"{n} training examples can't fill one batch of at least {min_batch_size}"
            )

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._n_batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch`, a pure function of (seed, epoch, lengths)."""
        # A string seed is hashed with SHA-512 by `random`: stable across runs and processes.
        rng = random.Random(f"tunedesk-batches:{self.seed}:{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), self.mega):
            mega = sorted(order[start : start + self.mega], key=lambda i: -self.lengths[i])
            batches.extend(
                mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)
            )
        batches = [b for b in batches if len(b) >= self.min_batch_size]
        rng.shuffle(batches)
        # The batch holding the longest example goes first, so an out-of-memory error shows up
        # in the first step rather than hours in.
        longest = max(range(len(batches)), key=lambda k: max(self.lengths[i] for i in batches[k]))
        batches.insert(0, batches.pop(longest))
        return batches

    def iter_from(self, epoch: int, batch_index: int) -> Iterator[tuple[int, int, list[int]]]:
        """Yield (epoch, batch index, batch) forever, starting at the given position."""
        while True:
            batches = self.epoch_batches(epoch)
            for k in range(batch_index, len(batches)):
                yield epoch, k, batches[k]
            epoch, batch_index = epoch + 1, 0


def split_micro_batches(batch: list[int], n_micro: int, rank: int, world: int) -> list[list[int]]:
    """This process's share of a step's batch, cut into `n_micro` accumulation micro-batches.

    The batch is sorted by length (longest first) inside a mega-batch, so consecutive slices
    have similar lengths; interleaving by rank keeps the processes' loads similar.
    """
    mine = batch[rank::world]
    size, rest = divmod(len(mine), n_micro)
    out, start = [], 0
    for m in range(n_micro):
        end = start + size + (1 if m < rest else 0)
        out.append(mine[start:end])
        start = end
    return [mb for mb in out if mb]


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: sorted by length so padding is minimal (order doesn't matter)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-pad a micro-batch to its own longest example.

    Returns input_ids, attention_mask (0 on padding) and labels (-100 on padding) as tensors.
    """
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
