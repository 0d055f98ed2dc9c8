"""Text cleaning that keeps Chinese text intact.

Plain NFKC would turn full-width Chinese punctuation (，！？：；（）) into ASCII and the ellipsis
(……) into dots, changing how answers read. We apply NFKC everywhere *except* on those
characters, so full-width letters and digits still become ASCII, compatibility forms fold,
and Chinese punctuation survives.
"""

from __future__ import annotations

import re
import unicodedata

from .records import Record

# Full-width punctuation blocks, the ellipsis, and full-width currency signs.
_PROTECTED = "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u2026\uffe0-\uffe6\ufe10-\ufe19"
_PROTECTED_SPLIT = re.compile(f"([{_PROTECTED}]+)")
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0\u3000\u2000-\u200a\u202f\u205f]+")
_TRAILING = re.compile(r" +\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def nfkc_keep_cjk_punct(text: str) -> str:
    """NFKC, except that full-width CJK punctuation and the ellipsis are left as they are."""
    if text.isascii() or unicodedata.is_normalized("NFKC", text):
        return text
    parts = _PROTECTED_SPLIT.split(text)
    # Odd indices are the captured protected runs.
    return "".join(p if i % 2 else unicodedata.normalize("NFKC", p) for i, p in enumerate(parts))


def normalize_text(text: str) -> str:
    """Unicode and whitespace normalisation for one message.

    Line breaks are kept (answers use them for lists); runs of spaces become one space, spaces
    at line ends go, three or more newlines become two, and the ends are stripped.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", text)
    text = nfkc_keep_cjk_punct(text)
    text = _SPACES.sub(" ", text)
    if " \n" in text:
        text = _TRAILING.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def normalize_record(record: Record) -> None:
    """Normalise every message's content in place."""
    for message in record.messages:
        content = message.get("content")
        if isinstance(content, str) and content:
            message["content"] = normalize_text(content)
