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


def _protected_chars() -> list[str]:
    """Full-width punctuation blocks, the ellipsis, full-width currency signs, vertical forms."""
    chars = []
    for lo, hi in (
        (0xFF01, 0xFF0F),
        (0xFF1A, 0xFF20),
        (0xFF3B, 0xFF40),
        (0xFF5B, 0xFF65),
        (0x2026, 0x2026),
        (0xFFE0, 0xFFE6),
        (0xFE10, 0xFE19),
    ):
        chars.extend(chr(c) for c in range(lo, hi + 1))
    return chars


# Protected characters are swapped for private-use code points (which NFKC leaves alone)
# around the normalisation, with two C-speed str.translate calls.
_PRIVATE = 0xF0000
_HIDE = {ord(c): _PRIVATE + i for i, c in enumerate(_protected_chars())}
_SHOW = {v: k for k, v in _HIDE.items()}
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0\u3000\u2000-\u200a\u202f\u205f]+")
_TRAILING = re.compile(r" +\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def nfkc_keep_cjk_punct(text: str) -> str:
    """NFKC, except that full-width CJK punctuation and the ellipsis are left as they are."""
    if text.isascii():
        return text
    hidden = text.translate(_HIDE)
    if unicodedata.is_normalized("NFKC", hidden):
        return text
    return unicodedata.normalize("NFKC", hidden).translate(_SHOW)


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
