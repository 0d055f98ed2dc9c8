"""Personal data in Chinese customer-service text: mobile numbers, resident ID numbers, bank
card numbers and e-mail addresses. Digit runs are confirmed by their checksums (ID: GB 11643
mod-11; bank cards: Luhn), so order numbers and amounts are not mistaken for PII."""

from __future__ import annotations

import re
from dataclasses import dataclass

PII_KINDS = ("email", "id_card", "bank_card", "mobile")
MASKS = {
    "email": "[邮箱]",
    "id_card": "[身份证号]",
    "bank_card": "[银行卡号]",
    "mobile": "[手机号]",
}

_PATTERN = re.compile(
    r"(?P<email>[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,})"
    r"|(?<![0-9A-Za-z])(?P<id_card>[1-9]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])"
    r"(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx])(?![0-9A-Za-z])"
    r"|(?<![0-9])(?P<digits>\d{4}(?:[ -]?\d{4}){2,3}(?:[ -]?\d{1,3})?|\d{11,19})(?![0-9])"
)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_MOBILE = re.compile(r"1[3-9]\d{9}")
# Cheap pre-check: every kind needs an "@" or a run of at least 11 digits (with separators).
_MAYBE = re.compile(r"@|\d{4}[ -]?\d{4}[ -]?\d{3}")


def id_card_valid(number: str) -> bool:
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == number[17].upper()


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@dataclass
class PiiHit:
    kind: str
    start: int
    end: int
    text: str


def _classify_digits(raw: str) -> str | None:
    digits = raw.replace(" ", "").replace("-", "")
    if len(digits) == 11 and _MOBILE.fullmatch(digits):
        return "mobile"
    if 16 <= len(digits) <= 19 and luhn_valid(digits):
        return "bank_card"
    return None


def find_pii(text: str) -> list[PiiHit]:
    """All PII spans in `text`, in order."""
    if not _MAYBE.search(text):
        return []
    hits: list[PiiHit] = []
    for m in _PATTERN.finditer(text):
        kind = m.lastgroup
        if kind == "id_card" and not id_card_valid(m.group()):
            # 18 digits that fail the ID checksum may still be a bank card.
            kind = _classify_digits(m.group())
        elif kind == "digits":
            kind = _classify_digits(m.group())
        if kind is not None:
            hits.append(PiiHit(kind, m.start(), m.end(), m.group()))
    return hits


def mask_pii(text: str, hits: list[PiiHit] | None = None) -> str:
    """Replace every PII span with a typed placeholder such as [手机号]."""
    hits = find_pii(text) if hits is None else hits
    for hit in reversed(hits):
        text = text[: hit.start] + MASKS[hit.kind] + text[hit.end :]
    return text
