"""Loading served models into memory, lazily and once, each with its own batcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedesk.chat_format import ChatFormatError, encode_prompt, stop_token_ids
from tunedesk.serve.engines.local.batcher import StepBatcher
from tunedesk.serve.engines.local.process import EngineProcess, EngineSpec
from tunedesk.serve.errors import ModelNotFound, Unavailable
from tunedesk.serve.registry import ModelRegistry, ModelSpec
from tunedesk.serve.settings import ServeSettings

log = logging.getLogger("tunedesk.serve")


@dataclass
class LoadedModel:
    spec: ModelSpec
    tokenizer: Any
    stop_ids: list[int]
    context_len: int
    batcher: StepBatcher | EngineProcess


def _device_and_dtype(settings: ServeSettings) -> tuple[str, str]:
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = settings.dtype
    if dtype == "auto":
        # bf16 where the hardware has it; CPU matmuls in bf16 are slow and lossy, keep fp32.
        on_gpu = device.startswith("cuda")
        dtype = "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def _cpu_threads(settings: ServeSettings) -> int:
    # Half the cores, at most 8: intra-op threads that outnumber free cores spin at every
    # barrier, and a busy 2-core box then runs a small model 20x slower than on one thread.
    # The other half is left to the event loop, tokenisation and the OS.
    if settings.cpu_threads is not None:
        return settings.cpu_threads
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def _stop_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    # The chat format's end-of-turn/eos first (what training taught the model to emit), then
    # whatever else the checkpoint's generation config calls an end (Qwen lists <|endoftext|>).
    ids = list(stop_token_ids(tokenizer))
    eos = getattr(generation_config, "eos_token_id", None)
    for tid in eos if isinstance(eos, list) else [eos]:
        if isinstance(tid, int) and tid >= 0 and tid not in ids:
            ids.append(tid)
    return ids


def _context_len(config: Any, tokenizer: Any) -> int:
    n = getattr(config, "max_position_embeddings", None) or 2048
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        n = min(n, tok_max)
    return int(n)


def _tokenizer_source(spec: ModelSpec) -> str:
    if spec.adapter and (Path(spec.adapter) / "tokenizer_config.json").exists():
        return spec.adapter  # an adapter saved with its tokenizer carries its template
    return spec.path


def load_weights(path: str, adapter: str | None, tokenizer_source: str, spec: Any) -> Any:
    """(model, tokenizer) on `spec.device` in `spec.dtype`, adapters merged in memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, spec.dtype), attn_implementation="sdpa"
    )
    if adapter:
        from peft import PeftModel

        # Merged in memory: one plain model per served adapter, batched like any other.
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(torch.device(spec.device)).eval(), tokenizer


def _warm_chat_template(tokenizer: Any) -> None:
    """Render one prompt now: the first render compiles the chat template (jinja) and builds
    the tokenizer's caches, ~13 ms that would otherwise land on the first request."""
    # No usable template: chat requests will say so, and completions still work.
    with contextlib.suppress(ChatFormatError):
        encode_prompt(tokenizer, [{"role": "user", "content": "warm-up"}])


def load_model(spec: ModelSpec, settings: ServeSettings) -> LoadedModel:
    """Blocking: read the tokenizer and config, start the model's batcher (in its own engine
    process unless `settings.engine_process` is off) and wait until it is ready."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    device, dtype = _device_and_dtype(settings)
    tok_source = _tokenizer_source(spec)
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    config = AutoConfig.from_pretrained(spec.path)
    try:
        generation_config = GenerationConfig.from_pretrained(spec.path)
    except OSError:  # no generation_config.json: the model config's eos is what there is
        generation_config = GenerationConfig.from_model_config(config)
    stop_ids = _stop_ids(tokenizer, generation_config)
    context_len = _context_len(config, tokenizer)
    _warm_chat_template(tokenizer)
    engine = EngineSpec(
        name=spec.name,
        path=spec.path,
        adapter=spec.adapter,
        tokenizer_source=tok_source,
        device=device,
        dtype=dtype,
        cpu_threads=_cpu_threads(settings),
        max_batch=settings.max_running,
        stop_ids=tuple(stop_ids),
        context_len=context_len,
        prefill_batch_tokens=settings.prefill_batch_tokens,
        prefix_cache_bytes=settings.prefix_cache_mb << 20,
    )
    batcher: StepBatcher | EngineProcess
    if settings.engine_process:
        batcher = EngineProcess(engine)
        batcher.start()
    else:
        model, tokenizer = load_weights(spec.path, spec.adapter, tok_source, engine)
        batcher = StepBatcher(
            model,
            tokenizer,
            stop_ids=stop_ids,
            context_len=context_len,
            max_batch=settings.max_running,
            name=spec.name,
            cpu_threads=engine.cpu_threads,
            prefill_token_budget=settings.prefill_batch_tokens,
            prefix_cache_bytes=engine.prefix_cache_bytes,
        )
        batcher.start()
    log.info(
        "loaded %s from %s on %s (%s), context %d%s",
        spec.name,
        spec.path,
        device,
        dtype,
        context_len,
        ", in an engine process" if settings.engine_process else "",
    )
    return LoadedModel(spec, tokenizer, stop_ids, context_len, batcher)


class LocalModels:
    """Served name -> loaded model. Loads on first use; one load per model however many
    requests wait for it; a failed load is remembered (503) until the model is re-registered."""

    def __init__(self, registry: ModelRegistry, settings: ServeSettings) -> None:
        self.registry = registry
        self.settings = settings
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._failed: dict[str, tuple[ModelSpec, str]] = {}

    def loaded(self, name: str) -> LoadedModel | None:
        lm = self._loaded.get(name)
        return lm if lm is not None and lm.spec is self.registry.get(name) else None

    def failure(self, name: str) -> str | None:
        failed = self._failed.get(name)
        return failed[1] if failed and failed[0] is self.registry.get(name) else None

    async def get(self, name: str) -> LoadedModel:
        spec = self.registry.get(name)
        if spec is None:
            raise ModelNotFound(name)
        self._prune()
        lm = self._loaded.get(name)
        if lm is not None and lm.spec is spec:
            if not lm.batcher.alive:
                raise Unavailable(f"The model `{name}` is unavailable: its worker stopped.")
            return lm
        if self.failure(name):
            raise Unavailable(f"The model `{name}` is unavailable: it failed to load.")
        task = self._loading.get(name)
        if task is None:
            task = asyncio.create_task(self._load(spec))
            self._loading[name] = task
        # Shielded: a client giving up must not cancel a load other requests wait for.
        return await asyncio.shield(task)

    async def _load(self, spec: ModelSpec) -> LoadedModel:
        try:
            lm = await asyncio.to_thread(load_model, spec, self.settings)
        except Exception as exc:
            log.error("loading %s from %s failed: %s", spec.name, spec.path, exc)
            self._failed[spec.name] = (spec, str(exc))
            raise Unavailable(
                f"The model `{spec.name}` is unavailable: it failed to load."
            ) from exc
        finally:
            self._loading.pop(spec.name, None)
        old = self._loaded.get(spec.name)
        self._loaded[spec.name] = lm
        if old is not None:
            await asyncio.to_thread(old.batcher.stop)
        return lm

    def _prune(self) -> None:
        """Stop models that were unregistered or replaced (their batcher thread and memory)."""
        for name, lm in list(self._loaded.items()):
            if self.registry.get(name) is not lm.spec:
                del self._loaded[name]
                lm.batcher.stop(timeout=0)

    async def close(self) -> None:
        for task in self._loading.values():
            task.cancel()
        for lm in self._loaded.values():
            await asyncio.to_thread(lm.batcher.stop)
        self._loaded.clear()
