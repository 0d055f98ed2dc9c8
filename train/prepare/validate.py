"""Structural checks on canonical conversations. Each finding names the field it is about."""

from __future__ import annotations

import re

from .records import Problem, Record

PLACEHOLDER = re.compile(
    r"\{\{\s*[\w.\-]+\s*\}\}|\{\{\s*\}\}|<\s*PLACEHOLDER\s*>|\[\s*INSERT[^\]]*\]"
)


def _problem(record: Record, severity: str, code: str, message: str, field: str | None) -> Problem:
    return Problem(severity, code, message, record.file, record.line, field)


def check_record(record: Record) -> list[Problem]:
    """Errors make the record unusable; warnings are reported and the record kept."""
    out: list[Problem] = []
    msgs = record.messages
    if not msgs:
        return [
            _problem(record, "error", "no_messages", "the conversation has no messages", "messages")
        ]
    seen_user = False
    trained = 0
    open_calls = False
    for i, m in enumerate(msgs):
        role = m.get("role")
        content = m.get("content") or ""
        field = f"messages[{i}]"
        if role == "system":
            if i != 0:
                out.append(
                    _problem(
                        record,
                        "error",
                        "system_not_first",
                        "a system message may only come first",
                        f"{field}.role",
                    )
                )
            continue
        if role == "user":
            seen_user = True
            open_calls = False
            if not content.strip():
                out.append(
                    _problem(
                        record,
                        "error",
                        "empty_content",
                        "user message is empty",
                        f"{field}.content",
                    )
                )
        elif role == "assistant":
            if not seen_user:
                out.append(
                    _problem(
                        record,
                        "error",
                        "no_user_turn",
                        "assistant turn before any user turn: there is nothing for it to answer",
                        f"{field}.role",
                    )
                )
            if not content.strip() and not m.get("tool_calls"):
                out.append(
                    _problem(
                        record,
                        "error",
                        "empty_content",
                        "assistant message is empty",
                        f"{field}.content",
                    )
                )
            if m.get("weight", 1) != 0:
                trained += 1
            open_calls = bool(m.get("tool_calls"))
        elif role == "tool" and not open_calls:
            out.append(
                _problem(
                    record,
                    "error",
                    "orphan_tool_turn",
                    "tool result without a preceding assistant tool call",
                    f"{field}.role",
                )
            )
        if content and PLACEHOLDER.search(content):
            found = PLACEHOLDER.search(content).group()
            out.append(
                _problem(
                    record,
                    "warning",
                    "placeholder",
                    f"template placeholder {found} left in the text",
                    f"{field}.content",
                )
            )
    if not any(m.get("role") == "assistant" for m in msgs):
        out.append(
            _problem(
                record,
                "error",
                "no_assistant_turn",
                "no assistant turn: there is nothing to learn",
                "messages",
            )
        )
    elif trained == 0:
        out.append(
            _problem(
                record, "error", "nothing_trained", "every assistant turn has weight 0", "messages"
            )
        )
    elif msgs[-1].get("role") != "assistant":
        out.append(
            _problem(
                record,
                "error",
                "last_not_assistant",
                f"the conversation ends with a {msgs[-1].get('role')} turn, not an "
                "assistant answer",
                f"messages[{len(msgs) - 1}].role",
            )
        )
    return out
