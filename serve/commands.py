"""`tunedesk serve`: argument parsing only; the server is imported inside the handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from tunedesk.errors import CommandError

# Flag -> settings field, for flags whose value is taken as given when set. Unset flags leave
# the TUNEDESK_* environment (or the default) in charge.
_DIRECT = {
    "model": "model",
    "engine": "engine",
    "upstream_usage": "upstream_usage",
    "host": "host",
    "port": "port",
    "api_key_file": "api_key_file",
    "public_metrics": "public_metrics",
    "upstream_cache_salt": "upstream_cache_salt",
    "served_model_name": "served_model_name",
    "max_running": "max_running",
    "max_queued": "max_queued",
    "max_prompt_tokens": "max_prompt_tokens",
    "max_tokens_cap": "max_tokens_cap",
    "max_body_bytes": "max_body_bytes",
    "max_upload_bytes": "max_upload_bytes",
    "request_timeout": "request_timeout_s",
    "device": "device",
    "dtype": "dtype",
    "cpu_threads": "cpu_threads",
    "engine_process": "engine_process",
    "prefill_batch_tokens": "prefill_batch_tokens",
    "prefix_cache_mb": "prefix_cache_mb",
    "tensor_parallel_size": "tensor_parallel_size",
    "finetune": "finetune",
    "finetune_max_jobs": "finetune_max_jobs",
    "widget_demo_key": "widget_demo_key",
}
_LISTS = {
    "api_key": "api_keys",
    "lora": "loras",
    "cors_origin": "cors_origins",
    "vllm_arg": "vllm_args",
    "upstream_url": "upstream_url",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models over an OpenAI-compatible API",
        description="OpenAI-compatible server: /v1/chat/completions, /v1/completions, "
        "/v1/models[/NAME], /health, /ready, /metrics. Every flag can also be set as TUNEDESK_<NAME> "
        "(e.g. TUNEDESK_API_KEYS=k1,k2).",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model folder, fine-tuning job id with a merged model, or hub id "
        "(default: the tiny base, if built)",
    )
    p.add_argument("--engine", choices=["transformers", "vllm", "upstream"], default=None)
    p.add_argument(
        "--upstream-url",
        action="append",
        default=None,
        metavar="URL",
        help="OpenAI-compatible server to forward to (repeat for replicas of one service)",
    )
    p.add_argument(
        "--upstream-usage",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ask the upstream (or vLLM) for token usage on every stream, for the access log "
        "and token counters; clients still get usage only if they ask (default on; "
        "--no-upstream-usage for an upstream that rejects stream_options)",
    )
    p.add_argument("--host", default=None, help="default 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default 8000")
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="accepted Bearer key (repeatable; prefer --api-key-file or TUNEDESK_API_KEYS, "
        "which stay out of `ps`)",
    )
    p.add_argument("--api-key-file", type=Path, default=None, help="one key per line")
    p.add_argument("--served-model-name", default=None, metavar="NAME")
    p.add_argument("--lora", action="append", default=None, metavar="NAME=PATH")
    p.add_argument(
        "--cors-origin", action="append", default=None, metavar="ORIGIN", help="repeatable"
    )
    p.add_argument(
        "--upstream-cache-salt",
        action="store_true",
        default=None,
        help="upstream engine: send each API key's requests with its own vLLM cache_salt "
        "(always on for --engine vllm)",
    )
    p.add_argument(
        "--public-metrics",
        action="store_true",
        default=None,
        help="/metrics without a key (default: with keys configured, a key with the metrics scope)",
    )
    p.add_argument("--max-running", type=int, default=None, help="batch size (default 64)")
    p.add_argument("--max-queued", type=int, default=None, help="waiting requests (default 64)")
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--max-tokens-cap", type=int, default=None, help="default 4096")
    p.add_argument("--max-body-bytes", type=int, default=None, help="default 1000000")
    p.add_argument(
        "--max-upload-bytes", type=int, default=None, help="/v1/files uploads (default 512000000)"
    )
    p.add_argument("--request-timeout", type=float, default=None, help="seconds (default 600)")
    p.add_argument(
        "--log-content",
        action="store_true",
        default=None,
        help="log messages and outputs (off by default: they may hold customer data)",
    )
    p.add_argument("--device", default=None, help="transformers engine: auto, cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None)
    p.add_argument(
        "--cpu-threads", type=int, default=None, help="torch threads on CPU (default: cores/2)"
    )
    p.add_argument(
        "--prefill-batch-tokens",
        type=int,
        default=None,
        help="transformers engine: prompt tokens prefilled together per step (default 256)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=None,
        help="transformers engine: memory for cached prompt prefixes, e.g. a shared system "
        "prompt (default 256; 0: off)",
    )
    p.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="transformers engine: generate in a child process per model (default on)",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=None, help="vllm engine: GPUs")
    p.add_argument(
        "--finetune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve OpenAI's fine-tuning API (/v1/files, /v1/fine_tuning/jobs) on this workspace",
    )
    p.add_argument("--finetune-max-jobs", type=int, default=None, help="jobs trained at once")
    p.add_argument(
        "--widget-demo-key",
        default=None,
        metavar="KEY",
        help="key the /widget/demo page embeds (a widget key: scopes=chat models=... rate=...)",
    )
    p.add_argument(
        "--vllm-arg",
        action="append",
        default=None,
        metavar="ARG",
        help="extra argument passed to `vllm serve` (repeatable), e.g. --vllm-arg=--max-model-len=4096",
    )
    p.set_defaults(handler=_serve)


def settings_from_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from tunedesk.serve.settings import ServeSettings

    given = {field: getattr(args, flag) for flag, field in _DIRECT.items()}
    given.update({field: getattr(args, flag) for flag, field in _LISTS.items()})
    if args.log_content:
        given["log_content"] = True
    try:
        return ServeSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CommandError(f"invalid setting {where}: {first['msg']}") from None


def _configure_logging() -> None:
    import logging
    import sys

    serve_log = logging.getLogger("tunedesk.serve")
    if serve_log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    serve_log.addHandler(handler)
    serve_log.setLevel(logging.INFO)
    # The access log is already JSON: print it bare, one object per line.
    access = logging.getLogger("tunedesk.serve.access")
    bare = logging.StreamHandler(sys.stderr)
    bare.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(bare)
    access.propagate = False


def _serve(args: argparse.Namespace) -> int:
    import os
    import sys

    if "torch" not in sys.modules:
        # Before torch loads (it reads this once): OpenMP workers that spin while waiting
        # steal the cores the event loop and tokenizer need; sleeping waiters cost nothing.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    settings = settings_from_args(args)
    from tunedesk.serve.app import create_app, load_keys
    from tunedesk.serve.auth import KeyFileError
    from tunedesk.serve.engines.factory import build_engine
    from tunedesk.serve.model_ref import build_registry

    try:
        keys = load_keys(settings)
    except KeyFileError as exc:
        raise CommandError(str(exc)) from None
    registry = build_registry(settings)
    engine = build_engine(settings, registry)
    _configure_logging()  # only once the server will really run
    app = create_app(settings, engine, keys=keys)

    import uvicorn

    from tunedesk.serve.settings import UVICORN_PROTOCOLS

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,  # ours is structured and knows tokens and TTFT
        log_level="info",
        timeout_graceful_shutdown=10,
        **UVICORN_PROTOCOLS,
    )
    return 0
