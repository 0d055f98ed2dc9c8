"""Answer-quality metrics for Chinese (and mixed Chinese/English) answers. Pure functions.

Definitions (every score is in [0, 1] unless said otherwise):

- `normalize_answer`: Unicode NFKC (full-width letters, digits and most full-width punctuation
  become ASCII), lowercase, then every punctuation character (Unicode category P*, which covers
  CJK punctuation such as 。、《》“” and ASCII punctuation), every ASCII symbol
  (`string.punctuation`: + = $ ^ ...) and all whitespace removed; a decimal point between two
  digits is kept, so "1.5%" and "15%" stay different.
- `exact_match`: 1.0 when the normalised prediction equals the normalised reference, else 0.0.
- `char_tokens`: the CMRC-2018 segmentation: every CJK character is one token, each run of
  ASCII letters/digits (a decimal point between digits stays inside: "1.5") is one token,
  punctuation and whitespace are dropped; applied after NFKC + lowercase.
- `char_prf`: precision, recall and F1 of the multiset overlap of `char_tokens` (SQuAD-style
  bag-of-tokens F1 on CMRC tokens). Both empty -> 1.0; one empty -> 0.0.
- `rouge_l`: ROUGE-L F-measure (beta = 1) on the characters of `normalize_answer`:
  P = LCS / len(pred), R = LCS / len(ref), F = 2PR / (P + R). This is the order-aware
  counterpart of char F1 (CMRC-2018's official script scores F1 with this LCS).
- `length_ratio`: non-whitespace characters of the prediction / of the reference (1.0 is the
  reference's length; None when the reference is empty).
- BLEU-4 and chrF come from sacrebleu on its usual 0-100 scale: BLEU with `tokenize="zh"`
  (CJK characters split, other text 13a-tokenised), chrF with its defaults (character 6-grams,
  beta = 2). Corpus scores pool n-gram statistics over the set; sentence scores (BLEU with
  sacrebleu's default "exp" smoothing) are per sample and are averaged for the summary.
"""

from __future__ import annotations

import functools
import math
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

_ASCII_PUNCT = frozenset(string.punctuation)


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def is_cjk(ch: str) -> bool:
    """CJK ideographs (with extensions and compatibility blocks), kana and Hangul syllables."""
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF  # CJK Unified Ideographs
        or 0x3400 <= cp <= 0x4DBF  # Extension A
        or 0x20000 <= cp <= 0x2FA1F  # Extensions B-F, compatibility supplement
        or 0xF900 <= cp <= 0xFAFF  # Compatibility Ideographs
        or 0x3040 <= cp <= 0x30FF  # Hiragana, Katakana
        or 0xAC00 <= cp <= 0xD7AF  # Hangul syllables
        or cp == 0x3007  # 〇
    )


def normalize_answer(text: str) -> str:
    """NFKC, lowercase, punctuation (CJK and ASCII) and whitespace removed."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    kept = [
        ch
        for i, ch in enumerate(text)
        if not ch.isspace() and (not _is_punct(ch) or _decimal_point(text, i))
    ]
    return "".join(kept)


def _decimal_point(text: str, i: int) -> bool:
    """A "." between two digits is part of a number ("1.5%" must not equal "15%")."""
    return (
        text[i] == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()
    )


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def char_tokens(text: str) -> list[str]:
    """CMRC-2018 mixed segmentation: CJK characters, ASCII words/numbers; no punctuation."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    tokens: list[str] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            tokens.append("".join(buf))
            buf.clear()

    for i, ch in enumerate(text):
        if is_cjk(ch):
            flush()
            tokens.append(ch)
        elif ch.isalnum():
            buf.append(ch)
        elif buf and _decimal_point(text, i):
            buf.append(ch)  # a decimal point inside a number: "1.5" is one token
        else:
            flush()  # punctuation, symbols and whitespace separate tokens and are dropped
    flush()
    return tokens


def char_prf(pred: str, ref: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of the multiset overlap of `char_tokens`."""
    p_toks, r_toks = char_tokens(pred), char_tokens(ref)
    if not p_toks and not r_toks:
        return 1.0, 1.0, 1.0
    if not p_toks or not r_toks:
        return 0.0, 0.0, 0.0
    common = sum((Counter(p_toks) & Counter(r_toks)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision = common / len(p_toks)
    recall = common / len(r_toks)
    return precision, recall, 2 * precision * recall / (precision + recall)


def char_f1(pred: str, ref: str) -> float:
    return char_prf(pred, ref)[2]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence.

    Bit-parallel (Allison-Dix / Hyyrö): one big-integer bit per position of `b`, one pass over
    `a`, so long answers cost O(len(a)) integer operations instead of a len(a) x len(b) table.
    """
    if not a or not b:
        return 0
    match: dict[str, int] = {}
    for i, ch in enumerate(b):
        match[ch] = match.get(ch, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full
    for ch in a:
        u = v & match.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - bin(v).count("1")


def lcs_length_dp(a: Sequence[str], b: Sequence[str]) -> int:
    """The textbook dynamic programme (reference for tests)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 on the characters of the normalised strings."""
    p, r = normalize_answer(pred), normalize_answer(ref)
    if not p and not r:
        return 1.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _visible_len(text: str) -> int:
    return sum(1 for ch in text or "" if not ch.isspace())


def length_ratio(pred: str, ref: str) -> float | None:
    n_ref = _visible_len(ref)
    return _visible_len(pred) / n_ref if n_ref else None


@functools.cache
def _bleu(sentence: bool) -> Any:
    from sacrebleu.metrics import BLEU

    # Sentence BLEU as sacrebleu.sentence_bleu computes it (effective order, "exp" smoothing).
    return BLEU(tokenize="zh", effective_order=sentence)


@functools.cache
def _chrf() -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF()


def sentence_bleu(pred: str, ref: str) -> float:
    return float(_bleu(True).sentence_score(pred, [ref]).score)


def corpus_bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    return float(_bleu(False).corpus_score(list(preds), [list(refs)]).score)


def sentence_chrf(pred: str, ref: str) -> float:
    return float(_chrf().sentence_score(pred, [ref]).score)


def corpus_chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
    return float(_chrf().corpus_score(list(preds), [list(refs)]).score)


def sample_scores(pred: str, ref: str) -> dict[str, float | None]:
    """Every per-sample text metric of one answer against its reference."""
    p, r, f = char_prf(pred, ref)
    return {
        "em": exact_match(pred, ref),
        "char_f1": f,
        "char_precision": p,
        "char_recall": r,
        "rouge_l": rouge_l(pred, ref),
        "bleu": sentence_bleu(pred, ref),
        "chrf": sentence_chrf(pred, ref),
        "length_ratio": length_ratio(pred, ref),
    }


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]), as numpy's default."""
    xs = sorted(values)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
