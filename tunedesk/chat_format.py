"""The one place a conversation becomes tokens.

Training and serving both call this module, so what the model is trained on and what it is
served with are byte-for-byte the same rendering of the tokenizer's own chat template.

- `encode_conversation` renders a whole conversation and returns token ids plus a loss mask
  that is 1 exactly on the assistant turns' tokens, including their end-of-turn token (so the
  model learns to stop), and 0 on everything the model is only conditioned on.
- `render_prompt` / `encode_prompt` render the generation prompt a server feeds the model.

The assistant spans are found by rendering prefixes of the conversation (`messages[:i]` with
the generation prompt, and `messages[:i+1]` without) and diffing them, which works for any
template whose renderings of a conversation's prefixes are prefixes of each other (ChatML,
Llama 3, Mistral, ...). A template that breaks that property gets a clear error rather than a
silently wrong mask.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100

# A Qwen2.5-style ChatML template, written by hand: system first, then user/assistant/tool
# turns, with Qwen's tool-calling conventions (<tools>, <tool_call>, <tool_response>).
# No default system prompt is injected, so an empty system box means no system turn.
CHATML_TEMPLATE = (
    # No "-" whitespace control and no newline right after a block tag: transformers renders
    # with trim_blocks, so every newline here is written out explicitly and survives.
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' %}"
    "<|im_start|>user\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant\n"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls or [] %}"
    "{% if message.content or not loop.first %}{{ '\\n' }}{% endif %}"
    '<tool_call>{{ \'\\n\' }}{"name": "{{ call.function.name }}", "arguments": '
    "{% if call.function.arguments is string %}{{ call.function.arguments }}"
    "{% else %}{{ call.function.arguments | tojson }}{% endif %}"
    "}\n</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ message.content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif message.role == 'system' and not loop.first %}"
    "{{ raise_exception('a system message is only allowed first') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ChatFormatError(ValueError):
    """The conversation or the tokenizer's template can't be rendered as asked."""


class ToolsError(ChatFormatError):
    """A tools list that can't be rendered; `field` names the offending part (`tools[1].function.name`)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def normalize_tools(tools: list[Any], field: str = "tools") -> list[dict[str, Any]]:
    """OpenAI tool definitions in the one shape every renderer gives the template.

    vLLM renders a request's tools as its pydantic models dump them: `{"type": "function",
    "function": {"name", "description", "parameters"}}` with `null` for an absent description
    or parameters, `strict` only where it is set, and no other keys. Training data and the
    embedded engine's requests go through this too, so a tool renders into the same prompt
    text whichever of them it comes from. A bare function (`{"name", ...}`) is wrapped."""
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        at = f"{field}[{i}]"
        if not isinstance(tool, dict):
            raise ToolsError(f"{at} must be an object.", at)
        if "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}
        if tool.get("type", "function") != "function":
            raise ToolsError(
                f"{at}.type must be 'function'; got {tool.get('type')!r}.", f"{at}.type"
            )
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolsError(f"{at}.function must be an object.", f"{at}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ToolsError(
                f"{at}.function.name must be a non-empty string.", f"{at}.function.name"
            )
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolsError(
                f"{at}.function.description must be a string.", f"{at}.function.description"
            )
        parameters = fn.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ToolsError(
                f"{at}.function.parameters must be a JSON schema object.",
                f"{at}.function.parameters",
            )
        function: dict[str, Any] = {
            "name": name,
            "description": description,
            "parameters": parameters,
        }
        if fn.get("strict") is not None:
            function["strict"] = fn["strict"]
        out.append({"type": "function", "function": function})
    return out


@dataclass
class Encoded:
    """A rendered conversation: `input_ids` with a parallel 0/1 `loss_mask`."""

    input_ids: list[int]
    loss_mask: list[int]
    text: str

    @property
    def labels(self) -> list[int]:
        """Labels for a causal-LM loss: the token id where the mask is 1, else IGNORE_INDEX."""
        return [
            t if m else IGNORE_INDEX for t, m in zip(self.input_ids, self.loss_mask, strict=True)
        ]

    @property
    def n_loss_tokens(self) -> int:
        return sum(self.loss_mask)


def one_system_turn_first(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every system turn merged into one first turn (non-empty contents joined by a blank
    line), the rest in order: what vLLM does to a request with a `developer` turn once it is a
    system turn, and so what serving and `prepare` do to such a conversation too. A
    conversation with no system turn, or only a first one, comes back as it is."""
    systems = [i for i, m in enumerate(messages) if m["role"] == "system"]
    if systems in ([], [0]):
        return messages
    merged = "\n\n".join(messages[i]["content"] for i in systems if messages[i]["content"])
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": merged}, *rest]


def call_arguments(arguments: Any) -> dict[str, Any]:
    """A tool call's `arguments` as the template gets them: an object, parsed from the JSON
    text OpenAI's format carries. This is vLLM's rule (`_postprocess_messages`): empty, text
    that is not JSON, and JSON that is not an object all read as `{}`. Training and both
    engines render through it, so a call is written out as the template's `tojson` spells it
    whatever spacing the data came with: `{"city":"Paris"}` in training data is trained as
    `{"city": "Paris"}`, the text the model is prompted with and held to when served."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments:
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict):
        return call
    return {
        **call,
        "function": {**function, "arguments": call_arguments(function.get("arguments"))},
    }


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Drop keys the template never reads (weights, provenance) so they can't leak into a render.
    keep = ("role", "content", "tool_calls", "tool_call_id", "name")
    out = []
    for m in messages:
        message = {k: m[k] for k in keep if k in m}
        if message.get("tool_calls"):
            message["tool_calls"] = [_template_call(c) for c in message["tool_calls"]]
        out.append(message)
    return out


def _render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    options: PromptOptions | None = None,
) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatFormatError(
            "the tokenizer has no chat_template; pass a model with one (e.g. an -Instruct model) "
            "or set tokenizer.chat_template"
        )
    extra: dict[str, Any] = {}
    if options is not None:
        extra = dict(options.template_kwargs)
        if options.documents is not None:
            extra["documents"] = options.documents
        if options.continue_final_message:
            extra["continue_final_message"] = True
    try:
        return tokenizer.apply_chat_template(
            _template_messages(messages),
            tools=tools or None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    except ChatFormatError:
        raise
    except Exception as exc:  # jinja errors, raise_exception() in templates
        raise ChatFormatError(f"chat template failed to render: {exc}") from exc


@dataclass(frozen=True)
class PromptOptions:
    """How a served prompt is rendered beyond the conversation: vLLM's chat request options,
    so a client gets the same prompt from either engine. Training renders with none of them."""

    add_generation_prompt: bool = True
    """Open a new assistant turn after the conversation (what every trained answer follows)."""
    continue_final_message: bool = False
    """Leave the final (assistant) message open, so generation continues its text."""
    documents: list[dict[str, Any]] | None = None
    """Handed to the template as `documents` (for templates that render retrieved documents)."""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further template variables (the request's `chat_template_kwargs`), already filtered by
    `template_kwargs` to the ones the template reads."""


# Arguments of the renderer itself, which a request's template kwargs may not replace; the
# request's own fields set the rest of what the renderer passes.
_NOT_TEMPLATE_KWARGS = ("chat_template", "tokenize")
_RENDERER_VARIABLES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message"}
)


@functools.lru_cache(maxsize=16)
def template_variables(template: str) -> frozenset[str]:
    """The variables a chat template reads but does not set (jinja's undeclared variables)."""
    import jinja2
    import jinja2.ext
    import jinja2.meta
    import jinja2.sandbox

    class _Generation(jinja2.ext.Extension):
        # transformers' {% generation %} block (assistant masks); only parsed here.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_noop"), [], [], body).set_lineno(
                lineno
            )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateError:
        return frozenset()


def template_kwargs(tokenizer: Any, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A request's `chat_template_kwargs` as vLLM passes them on: only the variables the
    template reads (others are dropped, so `{"enable_thinking": false}` is harmless to a
    template without thinking), never `chat_template` or `tokenize` (an error)."""
    if not kwargs:
        return {}
    refused = [k for k in _NOT_TEMPLATE_KWARGS if k in kwargs]
    if refused:
        raise ChatFormatError(f"chat_template_kwargs may not set {', '.join(refused)}")
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return {}
    reads = template_variables(template) - _RENDERER_VARIABLES
    return {k: v for k, v in kwargs.items() if k in reads}


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The token that ends an assistant turn (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3)."""
    eos = getattr(tokenizer, "eos_token", None)
    return eos if isinstance(eos, str) and eos else None


def assistant_spans(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return (text, character spans of the trained assistant turns).

    A span starts after the assistant header (what `add_generation_prompt` adds) and ends just
    after the end-of-turn token; anything the template writes after that token (a newline) is
    not trained, because generation stops at the token and never produces it.
    Assistant turns with `weight: 0` are left out of the spans.
    """
    text = _render(tokenizer, messages, tools, add_generation_prompt=False)
    eot = end_of_turn_token(tokenizer)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or message.get("weight", 1) == 0:
            continue
        before = _render(tokenizer, messages[:i], tools, add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], tools, add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ChatFormatError(
                "the chat template does not render conversation prefixes as prefixes of each "
                f"other (at message {i}); its loss mask can't be derived safely"
            )
        start, end = len(before), len(through)
        if eot is not None:
            cut = text.rfind(eot, start, end)
            if cut != -1:
                end = cut + len(eot)
        spans.append((start, end))
    return text, spans


def encode_conversation(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    max_length: int | None = None,
) -> Encoded:
    """Tokenise a conversation with its loss mask (1 on trained assistant tokens).

    `max_length` truncates from the right; callers that must not lose answers should filter
    over-long examples beforehand (prepare reports them).
    """
    text, spans = assistant_spans(tokenizer, messages, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    mask = [0] * len(ids)
    span_i = 0
    for k, (start, end) in enumerate(enc["offset_mapping"]):
        while span_i < len(spans) and spans[span_i][1] <= start:
            span_i += 1
        if span_i == len(spans):
            break
        s, e = spans[span_i]
        if start >= s and end <= e and end > start:
            mask[k] = 1
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return Encoded(input_ids=ids, loss_mask=mask, text=text)


def render_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    options: PromptOptions | None = None,
) -> str:
    """The text a model is given to generate the next assistant turn (or, with
    `continue_final_message`, the rest of the final one)."""
    opts = options or PromptOptions()
    if opts.continue_final_message:
        if opts.add_generation_prompt:
            raise ChatFormatError(
                "continue_final_message and add_generation_prompt can't both be true"
            )
        if not messages or messages[-1].get("role") != "assistant":
            raise ChatFormatError(
                "continue_final_message needs the last message to be the assistant's"
            )
    return _render(tokenizer, messages, tools, opts.add_generation_prompt, opts)


def encode_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    options: PromptOptions | None = None,
) -> list[int]:
    """Token ids of `render_prompt`, tokenised exactly as training tokenises conversations."""
    text = render_prompt(tokenizer, messages, tools, options)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_messages(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of `messages` rendered as they stand (no generation prompt), tokenised as
    `encode_prompt` tokenises: e.g. a system turn alone, to find it at the head of a prompt."""
    text = _render(tokenizer, messages, tools, add_generation_prompt=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end generation: the end-of-turn token and eos (deduplicated, in that order)."""
    ids: list[int] = []
    eot = end_of_turn_token(tokenizer)
    for tok in (eot, getattr(tokenizer, "eos_token", None)):
        if tok:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0 and tid not in ids:
                ids.append(tid)
    return ids
