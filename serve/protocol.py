"""The OpenAI wire format: request and response models, fields in OpenAI's order.

Requests keep unknown fields (`extra="allow"`) instead of rejecting them: a gateway forwards the
client's raw bytes to an upstream that may understand more (vLLM's extras), and the local
engine ignores what it does not use, as vLLM does. Fields the local engine can't honour are
rejected there with a 400 naming the param, not silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# --- shared -----------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache instead of being prefilled."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


FinishReason = Literal["stop", "length", "tool_calls"]
Stop = str | Annotated[list[str], Field(max_length=4)] | None
CacheSalt = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^@/\\\x00]+$")] | None
"""vLLM's `cache_salt`: only prompts with the same salt (and, here, the same API key) share
cached prefixes. vLLM's rule for it too (at most 128 characters, none of `@ / \\` or NUL), so a
salt works on every engine or on none."""

# vLLM's sampling extensions, with vLLM's bounds (its 0 and -1 both turn top_k off).
TopK = Annotated[int, Field(ge=-1)] | None
MinP = Annotated[float, Field(ge=0.0, le=1.0)] | None
RepetitionPenalty = Annotated[float, Field(gt=0.0)] | None
LogitBias = dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None
"""Token id (as a string, JSON's keys are) -> a bias added to its logit, OpenAI's bounds."""
TopLogprobs = Annotated[int, Field(ge=0)] | None
"""How many likeliest tokens to report per position. The upper bound is the engine's (a vLLM
upstream's `--max-logprobs`), so it is checked there."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- /v1/chat/completions ---------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """The arguments as JSON text, as OpenAI sends them."""


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant turn's calls, sent back with the conversation."""
    tool_call_id: str | None = None
    """A tool turn: which call it answers."""


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = 0.0
    logit_bias: LogitBias = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = 0.0
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    # vLLM extensions, honoured by the local engine too (benchmarks need fixed-length outputs).
    ignore_eos: bool = False
    cache_salt: CacheSalt = None
    top_k: TopK = None
    min_p: MinP = None
    repetition_penalty: RepetitionPenalty = None
    # tunedesk's own (the widget sends it with a salt per visitor); dropped by the gateway.
    cache_share_system: bool = False
    """With `cache_salt`: the system turn's cached blocks stay shared within the API key (a
    widget's system prompt is in its page for anyone to read); the salt isolates the rest."""

    def num_sequences(self) -> int:
        return self.n or 1


class TopLogprob(BaseModel):
    token: str
    bytes: list[int] | None
    logprob: float


class ChatCompletionTokenLogprob(BaseModel):
    token: str
    bytes: list[int] | None
    logprob: float
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None = None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None

    # As OpenAI's: no `tool_calls` key on an answer without calls.
    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallDelta(BaseModel):
    """A call in a stream: sent whole here, so it has every field of its first delta."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    # OpenAI sends only the keys that changed: `{}` on the final chunk, never `"role": null`.
    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


# --- /v1/completions ---------------------------------------------------------------------


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Request):
    model: str
    prompt: Prompt
    best_of: int | None = None
    echo: bool | None = False
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = 0.0
    logit_bias: LogitBias = None
    logprobs: TopLogprobs = None
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = 0.0
    response_format: dict[str, Any] | None = None
    """Not OpenAI's (its legacy completions have none): vLLM's, the chat field's meaning."""
    seed: int | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    user: str | None = None
    ignore_eos: bool = False
    cache_salt: CacheSalt = None
    top_k: TopK = None
    min_p: MinP = None
    repetition_penalty: RepetitionPenalty = None

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of prompts (strings or token-id lists)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def num_sequences(self) -> int:
        return max(1, len(self.prompts())) * (self.n or 1)


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# --- /v1/models ------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunedesk"
    # vLLM's extras: what the model was made from (a fine-tune's base, an adapter's base).
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
