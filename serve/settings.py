"""Server settings: command-line flags override `TUNEDESK_*` environment variables, which
override the defaults here. Secrets are `SecretStr` so no repr or log line ever shows them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EngineKind = Literal["transformers", "vllm", "upstream"]

# What uvicorn runs the app on, the CLI and `ServerThread` alike. httptools (uvicorn's C
# parser) takes ~0.25 ms less CPU per streamed request than h11, and a burst of 32 requests
# waits on that serially. The loop is named rather than "auto", which would switch to uvloop
# wherever it happens to be installed: not measured enough here to be the default.
UVICORN_PROTOCOLS: dict[str, str] = {"http": "httptools", "loop": "asyncio"}


def _split_commas(value: object) -> object:
    # TUNEDESK_API_KEYS=a,b is friendlier than the JSON list pydantic-settings expects.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEDESK_", extra="ignore")

    # --- what to serve
    model: str | None = None
    """A model folder, a fine-tuning job id with a merged model, or (vLLM/transformers) a hub id."""
    served_model_name: str | None = None
    """The name clients use in `model`; default: the folder name or job id."""
    loras: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """LoRA adapters served beside the base, as NAME=PATH."""
    engine: EngineKind = "transformers"
    upstream_url: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Base URL of the OpenAI-compatible server `--engine upstream` forwards to; several
    (comma-separated, or the flag repeated) are replicas of one service, balanced by requests
    in flight, a replica that refuses connections skipped for a few seconds."""
    upstream_api_key: SecretStr | None = None
    upstream_usage: bool = True
    upstream_cache_salt: bool = False
    """The upstream is vLLM (or honours vLLM's `cache_salt`): send each API key's requests with
    a salt of their own, so keys never share its prefix cache (a hit's speed would tell one key
    what another asked). Always on for `--engine vllm`."""
    """Ask the upstream for token usage on every stream it relays (`stream_options`), so the
    access log and token counters count streamed tokens; the client still gets usage only if
    it asked. Turn off for an upstream that rejects `stream_options`."""

    # --- where
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # --- who may call
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_key_file: Path | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    public_metrics: bool = False
    """Serve /metrics to anyone. Off: with API keys configured it needs a key with the
    `metrics` scope (Prometheus sends one with `authorization: credentials_file`), since a
    server a widget talks to is public and its metrics name models and traffic."""

    # --- how much
    max_running: int = Field(default=64, ge=1)
    """Sequences generated at once (the batch); more requests wait in the queue."""
    max_queued: int = Field(default=64, ge=0)
    """Requests allowed to wait for a batch slot; beyond running + queued the answer is 429."""
    retry_after_s: int = Field(default=1, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    """Largest request body, except a file upload to /v1/files (max_upload_bytes)."""
    max_upload_bytes: int = Field(default=512_000_000, ge=1024)
    """Largest file upload to /v1/files (OpenAI's limit is 512 MB): a training file of a few
    thousand pairs is already over a megabyte."""
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    """Longest prompt accepted; default: the model's context length."""
    max_tokens_cap: int = Field(default=4096, ge=1)
    """Most tokens one completion may ask for."""
    max_n: int = Field(default=8, ge=1)
    request_timeout_s: float = Field(default=600.0, gt=0)

    # --- fine-tuning API
    finetune: bool = False
    """Serve OpenAI's fine-tuning API (/v1/files, /v1/fine_tuning/jobs) on the workspace
    (TUNEDESK_HOME); jobs train in subprocesses. Uploads are limited by max_upload_bytes."""
    finetune_max_jobs: int = Field(default=1, ge=1)
    """Fine-tuning jobs trained (or merged) at once; later ones wait queued."""

    # --- chat widget
    widget_demo_key: str | None = None
    """Key the /widget/demo page embeds (use a widget key: scopes=chat, named models, a rate)."""

    # --- observability
    log_content: bool = False
    """Include messages and outputs in the access log (off: they may hold customer data)."""

    # --- transformers engine
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cpu_threads: int | None = Field(default=None, ge=1)
    """Torch threads for a model on CPU; default half the cores (at most 8)."""
    prefill_batch_tokens: int = Field(default=256, ge=1)
    """Most prompt tokens prefilled together in one step. A burst of requests is taken in
    groups of about this many tokens between decode steps, so the first of them stream sooner
    than if the whole burst were prefilled at once (a longer prompt still goes alone)."""
    prefix_cache_mb: int = Field(default=256, ge=0)
    """Memory for the keys and values of prompt prefixes seen before (a shared system prompt,
    a conversation's earlier turns), so prompts starting the same way skip prefilling them.
    Least recently used blocks go first; 0 turns it off. Llama-family models (the lean
    forward) only."""
    engine_process: bool = True
    """Run each model's generation loop in its own process, so HTTP work and the model use
    separate cores instead of taking turns on one interpreter lock (off: a thread in the
    server process, which starts faster)."""

    # --- vLLM engine
    tensor_parallel_size: int = Field(default=1, ge=1)
    vllm_args: Annotated[list[str], NoDecode] = Field(default_factory=list)
    vllm_startup_timeout_s: float = Field(default=900.0, gt=0)

    _split = field_validator("loras", "api_keys", "cors_origins", "upstream_url", mode="before")(
        _split_commas
    )

    @field_validator("vllm_args", mode="before")
    @classmethod
    def _split_spaces(cls, value: object) -> object:
        if isinstance(value, str):
            import shlex

            return shlex.split(value)
        return value
