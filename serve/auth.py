"""API keys: Bearer tokens from the environment or a key file, as records with scopes.

A key is stored only as its SHA-256 digest and a display name; the secret is never kept, logged
or echoed. Checking compares the digest against every key with `hmac.compare_digest` and no
early exit, so timing reveals neither which key nor how much of one matched.

Key file: one key per line, `#` comments, optional attributes after the key:

    sk-live-abc123                                   full access
    wk-public-xyz name=widget scopes=chat models=ft:tiny:faq:ftjob-1 rate=30/min

`scopes` (comma-separated): chat, completions, models, fine-tune, metrics (read /metrics), or
`*` (default). `models`:
the served model names the key may use (default: all). `rate`: requests per minute (or `/s`,
`/h`) the key may make, as a token bucket with a burst of that many per minute.

A *widget key* is meant to sit in a public web page, where anyone can read it: give it only
`scopes=chat`, name its models and give it a rate. Such a key can chat with those models and
nothing else (listing models, completions, files and fine-tuning all answer 403).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ALL_SCOPES = frozenset({"chat", "completions", "models", "fine-tune", "metrics"})
_PER = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0}


@dataclass(frozen=True)
class ApiKey:
    name: str
    """Safe to log: the key's given name, or `key-<n>`."""
    digest: bytes
    scopes: frozenset[str] = ALL_SCOPES
    models: frozenset[str] | None = None
    """Served model names this key may use; None: every model."""
    rate_per_s: float | None = None
    """Requests per second this key may make on average; None: unlimited."""

    def allows(self, scope: str) -> bool:
        return scope in self.scopes

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models


# The caller when no keys are configured (an open server).
ANONYMOUS = ApiKey(name="anonymous", digest=b"")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class KeyFileError(ValueError):
    """A key file line can't be parsed; the message names the line, never the key."""


def parse_key_line(line: str, default_name: str) -> ApiKey | None:
    text = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
    if not text:
        return None
    secret, *attrs = text.split()
    name, scopes, models, rate = default_name, ALL_SCOPES, None, None
    for attr in attrs:
        key, sep, value = attr.partition("=")
        if not sep:
            raise KeyFileError(f"expected name=VALUE after the key, got {key!r}")
        items = frozenset(v for v in value.split(",") if v)
        if key == "name":
            name = value
        elif key == "scopes":
            unknown = items - ALL_SCOPES - {"*"}
            if unknown:
                raise KeyFileError(
                    f"unknown scope(s) {sorted(unknown)}; known: {sorted(ALL_SCOPES)}"
                )
            scopes = ALL_SCOPES if "*" in items else items
        elif key == "models":
            models = items
        elif key == "rate":
            rate = parse_rate(value)
        else:
            raise KeyFileError(f"unknown attribute {key!r} (name, scopes, models, rate)")
    return ApiKey(name=name, digest=_digest(secret), scopes=scopes, models=models, rate_per_s=rate)


def parse_rate(value: str) -> float:
    """`30/min` -> 0.5 requests per second."""
    count, _, per = value.partition("/")
    try:
        n = float(count)
        seconds = _PER[per or "min"]
    except (ValueError, KeyError):
        raise KeyFileError(f"rate must look like 30/min (or /s, /h), got {value!r}") from None
    if n <= 0:
        raise KeyFileError(f"rate must be positive, got {value!r}")
    return n / seconds


class RateLimiter:
    """Token buckets per key: a key may burst up to one minute's worth, then its rate."""

    def __init__(self) -> None:
        self._buckets: dict[bytes, tuple[float, float]] = {}

    def acquire(self, key: ApiKey, now: float) -> float:
        """0 if the request may go now, else the seconds until it may."""
        if key.rate_per_s is None:
            return 0.0
        capacity = max(1.0, key.rate_per_s * 60)
        tokens, last = self._buckets.get(key.digest, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * key.rate_per_s)
        if tokens < 1:
            self._buckets[key.digest] = (tokens, now)
            return (1 - tokens) / key.rate_per_s
        self._buckets[key.digest] = (tokens - 1, now)
        return 0.0


class KeyStore:
    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._keys = tuple(keys)

    @property
    def open(self) -> bool:
        """No keys configured: every request is let in (the server warns at start)."""
        return not self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, token: str) -> ApiKey | None:
        digest = _digest(token)
        found = None
        for key in self._keys:  # no break: constant work whatever matches
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    @classmethod
    def load(cls, secrets: Iterable[str] = (), key_file: Path | None = None) -> KeyStore:
        keys = [ApiKey(name=f"key-{i + 1}", digest=_digest(s)) for i, s in enumerate(secrets) if s]
        if key_file is not None:
            try:
                lines = Path(key_file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise KeyFileError(f"can't read API key file {key_file}: {exc.strerror}") from None
            for lineno, line in enumerate(lines, 1):
                try:
                    key = parse_key_line(line, default_name=f"{Path(key_file).name}:{lineno}")
                except KeyFileError as exc:
                    raise KeyFileError(f"{key_file}:{lineno}: {exc}") from None
                if key is not None:
                    keys.append(key)
        return cls(keys)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
