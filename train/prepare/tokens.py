"""Token counts for a whole dataset, fast enough for hundreds of thousands of rows.

Message contents are tokenised in batches by the model's own tokenizer; the tokens the chat
template adds around them (role headers, end-of-turn tokens, tool blocks) are measured once
per conversation shape by rendering that shape with empty contents through the shared
chat-format module. For templates that tokenise contents independently of their
surroundings (ChatML, Llama 3) the sum is the exact rendered length; tests check this
against `encode_conversation`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from tunedesk.chat_format import ChatFormatError, assistant_spans, call_arguments

from .records import Record


def _content_text(message: dict) -> str:
    text = message.get("content") or ""
    for call in message.get("tool_calls") or []:
        fn = call.get("function", {})
        # The arguments as the template writes them; the shape's empty call already holds the
        # braces, so only what goes between them is counted here.
        arguments = json.dumps(call_arguments(fn.get("arguments")), ensure_ascii=False)
        text += f"{fn.get('name', '')}{arguments[1:-1]}"
    return text


class TokenCounter:
    """Counts (total tokens, trained tokens, longest answer) per record with a real tokenizer."""

    exact = True

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self._overhead: dict[str, tuple[int, int]] = {}

    def _encode_lengths(self, texts: list[str]) -> np.ndarray:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        out = np.zeros(len(texts), dtype=np.int64)
        step = 8192
        for lo in range(0, len(texts), step):
            batch = texts[lo : lo + step]
            if backend is not None:
                encs = backend.encode_batch_fast(batch, add_special_tokens=False)
                out[lo : lo + len(batch)] = [len(e.ids) for e in encs]
            else:
                ids = self.tokenizer(batch, add_special_tokens=False)["input_ids"]
                out[lo : lo + len(batch)] = [len(x) for x in ids]
        return out

    def _shape_overhead(self, record: Record) -> tuple[int, int]:
        """(template tokens, trained template tokens) of the record's shape with empty contents."""
        key = json.dumps(
            [
                [m.get("role"), bool(m.get("tool_calls")), m.get("weight", 1)]
                for m in record.messages
            ]
            + [record.tools],
            ensure_ascii=False,
        )
        if key not in self._overhead:
            skeleton = []
            for m in record.messages:
                s = {"role": m["role"], "content": "x"}
                if m.get("weight") is not None:
                    s["weight"] = m["weight"]
                if m.get("tool_calls"):
                    s["tool_calls"] = [
                        {"type": "function", "function": {"name": "", "arguments": ""}}
                        for _ in m["tool_calls"]
                    ]
                skeleton.append(s)
            try:
                text, spans = assistant_spans(self.tokenizer, skeleton, record.tools)
            except ChatFormatError:
                self._overhead[key] = (0, 0)
                return self._overhead[key]
            # "x" stands for each content; subtract one token per placeholder.
            n_x = len(skeleton)
            total = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) - n_x
            trained = sum(
                len(self.tokenizer(text[s:e], add_special_tokens=False)["input_ids"]) - 1
                for s, e in spans
            )
            self._overhead[key] = (max(total, 0), max(trained, 0))
        return self._overhead[key]

    def count(self, records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        texts: list[str] = []
        owners: list[int] = []
        trained: list[bool] = []
        for i, r in enumerate(records):
            for m in r.messages:
                texts.append(_content_text(m))
                owners.append(i)
                trained.append(m.get("role") == "assistant" and m.get("weight", 1) != 0)
        lengths = self._encode_lengths(texts)
        owners_a = np.asarray(owners, dtype=np.int64)
        trained_a = np.asarray(trained, dtype=bool)
        total = np.bincount(owners_a, weights=lengths, minlength=len(records)).astype(np.int64)
        loss = np.bincount(
            owners_a, weights=np.where(trained_a, lengths, 0), minlength=len(records)
        ).astype(np.int64)
        answer = np.zeros(len(records), dtype=np.int64)
        np.maximum.at(answer, owners_a, np.where(trained_a, lengths, 0))
        for i, r in enumerate(records):
            extra, extra_trained = self._shape_overhead(r)
            total[i] += extra
            loss[i] += extra_trained
        return total, loss, answer


class EstimatingCounter(TokenCounter):
    """Without a tokenizer: about one token per CJK character and one per four other chars."""

    exact = False

    def __init__(self) -> None:
        self.name = "estimate (no tokenizer: pass --base MODEL for real counts)"
        self._overhead = {}

    def _encode_lengths(self, texts: list[str]) -> np.ndarray:
        # Vectorised over the whole corpus: code points of all texts, wide ones counted per text.
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        if not len(texts):
            return lengths
        codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        starts = np.zeros(len(texts), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        wide_flags = np.append((codes > 0x2E80).astype(np.int64), 0)
        wide = np.add.reduceat(wide_flags, np.minimum(starts, len(codes)))
        wide[lengths == 0] = 0
        return wide + (lengths - wide + 3) // 4

    def _shape_overhead(self, record: Record) -> tuple[int, int]:
        return 4 * len(record.messages), sum(
            1 for m in record.messages if m.get("role") == "assistant" and m.get("weight", 1)
        )
