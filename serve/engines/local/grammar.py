"""Structured outputs: a grammar masks each step's logits to the tokens that keep the output
valid, so a JSON schema, a regex or a list of choices is met by construction.

Through llguidance, one of vLLM's structured-outputs backends (`guidance`), read as vLLM
reads a request: JSON may carry whitespace between its tokens (vLLM's
`disable_any_whitespace=False`), `json_object` is the schema `{"type": "object"}`, a `choice`
is one of its strings verbatim. vLLM's default backend (`auto`) takes xgrammar where xgrammar
supports the constraint and guidance where it does not; both allow the same outputs for a
schema both support, so a request asks for the same thing on both engines, though a sampled
answer need not be token for token the same.

llguidance computes the mask lazily from an Earley parser over the tokenizer's byte trie:
there is no per-grammar compilation step, so building a matcher takes well under a
millisecond and needs no background compile queue (vLLM's xgrammar backend needs one).
Special tokens (the chat template's markers) are never allowed; the end-of-sequence tokens are
allowed exactly where the grammar may end.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch

log = logging.getLogger("tunedesk.serve")


class GrammarError(ValueError):
    """The constraint itself is malformed (bad regex, bad schema, bad grammar)."""


def _llguidance() -> Any:
    import llguidance

    return llguidance


def _checked(grammar: str) -> str:
    message = _llguidance().LLMatcher.validate_grammar(grammar, None)
    if message and not message.startswith("WARNING"):
        raise GrammarError(message.strip())
    return grammar


def json_schema_grammar(schema: dict[str, Any] | str, any_whitespace: bool = True) -> str:
    """`any_whitespace=False` is vLLM's `disable_any_whitespace`: compact JSON only."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        grammar = _llguidance().LLMatcher.grammar_from_json_schema(
            text, defaults={"whitespace_flexible": any_whitespace}
        )
    except ValueError as exc:
        raise GrammarError(str(exc)) from None
    return _checked(grammar)


def json_object_grammar(any_whitespace: bool = True) -> str:
    return json_schema_grammar({"type": "object"}, any_whitespace)


def regex_grammar(pattern: str) -> str:
    return _checked(_llguidance().LLMatcher.grammar_from_regex(pattern))


def choice_grammar(choices: list[str]) -> str:
    if not choices:
        raise GrammarError("choice needs at least one string.")
    return _checked(_llguidance().grammar_from("choice", json.dumps(choices)))


def lark_grammar(text: str) -> str:
    """A Lark grammar, or llama.cpp's GBNF (vLLM's `grammar` accepts EBNF in both forms)."""
    try:
        grammar = _llguidance().grammar_from("grammar", text)
    except ValueError as exc:
        raise GrammarError(str(exc)) from None
    return _checked(grammar)


def supports(tokenizer: Any) -> bool:
    """llguidance reads a fast (Rust `tokenizers`) tokenizer; a slow one has no byte trie."""
    return hasattr(tokenizer, "backend_tokenizer")


class GrammarMasks:
    """Engine side: one matcher per constrained sequence, and the batch's masks per step."""

    def __init__(self, tokenizer: Any, stop_ids: frozenset[int], vocab: int) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = sorted(stop_ids)
        self.vocab = vocab
        self._ll_tokenizer: Any = None
        self._unusable: str | None = None

    def prepare(self) -> None:
        """Build llguidance's view of the vocabulary (its byte trie) now, at engine start:
        ~1 s on a 150k vocabulary, which the first constrained request would otherwise spend
        with every running stream waiting. Never raises: a tokenizer llguidance can't read
        must not stop the model from serving free text; matcher() refuses with the reason."""
        if self._ll_tokenizer is not None or self._unusable is not None:
            return
        if not supports(self.tokenizer):
            self._unusable = "structured outputs need a fast (tokenizers) tokenizer"
            return
        started = time.perf_counter()
        try:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self.tokenizer, n_vocab=self.vocab, eos_token=self.stop_ids or None
            )
        except Exception as exc:
            log.warning("structured outputs are off for this model: %s", exc)
            self._unusable = f"structured outputs are off for this model's tokenizer: {exc}"
            return
        log.info("structured outputs ready in %.2f s", time.perf_counter() - started)

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher at the grammar's start. Raises GrammarError if it can't be built."""
        self.prepare()  # a no-op after engine start
        if self._unusable is not None:
            raise GrammarError(self._unusable)
        m = _llguidance().LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return m

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, Any]]) -> None:
        """Set to -inf, in place, every logit of `rows` ((row, matcher) pairs) that its
        grammar does not allow next. A stopped or failed matcher allows only the end tokens."""
        words = (self.vocab + 31) // 32
        bits = np.full((len(rows), words), -1, dtype=np.int32)
        for j, (_, m) in enumerate(rows):
            v = bits[j]
            m.unsafe_compute_mask_ptr(v.ctypes.data, v.nbytes)
        # Bits flipped first: unpacked, they are the banned tokens, as bools.
        banned = np.unpackbits((~bits).view(np.uint8), axis=1, bitorder="little")
        banned = banned[:, : self.vocab].view(np.bool_)
        index = [i for i, _ in rows]
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy's boolean assignment over a view: 47 us for 32 rows of 6,000 tokens,
            # against 394 for torch's gather, masked_fill and scatter back (one thread).
            values = logits.detach().numpy()
            if index == list(range(len(index))):
                values[: len(index), : self.vocab][banned] = -np.inf
            else:
                for j, i in enumerate(index):
                    values[i, : self.vocab][banned[j]] = -np.inf
            return
        rows_at = torch.tensor(index, device=logits.device)
        mask = torch.from_numpy(banned).to(logits.device)
        logits[rows_at, : self.vocab] = logits[rows_at, : self.vocab].masked_fill(
            mask, float("-inf")
        )
