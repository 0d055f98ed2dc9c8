"""Per-request facts gathered along the way and written out once by the access log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestContext:
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    key_name: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    """Prompt tokens the prefix cache supplied (transformers engine)."""
    first_token_at: float | None = None
    finish_reasons: list[str] | None = None
    error_code: str | None = None
    disconnected: bool = False
    content: dict[str, Any] | None = None
    """Messages and outputs, recorded only with --log-content."""

    def mark_first_token(self) -> float | None:
        """Record the first token's time; returns TTFT in seconds the first time only."""
        if self.first_token_at is not None:
            return None
        self.first_token_at = time.perf_counter()
        return self.first_token_at - self.started

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_at is None:
            return None
        return round((self.first_token_at - self.started) * 1000, 1)

    def add_tokens(self, prompt: int = 0, completion: int = 0) -> None:
        self.prompt_tokens = (self.prompt_tokens or 0) + prompt
        self.completion_tokens = (self.completion_tokens or 0) + completion
