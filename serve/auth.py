"""API keys: Bearer tokens from the environment or a key file, as records with scopes.

A key is stored only as its SHA-256 digest and a display name; the secret is never kept, logged
or echoed. Checking compares the digest against every key with `hmac.compare_digest` and no
early exit, so timing reveals neither which key nor how much of one matched.

Key file: one key per line, `#` comments, optional attributes after the key:

    sk-live-abc123                                   full access
    sk-widget-xyz name=widget scopes=chat models=ft:tiny:faq:ftjob-1

`scopes` (comma-separated): chat, completions, models, or `*` (default). `models`: the served
model names the key may use (default: all). A later widget key adds a rate limit the same way.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ALL_SCOPES = frozenset({"chat", "completions", "models"})


@dataclass(frozen=True)
class ApiKey:
    name: str
    """Safe to log: the key's given name, or `key-<n>`."""
    digest: bytes
    scopes: frozenset[str] = ALL_SCOPES
    models: frozenset[str] | None = None
    """Served model names this key may use; None: every model."""

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
    name, scopes, models = default_name, ALL_SCOPES, None
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
        else:
            raise KeyFileError(f"unknown attribute {key!r} (name, scopes, models)")
    return ApiKey(name=name, digest=_digest(secret), scopes=scopes, models=models)


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
