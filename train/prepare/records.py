"""The canonical shapes every data-preparation step works on.

`Record` is one training conversation in OpenAI chat form, remembering where it came from;
`Problem` is one thing wrong with the input, located as precisely as the input allows.

A canonical message is ``{"role": "system" | "user" | "assistant" | "tool", "content": str}``
with optional keys: ``"weight"`` (0 or 1, assistant turns only, only when the source said so),
``"tool_calls"`` (assistant turns: ``[{"id", "type": "function", "function": {"name",
"arguments": <JSON text>}}]``) and ``"tool_call_id"`` / ``"name"`` (tool turns).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Problem:
    """One thing wrong with the input data."""

    severity: str  # "error" | "warning"
    code: str  # short machine key, e.g. "bad_json", "missing_field", "bad_role"
    message: str  # a human sentence that names the field
    file: str  # the path as given
    line: int | None = None  # 1-based line where the record starts
    field: str | None = None  # e.g. "messages[2].role"

    def location(self) -> str:
        """``file:line``, or just ``file`` when the problem concerns the whole file."""
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def __str__(self) -> str:
        return f"{self.location()}: {self.severity}: {self.message} [{self.code}]"


@dataclass
class Record:
    """One conversation in canonical OpenAI chat form."""

    messages: list[dict]
    file: str
    line: int  # 1-based line where the record starts in its file
    tools: list[dict] | None = None
    meta: dict = field(default_factory=dict)  # passthrough scalars from the source row

    def location(self) -> str:
        """``file:line``."""
        return f"{self.file}:{self.line}"
