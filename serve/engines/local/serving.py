"""OpenAI semantics on the local engine: a request becomes sequences in the model's batcher,
and their outputs become a JSON response or an SSE stream.

Chat prompts are rendered by `tunedesk.chat_format.encode_prompt`, the same code that renders
training data, so the served model sees exactly the format it was trained on; generation ends
on the format's `stop_token_ids`. Legacy completions feed the prompt text as the tokenizer
encodes raw text (OpenAI semantics: no chat template).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse
from starlette.responses import Response

from tunedesk.chat_format import (
    ChatFormatError,
    PromptOptions,
    encode_messages,
    encode_prompt,
    one_system_turn_first,
    template_kwargs,
)
from tunedesk.serve.context import RequestContext
from tunedesk.serve.engines.base import ApiCall
from tunedesk.serve.engines.local.batcher import SeqOutput
from tunedesk.serve.engines.local.formats import ChatFormat, Choices, CompletionFormat
from tunedesk.serve.engines.local.generation import Generation
from tunedesk.serve.engines.local.models import LoadedModel, LocalModels
from tunedesk.serve.engines.local.prefix_cache import CacheScope
from tunedesk.serve.engines.local.sampling import SamplingParams
from tunedesk.serve.engines.local.structured import request_grammar, unsupported
from tunedesk.serve.engines.local.tools import call_grammar, tool_use
from tunedesk.serve.errors import BadRequest, ContextLengthExceeded, EngineFailure, OpenAIError
from tunedesk.serve.metrics import Metrics
from tunedesk.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    PromptTokensDetails,
    ToolCall,
    Usage,
)
from tunedesk.serve.settings import ServeSettings
from tunedesk.serve.streaming import DONE, ManagedStreamingResponse, sse_error, unless_disconnected

log = logging.getLogger("tunedesk.serve")

Format = ChatFormat | CompletionFormat


# vLLM's request extensions that change what is generated, which this engine does not
# implement. Unknown fields are otherwise ignored, as vLLM ignores them; these would make an
# answer quietly differ from the one `--engine vllm` gives, so they are refused unless sent
# with a value that changes nothing.
_VLLM_ONLY = {
    "min_tokens": 0,
    "stop_token_ids": [],
    "bad_words": [],
    "allowed_token_ids": None,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "use_beam_search": False,
    "length_penalty": 1.0,
    "prompt_logprobs": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "logits_processors": None,
    "truncate_prompt_tokens": None,
    "chat_template": None,
    "return_token_ids": False,
    "return_tokens_as_token_ids": False,
    "echo": False,  # vLLM's chat `echo` (completions' own `echo` is a declared field)
}


def _refuse_vllm_only(body: ChatCompletionRequest | CompletionRequest) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in _VLLM_ONLY and value not in (None, _VLLM_ONLY[name], [], {}):
            raise BadRequest(
                f"`{name}` is a vLLM option the transformers engine does not implement "
                "(serve with --engine vllm for it).",
                param=name,
            )


MAX_LOGPROBS = 20
"""The most alternatives per token: OpenAI's bound for chat, vLLM's default --max-logprobs."""


def _logprobs_k(k: int, param: str) -> int:
    if k > MAX_LOGPROBS:
        raise BadRequest(
            f"{param} must be at most {MAX_LOGPROBS} on this server; got {k}.", param=param
        )
    return k


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float] | None:
    """OpenAI's `{"token id": bias}` -> ids, each checked against the model's vocabulary."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab:
            raise BadRequest(
                f"logit_bias key {key!r} is not a token id of this model (0 to {vocab - 1}).",
                param="logit_bias",
            )
        out[token] = value
    return out


def prompt_options(body: ChatCompletionRequest, tokenizer: Any) -> PromptOptions:
    """vLLM's chat rendering options from the request's extra fields, checked: which turn the
    prompt opens, `documents`, and `chat_template_kwargs` (with `reasoning_effort` handed to
    the template as vLLM hands it, and as `enable_thinking` unless the kwargs set that)."""
    extra = body.model_extra or {}
    flags = {}
    for name, default in (("add_generation_prompt", True), ("continue_final_message", False)):
        value = extra.get(name)
        if value is not None and not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false.", param=name)
        flags[name] = default if value is None else value
    if flags["continue_final_message"] and flags["add_generation_prompt"]:
        raise BadRequest(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to true.",
            param="continue_final_message",
        )
    if flags["continue_final_message"] and body.messages[-1].role != "assistant":
        raise BadRequest(
            "continue_final_message needs the last message to be the assistant's.",
            param="messages",
        )
    documents = extra.get("documents")
    if documents is not None and not (
        isinstance(documents, list) and all(isinstance(d, dict) for d in documents)
    ):
        raise BadRequest("documents must be a list of objects.", param="documents")
    kwargs = extra.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BadRequest("chat_template_kwargs must be an object.", param="chat_template_kwargs")
    effort = extra.get("reasoning_effort")
    if effort is not None:
        kwargs = {"enable_thinking": effort != "none", **kwargs, "reasoning_effort": effort}
    try:
        kwargs = template_kwargs(tokenizer, kwargs)
    except ChatFormatError as exc:
        raise BadRequest(str(exc), param="chat_template_kwargs") from None
    return PromptOptions(**flags, documents=documents, template_kwargs=kwargs)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> the plain role/content dicts the chat template renders."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise BadRequest(
                        f"Content parts of type `{part.type}` are not supported; send text.",
                        param=f"messages[{i}].content[{j}].type",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        # `developer` is OpenAI's newer name for the system turn.
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if m.role == "assistant" and m.tool_calls:
            message["tool_calls"] = [_history_call(c) for c in m.tool_calls]
        if m.role == "tool":
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    if any(m.role == "developer" for m in messages):
        out = one_system_turn_first(out)  # as vLLM renders such a request
    return out


def _history_call(call: ToolCall) -> dict[str, Any]:
    """An earlier turn's call as the template gets it; chat_format reads its arguments into
    an object, as vLLM hands them over, so both engines render the same `tojson` text."""
    function = {"name": call.function.name, "arguments": call.function.arguments}
    return {"id": call.id, "type": "function", "function": function}


def cache_scope(call: ApiCall[Any], shared: int = 0) -> CacheScope:
    """Who may share cached prefixes: callers of one API key (all of an open server's callers
    are one), narrowed by the request's `cache_salt` if it sends one, after its first `shared`
    tokens."""
    salt = getattr(call.body, "cache_salt", None)
    return CacheScope(key=call.ctx.key_name or "", salt=salt, shared=shared)


def system_turn_tokens(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    prompt: list[int],
    tools: list[dict[str, Any]] | None = None,
) -> int:
    """How many of `prompt`'s leading tokens are its system turn (0 without one, or where the
    system turn alone does not tokenise to a prefix of the whole prompt)."""
    if not messages or messages[0]["role"] != "system":
        return 0
    try:
        head = encode_messages(tokenizer, messages[:1], tools)
    except ChatFormatError:
        return 0
    return len(head) if prompt[: len(head)] == head else 0


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


class _Timing:
    """TTFT once per request; one per-output-token interval per generated token."""

    def __init__(self, metrics: Metrics, model: str, ctx: RequestContext, n: int) -> None:
        self.metrics, self.model, self.ctx = metrics, model, ctx
        self._last: list[float | None] = [None] * n
        # Labelled children looked up once, not per token.
        self._ttft = metrics.ttft.labels(model)
        self._tpot = metrics.tpot.labels(model)
        self._completion_tokens = metrics.completion_tokens.labels(model)

    def observe(self, outs: list[SeqOutput]) -> None:
        tokens = 0
        for out in outs:
            if not out.tokens:
                continue
            tokens += out.tokens
            if self.ctx.first_token_at is None:
                self.ctx.first_token_at = out.at
                self._ttft.observe(out.at - self.ctx.started)
            last = self._last[out.index]
            if last is not None:
                self._tpot.observe(out.at - last)
            self._last[out.index] = out.at
        if tokens:
            self._completion_tokens.inc(tokens)
            self.ctx.add_tokens(completion=tokens)


class LocalServing:
    def __init__(self, models: LocalModels, settings: ServeSettings, metrics: Metrics) -> None:
        self.models = models
        self.settings = settings
        self.metrics = metrics

    # --- limits --------------------------------------------------------------------------

    def _check_n(self, n: int) -> None:
        if n > self.settings.max_n:
            raise BadRequest(f"n must be at most {self.settings.max_n} on this server.", param="n")

    def _check_prompt(self, lm: LoadedModel, prompt_len: int, param: str) -> None:
        limit = min(self.settings.max_prompt_tokens or lm.context_len, lm.context_len - 1)
        if prompt_len > limit:
            raise ContextLengthExceeded(
                f"This model's maximum prompt length is {limit} tokens. However, your "
                f"{'messages' if param == 'messages' else 'prompt'} resulted in {prompt_len} "
                "tokens. Please reduce the length of the input.",
                param=param,
            )

    def _max_tokens(
        self, lm: LoadedModel, prompt_len: int, requested: int | None, param: str, what: str
    ) -> int:
        cap = self.settings.max_tokens_cap
        if requested is None:
            return max(1, min(cap, lm.context_len - prompt_len))
        if requested > cap:
            raise BadRequest(
                f"max_tokens is too large: {requested}. This server allows at most {cap} "
                "completion tokens.",
                param=param,
            )
        if prompt_len + requested > lm.context_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {lm.context_len} tokens. However, you "
                f"requested {prompt_len + requested} tokens ({prompt_len} in the {what}, "
                f"{requested} in the completion). Please reduce the length of the {what} or "
                "completion.",
                param=what,
            )
        return requested

    @staticmethod
    def _params(
        body: ChatCompletionRequest | CompletionRequest,
        max_tokens: int,
        i: int,
        logit_bias: dict[int, float] | None,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        constraint: str | None = None,
    ) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            # n choices from one seed must differ, and each must be reproducible on its own.
            seed=None if body.seed is None else body.seed + i,
            stop=_stops(body.stop),
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            ignore_eos=body.ignore_eos,
            top_k=max(0, body.top_k or 0),
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            logit_bias=logit_bias,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=constraint,
        )

    # --- chat ----------------------------------------------------------------------------

    async def chat(self, call: ApiCall[ChatCompletionRequest]) -> Response:
        body = call.body
        _refuse_vllm_only(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
        logprobs = _logprobs_k(body.top_logprobs or 0, "top_logprobs") if body.logprobs else None
        tools = tool_use(body)
        n = body.num_sequences()
        self._check_n(n)
        lm = await self.models.get(body.model)
        bias = _logit_bias(body.logit_bias, len(lm.tokenizer))
        constraint = await request_grammar(body, lm.tokenizer)
        if tools is not None and tools.mode in ("required", "named"):
            if constraint is not None:
                raise BadRequest(
                    "tool_choice and response_format (or structured_outputs) each constrain "
                    "the answer; send one.",
                    param="tool_choice",
                )
            constraint = await asyncio.to_thread(call_grammar, tools)
        messages = template_messages(body.messages)
        options = prompt_options(body, lm.tokenizer)
        try:
            prompt = encode_prompt(lm.tokenizer, messages, tools.tools if tools else None, options)
        except ChatFormatError as exc:
            raise BadRequest(str(exc), param="messages") from None
        self._check_prompt(lm, len(prompt), "messages")
        requested = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        max_tokens = self._max_tokens(lm, len(prompt), requested, param, "messages")
        jobs = [
            (prompt, self._params(body, max_tokens, i, bias, logprobs, constraint=constraint))
            for i in range(n)
        ]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        fmt = ChatFormat(
            body.model,
            include_usage,
            logprobs=logprobs is not None,
            tools=tools if tools is not None and tools.parses else None,
        )
        logged = {"messages": messages} if self.settings.log_content else None
        shared = 0
        if body.cache_salt and body.cache_share_system:
            shared = system_turn_tokens(
                lm.tokenizer, messages, prompt, tools.tools if tools else None
            )
        scope = cache_scope(call, shared)
        return await self._respond(
            call, lm, jobs, len(prompt), fmt, bool(body.stream), logged, scope
        )

    # --- completions ---------------------------------------------------------------------

    async def completion(self, call: ApiCall[CompletionRequest]) -> Response:
        body = call.body
        _refuse_vllm_only(body)
        logprobs = None if body.logprobs is None else _logprobs_k(body.logprobs, "logprobs")
        if body.suffix:
            raise unsupported("suffix")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise unsupported("best_of")
        n = body.n or 1
        self._check_n(n)
        prompts = body.prompts()
        if not prompts:
            raise BadRequest("prompt must not be empty.", param="prompt")
        lm = await self.models.get(body.model)
        bias = _logit_bias(body.logit_bias, len(lm.tokenizer))
        constraint = await request_grammar(body, lm.tokenizer)
        encoded: list[list[int]] = []
        echoed: list[str] = []
        for p in prompts:
            if isinstance(p, str):
                # The tokenizer's own raw-text encoding (a BOS where the model uses one), as
                # OpenAI and vLLM feed a completions prompt: no chat template.
                ids = lm.tokenizer(p)["input_ids"]
            else:
                ids = list(p)
                if any(not 0 <= t < len(lm.tokenizer) for t in ids):
                    raise BadRequest("prompt contains out-of-vocabulary token ids.", param="prompt")
            if body.echo:
                echoed.append(p if isinstance(p, str) else lm.tokenizer.decode(ids))
            if not ids:
                raise BadRequest("prompt must not be empty.", param="prompt")
            self._check_prompt(lm, len(ids), "prompt")
            encoded.append(ids)
        longest = max(len(ids) for ids in encoded)
        max_tokens = self._max_tokens(lm, longest, body.max_tokens, "max_tokens", "prompt")
        scored = logprobs if body.echo else None  # an echoed prompt comes with its logprobs
        jobs = [
            (ids, self._params(body, max_tokens, j, bias, logprobs, scored, constraint))
            for ids in encoded
            for j in range(n)
        ]  # choice index = prompt index * n + j, as OpenAI numbers them
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        fmt = CompletionFormat(
            body.model,
            include_usage,
            logprobs=logprobs is not None,
            echo=[text for text in echoed for _ in range(n)] if body.echo else None,
        )
        logged = {"prompt": prompts} if self.settings.log_content else None
        prompt_tokens = sum(len(ids) for ids in encoded)
        scope = cache_scope(call)
        return await self._respond(
            call, lm, jobs, prompt_tokens, fmt, bool(body.stream), logged, scope
        )

    # --- shared --------------------------------------------------------------------------

    async def _respond(
        self,
        call: ApiCall[Any],
        lm: LoadedModel,
        jobs: list[tuple[list[int], SamplingParams]],
        prompt_tokens: int,
        fmt: Format,
        stream: bool,
        logged: dict[str, Any] | None,
        scope: CacheScope,
    ) -> Response:
        ctx, name = call.ctx, lm.spec.name
        ctx.model = name
        ctx.content = logged
        gen = Generation(lm.batcher, jobs, call.deadline, cache_scope=scope)
        ctx.add_tokens(prompt=prompt_tokens)
        self.metrics.prompt_tokens.labels(name).inc(prompt_tokens)
        timing = _Timing(self.metrics, name, ctx, len(jobs))
        prompts: dict[int, int] = {}  # a prompt's jobs share its token list
        choices = Choices(len(jobs), [prompts.setdefault(id(p), len(prompts)) for p, _ in jobs])
        if stream:
            response = ManagedStreamingResponse(
                self._stream(gen, fmt, timing, choices, prompt_tokens)
            )
            # Also here, not only in the generator's `finally`: a client that leaves before the
            # first chunk means the generator never started and its `finally` never runs.
            response.on_close(lambda: self._close(gen, ctx, name, completed=gen.finished))
            return response
        try:
            await unless_disconnected(call.http, self._collect(gen, timing, choices))
        except OpenAIError as err:
            ctx.error_code = err.code
            raise
        finally:
            self._close(gen, ctx, name, completed=gen.finished)
        usage = self._usage(name, prompt_tokens, choices)
        self._finish_ctx(ctx, choices)
        return JSONResponse(fmt.response(choices, usage).model_dump(mode="json"))

    @staticmethod
    async def _collect(gen: Generation, timing: _Timing, choices: Choices) -> None:
        while not gen.finished:
            outs = await gen.next_outputs()
            timing.observe(outs)
            for out in outs:
                choices.add(out)

    async def _stream(
        self, gen: Generation, fmt: Format, timing: _Timing, choices: Choices, prompt_tokens: int
    ) -> AsyncIterator[bytes]:
        ctx = timing.ctx
        try:
            yield fmt.opening(len(choices.texts))
            while not gen.finished:
                outs = await gen.next_outputs()
                timing.observe(outs)
                for out in outs:
                    choices.add(out)
                data = fmt.pieces(outs)
                if data:
                    yield data
            usage = self._usage(timing.model, prompt_tokens, choices)
            if fmt.include_usage:  # a last chunk with the usage and no choices
                yield fmt.usage(usage)
            yield DONE
        except OpenAIError as err:
            ctx.error_code = err.code
            yield sse_error(err)
        except Exception as exc:  # never leave a client hanging on a half stream
            log.exception("stream failed")
            err = EngineFailure(f"Generation failed: {exc}")
            ctx.error_code = err.code
            yield sse_error(err)
        finally:
            self._close(gen, ctx, timing.model, completed=gen.finished)
            self._finish_ctx(ctx, choices)

    def _usage(self, model: str, prompt_tokens: int, choices: Choices) -> Usage:
        cached = choices.cached_tokens()
        if cached:
            self.metrics.cached_prompt_tokens.labels(model).inc(cached)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=choices.tokens,
            total_tokens=prompt_tokens + choices.tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def _close(self, gen: Generation, ctx: RequestContext, model: str, completed: bool) -> None:
        # Sequences still open here were abandoned: the client left (or a sibling failed).
        if gen.close() and not completed and ctx.error_code is None:
            ctx.disconnected = True
            self.metrics.aborted.labels(model).inc()

    @staticmethod
    def _finish_ctx(ctx: RequestContext, choices: Choices) -> None:
        ctx.finish_reasons = [f or "aborted" for f in choices.finish]
        ctx.cached_tokens = choices.cached_tokens()
        if ctx.content is not None:
            ctx.content["output"] = choices.texts
