"""Token-by-token text: incremental detokenisation and stop strings.

A Chinese character is often split over two or three byte-level tokens; emitting text per token
naively would send U+FFFD halves. The detokenizer holds bytes back until they form whole
characters. The stop matcher holds back text that might be the start of a stop string, and cuts
the output before the stop string once it appears, so the client never sees it.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Text deltas for a growing list of generated ids (special tokens skipped)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        rust = getattr(tokenizer, "_tokenizer", None)
        self._stream = None
        try:
            from tokenizers import Tokenizer
            from tokenizers.decoders import DecodeStream

            if isinstance(rust, Tokenizer):
                self._rust = rust
                self._stream = DecodeStream(skip_special_tokens=True)
        except ImportError:  # very old tokenizers: the generic path below still works
            pass
        self._ids: list[int] = []
        self._emitted: list[str] = []
        # Generic path (any tokenizer): decode a short window and diff, as vLLM does.
        self._prefix = 0
        self._read = 0

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._stream is not None:
            out = self._stream.step(self._rust, token_id) or ""
        else:
            out = self._window_step()
        if out:
            self._emitted.append(out)
        return out

    def _window_step(self) -> str:
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """At the end: bytes still held back (a character cut off by the length limit, or
        bytes that never formed one) come out as the full decode has them (U+FFFD), so the
        text equals `tokenizer.decode(ids)`. One full decode per sequence, at its end only."""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        sent = "".join(self._emitted)
        tail = full[len(sent) :] if full.startswith(sent) else ""
        if tail:
            self._emitted.append(tail)
        return tail


class StopMatcher:
    """Feeds text through, withholding what could still become a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self._sent = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """The text that is now safe to send."""
        if self.stopped or not delta:
            return ""
        self.text += delta
        if not self.stops:
            out, self._sent = self.text[self._sent :], len(self.text)
            return out
        # Only a stop string overlapping the new text can be new: search from just before it.
        longest = max(len(s) for s in self.stops)
        start = max(0, len(self.text) - len(delta) - longest + 1)
        hits = [i for s in self.stops if (i := self.text.find(s, start)) != -1]
        if hits:
            cut = min(hits)
            self.stopped = True
            self.text = self.text[:cut]
            out = self.text[self._sent :] if cut > self._sent else ""
            self._sent = len(self.text)
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = len(self.text) - hold
        out = self.text[self._sent : safe] if safe > self._sent else ""
        self._sent = max(self._sent, safe)
        return out

    def flush(self) -> str:
        """At the end (eos or length) held-back text was not a stop string after all."""
        out, self._sent = self.text[self._sent :], len(self.text)
        return out
