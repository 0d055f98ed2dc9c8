"""Outputs -> OpenAI objects: one formatter for chat, one for legacy completions.

Streamed and non-streamed responses are built from the same per-step text deltas, so at
temperature 0 the concatenated stream is exactly the non-streamed text.
"""

from __future__ import annotations

import functools
import json

from tunedesk.serve.engines.local.batcher import SeqOutput
from tunedesk.serve.engines.local.logprobs import Candidate, TokenLogprob
from tunedesk.serve.engines.local.tools import ToolStream, ToolUse, parse_calls
from tunedesk.serve.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionTokenLogprob,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FunctionCall,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    now,
    random_id,
)
from tunedesk.serve.streaming import sse

# Slots in chunks rendered once per model, filled per request and per token. Each is found with
# its JSON key in front (`"index":987654321`), which no string value can contain unescaped,
# so a model named after a slot can't be mistaken for it.
_ID = "tunedesk-id-slot"
_CREATED = 987654320
_INDEX = 987654321
_TEXT = "\ue000tunedesk-text\ue000"


def _key(name: str, value: bytes) -> bytes:
    return b'"' + name.encode() + b'":' + value


_ID_SLOT = _key("id", json.dumps(_ID).encode())
_CREATED_SLOT = _key("created", str(_CREATED).encode())
_INDEX_SLOT = _key("index", str(_INDEX).encode())


def _stamp(sample: bytes, id_: str, created: int) -> bytes:
    """A sample chunk with this response's id and creation time in their slots."""
    sample = sample.replace(_ID_SLOT, _key("id", json.dumps(id_).encode()), 1)
    return sample.replace(_CREATED_SLOT, _key("created", str(created).encode()), 1)


def _with_index(chunk: bytes, index: int) -> bytes:
    return chunk.replace(_INDEX_SLOT, _key("index", str(index).encode()), 1)


class ChunkTemplate:
    """The bytes of a streamed chunk that carries one choice's new text, rendered once by the
    pydantic model and then filled in per token: the same bytes as `model_dump_json`, without
    building three models per token (a third of the event loop's work per chunk)."""

    def __init__(self, sample: bytes) -> None:
        text_mark = json.dumps(_TEXT, ensure_ascii=False).encode("utf-8")
        # The two slots in the order the model puts its fields (chat: index first).
        self._index_first = sample.index(_INDEX_SLOT) < sample.index(text_mark)
        first, second = (_INDEX_SLOT, text_mark) if self._index_first else (text_mark, _INDEX_SLOT)
        head, rest = sample.split(first, 1)
        middle, tail = rest.split(second, 1)
        self._head, self._middle, self._tail = head, middle, tail

    def render(self, index: int, text: str) -> bytes:
        slots = (
            _key("index", str(index).encode()),
            json.dumps(text, ensure_ascii=False).encode("utf-8"),
        )
        a, b = slots if self._index_first else slots[::-1]
        return b"".join((self._head, a, self._middle, b, self._tail))


# Per served model: what the pydantic models render for a text chunk and for the opening
# (role) chunk, with slots for the id, time, index and text. Building and dumping those models
# for every request cost more than the rest of its formatting.
@functools.lru_cache(maxsize=64)
def _chat_samples(model: str, include_usage: bool) -> tuple[bytes, bytes]:
    exclude = None if include_usage else {"usage"}

    def chunk(delta: ChoiceDelta) -> bytes:
        choices = [ChunkChoice(index=_INDEX, delta=delta)]
        return sse(
            ChatCompletionChunk(id=_ID, created=_CREATED, model=model, choices=choices),
            exclude=exclude,
        )

    return chunk(ChoiceDelta(content=_TEXT)), chunk(ChoiceDelta(role="assistant", content=""))


@functools.lru_cache(maxsize=64)
def _completion_sample(model: str, include_usage: bool) -> bytes:
    choice = CompletionChoice(text=_TEXT, index=_INDEX, finish_reason=None)
    chunk = Completion(id=_ID, created=_CREATED, model=model, choices=[choice])
    return sse(chunk, exclude=None if include_usage else {"usage"})


def _logprob_value(value: float | None) -> float | None:
    # JSON has no -inf (a token the model can't produce); OpenAI and vLLM send -9999.0.
    return None if value is None else max(value, -9999.0)


def _top(c: Candidate) -> TopLogprob:
    return TopLogprob(token=c.token, bytes=list(c.bytes), logprob=_logprob_value(c.logprob))  # type: ignore[arg-type]


def chat_logprobs(logprobs: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            ChatCompletionTokenLogprob(
                token=lp.chosen.token,
                bytes=list(lp.chosen.bytes),
                logprob=_logprob_value(lp.chosen.logprob),  # type: ignore[arg-type]
                top_logprobs=[_top(c) for c in lp.top or ()],
            )
            for lp in logprobs
        ]
    )


def completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """The legacy shape: parallel lists; `top_logprobs` maps text to logprob and holds the
    sampled token too (up to k+1 entries, as OpenAI's); `text_offset` counts characters of
    the tokens' texts from `offset`. An echoed prompt's first token has null logprobs."""
    out = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
    for lp in logprobs:
        out.text_offset.append(offset)
        offset += len(lp.chosen.token)
        out.tokens.append(lp.chosen.token)
        chosen = _logprob_value(lp.chosen.logprob)
        out.token_logprobs.append(chosen)
        if lp.top is None or chosen is None:
            out.top_logprobs.append(None)
            continue
        top: dict[str, float] = {c.token: _logprob_value(c.logprob) for c in lp.top}  # type: ignore[misc]
        top.setdefault(lp.chosen.token, chosen)
        out.top_logprobs.append(top)
    return out


class Choices:
    """Accumulates text, logprobs and finish reasons per choice index."""

    def __init__(self, n: int, prompt_of: list[int] | None = None) -> None:
        self.texts = [""] * n
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.prompt_logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.tokens = 0
        self.cached = [0] * n
        self._prompt_of = prompt_of or [0] * n
        """Which of the request's prompts each choice continues (several for completions)."""

    def add(self, out: SeqOutput) -> None:
        self.texts[out.index] += out.text
        if out.logprob is not None:
            self.logprobs[out.index].append(out.logprob)
        if out.prompt_logprobs:
            self.prompt_logprobs[out.index] = out.prompt_logprobs
        self.tokens += out.tokens
        if out.cached:
            self.cached[out.index] = out.cached
        if out.finish_reason is not None:
            self.finish[out.index] = out.finish_reason

    def cached_tokens(self) -> int:
        """Cached prompt tokens, once per prompt as `prompt_tokens` counts them (n choices of
        one prompt were prefilled side by side, and only one may have found it cached)."""
        best: dict[int, int] = {}
        for prompt, cached in zip(self._prompt_of, self.cached, strict=True):
            best[prompt] = max(best.get(prompt, 0), cached)
        return sum(best.values())


class ChatFormat:
    def __init__(
        self, model: str, include_usage: bool, logprobs: bool = False, tools: ToolUse | None = None
    ) -> None:
        """`tools`: read tool calls out of the answers (tools.py)."""
        self.logprobs = logprobs
        self.tools = tools
        self._tool_streams: dict[int, ToolStream] = {}
        self.id = random_id("chatcmpl")
        self.created = now()
        self.model = model
        self.include_usage = include_usage
        self._exclude = None if include_usage else {"usage"}
        text, opening = _chat_samples(model, include_usage)
        self._text = ChunkTemplate(_stamp(text, self.id, self.created))
        self._opening = _stamp(opening, self.id, self.created)

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return sse(chunk, exclude=self._exclude)

    def opening(self, n: int) -> bytes:
        # Sent before the first token, as OpenAI does: the client learns the stream is live,
        # and anything failing later arrives as an in-band error chunk.
        return b"".join(_with_index(self._opening, i) for i in range(n))

    def pieces(self, outs: list[SeqOutput]) -> bytes:
        parts: list[bytes] = []
        for out in outs:
            text, calls, reason = out.text, [], out.finish_reason
            if self.tools is not None:
                stream = self._tool_streams.setdefault(out.index, ToolStream())
                text = stream.feed(out.text)
                if reason is not None:
                    rest, calls = stream.finish()
                    text += rest
                    reason = self.tools.finish_reason(reason, bool(calls))
            if out.logprob is not None:  # every token, also one whose text is held back
                choice = ChunkChoice(
                    index=out.index,
                    delta=ChoiceDelta(content=text),
                    logprobs=chat_logprobs([out.logprob]),
                )
                parts.append(self._chunk([choice]))
            elif text:
                parts.append(self._text.render(out.index, text))
            if calls:
                deltas = [ToolCallDelta(index=k, **call) for k, call in enumerate(calls)]
                choice = ChunkChoice(index=out.index, delta=ChoiceDelta(tool_calls=deltas))
                parts.append(self._chunk([choice]))
            if reason is not None:
                choice = ChunkChoice(
                    index=out.index,
                    delta=ChoiceDelta(),
                    finish_reason=reason,  # type: ignore[arg-type]
                )
                parts.append(self._chunk([choice]))
        return b"".join(parts)

    def _message(self, text: str, reason: str) -> tuple[ChatCompletionMessage, str]:
        if self.tools is None:
            return ChatCompletionMessage(content=text), reason
        content, calls = parse_calls(text)
        message = ChatCompletionMessage(
            content=content,
            tool_calls=[ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in calls]
            or None,
        )
        return message, self.tools.finish_reason(reason, bool(calls))

    def usage(self, usage: Usage) -> bytes:
        return sse(
            ChatCompletionChunk(
                id=self.id, created=self.created, model=self.model, choices=[], usage=usage
            )
        )

    def response(self, choices: Choices, usage: Usage) -> ChatCompletion:
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=chat_logprobs(choices.logprobs[i]) if self.logprobs else None,
                    finish_reason=reason,  # type: ignore[arg-type]
                )
                for i, (message, reason) in enumerate(
                    self._message(text, finish or "stop")
                    for text, finish in zip(choices.texts, choices.finish, strict=True)
                )
            ],
            usage=usage,
        )


class CompletionFormat:
    def __init__(
        self,
        model: str,
        include_usage: bool,
        logprobs: bool = False,
        echo: list[str] | None = None,
    ) -> None:
        """`echo`: each choice's prompt text, which its text starts with (`echo: true`)."""
        self.logprobs = logprobs
        self._echo = echo
        self._echoed: set[int] = set()
        self._offsets: dict[int, int] = {}
        """Per choice: characters of token text streamed so far (the next `text_offset`)."""
        self.id = random_id("cmpl")
        self.created = now()
        self.model = model
        self.include_usage = include_usage
        self._exclude = None if include_usage else {"usage"}
        self._text = ChunkTemplate(
            _stamp(_completion_sample(model, include_usage), self.id, self.created)
        )

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        chunk = Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return sse(chunk, exclude=self._exclude)

    def opening(self, n: int) -> bytes:
        return b""

    def pieces(self, outs: list[SeqOutput]) -> bytes:
        parts = []
        for out in outs:
            text = out.text
            if self._echo is not None and out.index not in self._echoed:
                self._echoed.add(out.index)  # the prompt leads the choice's first chunk
                text = self._echo[out.index] + text
            if out.finish_reason is not None or out.logprob is not None:
                choice = CompletionChoice(
                    text=text,
                    index=out.index,
                    logprobs=self._streamed_logprobs(out),
                    finish_reason=out.finish_reason,  # type: ignore[arg-type]
                )
                parts.append(self._chunk([choice]))
            elif text:
                parts.append(self._text.render(out.index, text))
        return b"".join(parts)

    def _streamed_logprobs(self, out: SeqOutput) -> CompletionLogprobs | None:
        if out.logprob is None:
            return None
        tokens = [*(out.prompt_logprobs or ()), out.logprob]
        offset = self._offsets.get(out.index, 0)
        self._offsets[out.index] = offset + sum(len(t.chosen.token) for t in tokens)
        return completion_logprobs(tokens, offset)

    def usage(self, usage: Usage) -> bytes:
        return sse(
            Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)
        )

    def response(self, choices: Choices, usage: Usage) -> Completion:
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(
                    text=(self._echo[i] if self._echo is not None else "") + text,
                    index=i,
                    logprobs=completion_logprobs(
                        choices.prompt_logprobs[i] + choices.logprobs[i], 0
                    )
                    if self.logprobs
                    else None,
                    finish_reason=choices.finish[i] or "stop",  # type: ignore[arg-type]
                )
                for i, text in enumerate(choices.texts)
            ],
            usage=usage,
        )
