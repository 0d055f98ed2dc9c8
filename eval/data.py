"""The test set: each record's final assistant turn is the reference, what precedes it the prompt.

Accepts what `tunedesk prepare` writes (`{"messages": [...], "meta": {...}}`) and, for
convenience, prompt/completion records (`{"prompt": str, "completion": str, ...}`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Generation:
    """One model's answer to one sample."""

    answer: str
    latency_s: float | None
    output_tokens: int | None
    finish_reason: str | None  # "stop", "length", or what an endpoint reports
    error: str | None = None


class DataError(ValueError):
    """The test file can't be used; the message names the file and line."""


@dataclass
class EvalSample:
    index: int
    prompt: list[dict[str, Any]]  # the conversation up to (not including) the reference turn
    reference: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """The last user message (what the report shows as the question)."""
        for message in reversed(self.prompt):
            if message.get("role") == "user":
                return _text(message.get("content"))
        return ""

    @property
    def topic(self) -> str | None:
        topic = self.meta.get("topic")
        return topic if isinstance(topic, str) else None


def _text(content: Any) -> str:
    """Message content as text (OpenAI content parts are joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return "" if content is None else str(content)


def _from_record(rec: Any, where: str, index: int) -> EvalSample:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object")
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    if "messages" in rec:
        messages = rec["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where}: `messages` must be a list of objects")
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise DataError(
                f"{where}: the last message must be the assistant's reference answer, after at "
                "least one user message"
            )
        prompt = [
            {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "name")}
            for m in messages[:-1]
        ]
        if not any(m.get("role") == "user" for m in prompt):
            raise DataError(f"{where}: no user message before the reference answer")
        reference = _text(messages[-1].get("content"))
    elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
        prompt = [{"role": "user", "content": rec["prompt"]}]
        reference = rec["completion"]
        meta = {k: rec[k] for k in ("group", "topic", "family", "phrasing") if k in rec} | meta
    else:
        raise DataError(f"{where}: expected `messages` (chat) or `prompt` + `completion`")
    if not reference.strip():
        raise DataError(f"{where}: the reference answer is empty")
    return EvalSample(index=index, prompt=prompt, reference=reference, meta=meta)


def load_test_set(path: str | Path, limit: int | None = None) -> list[EvalSample]:
    path = Path(path)
    try:
        # Not splitlines(): a JSON string may hold a raw U+2028, which it treats as a newline.
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise DataError(f"can't read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    samples: list[EvalSample] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if limit is not None and len(samples) >= limit:
            break
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        samples.append(_from_record(rec, where, len(samples)))
    if not samples:
        raise DataError(f"{path}: no test records")
    return samples
