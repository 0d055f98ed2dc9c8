"""Tool calling on the transformers engine, in the chat template's own format.

tunedesk's template (`chat_format.CHATML_TEMPLATE`, Qwen2.5's conventions) lists the tools in
the system turn and renders an assistant's calls as

    <tool_call>
    {"name": "lookup_order", "arguments": {"order_id": "A-17"}}
    </tool_call>

one block per call, separated by newlines. A model fine-tuned on tool conversations (prepare
reads them from OpenAI, sharegpt and alpaca-style data) answers in that format, so serving:

- renders the request's `tools` into the prompt as training rendered them;
- reads the calls back out of the answer (vLLM's `hermes` parser reads the same blocks, and
  `--engine vllm` starts vLLM with it), returning OpenAI's `tool_calls`, with the text before
  the first call as `content`; a block that is not valid JSON stays in the content, as in vLLM;
- holds `tool_choice: "required"` or a named function to that format by grammar
  (llguidance's Lark with the functions' parameter schemas embedded), so the call is valid
  JSON for the schema and is written exactly as the training data writes calls.

`finish_reason` is `tool_calls` when `auto` or `required` produced calls, and `stop` for a
named function, as OpenAI and vLLM report them.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from tunedesk.chat_format import ToolsError, normalize_tools
from tunedesk.serve.engines.local import grammar
from tunedesk.serve.errors import BadRequest
from tunedesk.serve.protocol import ChatCompletionRequest

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names

Mode = Literal["none", "auto", "required", "named"]


@dataclass
class ToolUse:
    """What a request asked of tools: the rendered list and how calls are read back."""

    tools: list[dict[str, Any]]
    mode: Mode
    name: str | None = None
    parallel: bool = True

    @property
    def parses(self) -> bool:
        return self.mode != "none"

    def finish_reason(self, reason: str, called: bool) -> str:
        if called and self.mode in ("auto", "required"):
            return "tool_calls"
        return reason


def tool_use(body: ChatCompletionRequest) -> ToolUse | None:
    """The request's tools and tool_choice, checked; None when it sends no tools."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise BadRequest(
                "tool_choice is only allowed when tools are specified.", param="tool_choice"
            )
        return None
    try:
        tools = normalize_tools(body.tools)
    except ToolsError as exc:
        raise BadRequest(str(exc), param=exc.field) from None
    names = [t["function"]["name"] for t in tools]
    for i, name in enumerate(names):
        if not _NAME.match(name):
            raise BadRequest(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'; got {name!r}.",
                param=f"tools[{i}].function.name",
            )
    parallel = body.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        return ToolUse(tools, "auto", parallel=parallel)
    if choice in ("none", "required"):
        return ToolUse(tools, choice, parallel=parallel)
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or named is None:
        raise BadRequest(
            "tool_choice must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    if named not in names:
        raise BadRequest(
            f"tool_choice names function {named!r}, which is not in tools.",
            param="tool_choice.function.name",
        )
    return ToolUse(tools, "named", name=named, parallel=False)


def call_grammar(use: ToolUse) -> str | None:
    """The Lark grammar `required` and named calls are held to; None for free text.

    Each call is the template's block around a JSON object whose `name` is one of the
    functions and whose `arguments` meet that function's parameter schema, written with the
    separators `tojson` gives the training data (`", "`, `": "`)."""
    if use.mode not in ("required", "named"):
        return None
    calls = []
    for tool in use.tools:
        fn = tool["function"]
        if use.mode == "named" and fn["name"] != use.name:
            continue
        calls.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": fn["name"]},
                    "arguments": fn["parameters"] or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {
        **schema,
        "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    }
    block = f'"{START}\\n" %json {json.dumps(schema)} "\\n{END}"'
    more = ' ("\\n" call)*' if use.parallel else ""
    try:
        return grammar.lark_grammar(f"start: call{more}\ncall: {block}\n")
    except grammar.GrammarError as exc:
        raise BadRequest(
            f"Invalid tools: a function's parameters are not a usable JSON schema: {exc}",
            param="tools",
        ) from None


def _call(raw: str) -> dict[str, Any] | None:
    try:
        call = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def parse_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """An answer -> (content before the first call, or None if empty; the calls).

    If any block fails to parse, nothing is a call and the whole text is content (vLLM's
    hermes parser does the same), so a model that writes broken JSON is still heard."""
    at = text.find(START)
    if at == -1:
        return text, []
    calls = [_call(a or b) for a, b in _BLOCK.findall(text[at:])]
    if not calls or any(c is None for c in calls):
        return text, []
    return text[:at] or None, calls  # type: ignore[return-value]


@dataclass
class ToolStream:
    """One choice's stream: content passes through until a call starts; the calls go out
    whole at the end of the answer (a later block that fails to parse turns every block back
    into content). What it sends adds up to what `parse_calls` gives for the whole text, so
    a stream reassembles to the non-streamed message."""

    text: str = ""
    sent: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, delta: str) -> str:
        """New text -> the content that can go out now (a possible start of a call is held
        back until it is one or isn't)."""
        self.text += delta
        at = self.text.find(START)
        if at != -1:
            return self._take(at)
        keep = 0
        for k in range(min(len(START) - 1, len(self.text)), 0, -1):
            if self.text.endswith(START[:k]):
                keep = k
                break
        return self._take(len(self.text) - keep)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end of the answer: (content still owed, the calls)."""
        content, calls = parse_calls(self.text)
        if calls:
            return "", calls
        return (content or "")[self.sent :], []

    def _take(self, upto: int) -> str:
        out = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out
