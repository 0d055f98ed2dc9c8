"""A request's structured-output fields -> the grammar its output is held to (grammar.py).

OpenAI's `response_format` (`json_object`, `json_schema`: what the openai SDK's
`chat.completions.parse` sends) and vLLM's `structured_outputs` extension (exactly one of
`json`, `regex`, `choice`, `grammar`, `json_object`), read as vLLM reads them. A malformed
constraint is a 400 naming the field, before anything is queued; one that only the model's
vocabulary can refuse (a special token it lacks) is a 400 from the engine.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tunedesk.serve.engines.local import grammar
from tunedesk.serve.errors import BadRequest
from tunedesk.serve.protocol import ChatCompletionRequest, CompletionRequest


def unsupported(param: str) -> BadRequest:
    """The 400 for a field this engine does not implement (vLLM or OpenAI do)."""
    return BadRequest(f"`{param}` is not supported by the transformers engine.", param=param)


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


def _grammar(kind: str, spec: Any, any_whitespace: bool, param: str) -> str:
    try:
        if kind == "json_object":
            return grammar.json_object_grammar(any_whitespace)
        if kind == "json":
            if not isinstance(spec, dict | str):
                raise grammar.GrammarError("the schema must be a JSON object.")
            return grammar.json_schema_grammar(spec, any_whitespace)
        if kind == "regex":
            if not isinstance(spec, str):
                raise grammar.GrammarError("the regex must be a string.")
            return grammar.regex_grammar(spec)
        if kind == "choice":
            if not isinstance(spec, list) or not all(isinstance(c, str) for c in spec):
                raise grammar.GrammarError("choice must be a list of strings.")
            return grammar.choice_grammar(spec)
        if not isinstance(spec, str):
            raise grammar.GrammarError("the grammar must be a string.")
        return grammar.lark_grammar(spec)
    except grammar.GrammarError as exc:
        raise BadRequest(f"Invalid {param}: {exc}", param=param) from None


def _from_response_format(fmt: dict[str, Any]) -> tuple[str, Any, str]:
    """OpenAI's `response_format` -> (kind, spec, the field a bad spec is reported on)."""
    fmt_type = fmt.get("type")
    if fmt_type == "json_object":
        return "json_object", None, "response_format"
    if fmt_type == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise BadRequest(
                "response_format of type json_schema needs json_schema.schema.",
                param="response_format.json_schema",
            )
        return "json", spec["schema"], "response_format.json_schema.schema"
    if fmt_type == "structural_tag":
        raise unsupported("response_format")
    raise BadRequest(
        f"response_format.type must be text, json_object or json_schema; got {fmt_type!r}.",
        param="response_format.type",
    )


def structured_output(
    body: ChatCompletionRequest | CompletionRequest, tokenizer: Any
) -> str | None:
    """The grammar a request constrains its output to; None for free text.

    The constraint comes from OpenAI's `response_format` or from vLLM's `structured_outputs`
    (exactly one of json, regex, choice, grammar, json_object). As in vLLM, the two combine
    when `structured_outputs` carries only options (`disable_any_whitespace`), so an SDK's
    `parse(response_format=Model)` can ask for compact JSON through `extra_body`."""
    fmt = body.response_format or {}
    options = (body.model_extra or {}).get("structured_outputs")
    if fmt.get("type", "text") == "text" and options is None:
        return None
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise BadRequest("structured_outputs must be an object.", param="structured_outputs")
    for option in ("structural_tag", "whitespace_pattern", "disable_additional_properties"):
        if options.get(option):
            raise unsupported(f"structured_outputs.{option}")
    kinds = [k for k in _CONSTRAINTS if options.get(k) not in (None, False)]
    if fmt.get("type", "text") != "text":
        if kinds:
            raise BadRequest(
                f"response_format and structured_outputs.{kinds[0]} are two constraints; send one.",
                param="structured_outputs",
            )
        kind, spec, param = _from_response_format(fmt)
    elif len(kinds) != 1:
        raise BadRequest(
            f"structured_outputs needs exactly one of {', '.join(_CONSTRAINTS)}; got "
            f"{', '.join(kinds) or 'none'}.",
            param="structured_outputs",
        )
    else:
        kind, spec, param = kinds[0], options[kinds[0]], f"structured_outputs.{kinds[0]}"
    if not grammar.supports(tokenizer):
        raise BadRequest(
            "Structured outputs need a fast (tokenizers) tokenizer; this model has a slow one.",
            param=param,
        )
    any_whitespace = not options.get("disable_any_whitespace", False)
    return _grammar(kind, spec, any_whitespace, param)


async def request_grammar(
    body: ChatCompletionRequest | CompletionRequest, tokenizer: Any
) -> str | None:
    """structured_output() off the event loop when the request has a constraint: a large
    schema takes llguidance a while to check, and every open stream's chunks would wait."""
    if body.response_format is None and (body.model_extra or {}).get("structured_outputs") is None:
        return None
    return await asyncio.to_thread(structured_output, body, tokenizer)
