"""The `vllm` engine: a supervised `vllm serve` child on a private port, proxied.

The child gets the training chat template explicitly (`--chat-template`), so vLLM renders
prompts exactly as `tunedesk.chat_format` does in training, and `--generation-config vllm` so
sampling defaults are OpenAI's rather than whatever the checkpoint's generation_config says.
A template that writes tool calls as `<tool_call>` blocks also gets vLLM's `hermes` tool
parser, so `tool_choice: auto` returns `tool_calls` on both engines.
The supervisor gates readiness on the child's /health and restarts it if it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tunedesk.errors import CommandError
from tunedesk.serve.engines.proxy import ProxyEngine
from tunedesk.serve.metrics import Metrics
from tunedesk.serve.registry import ModelRegistry, ModelSpec
from tunedesk.serve.settings import ServeSettings

log = logging.getLogger("tunedesk.serve")

VLLM_MISSING = "vLLM is not installed: pip install 'tunedesk[vllm]' on a CUDA machine"


def ensure_vllm_installed() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise CommandError(VLLM_MISSING)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def chat_template_file(model_path: str, scratch: Path) -> Path | None:
    """The model's chat template as a file: `chat_template.jinja` as saved, else the string in
    tokenizer_config.json written out. A local model without one is an error: vLLM would fall
    back to a default that doesn't match training. A hub id (not on disk) gives None: vLLM then
    reads the hub tokenizer's own template, the one training rendered with too."""
    folder = Path(model_path)
    if not folder.exists():
        return None
    saved = folder / "chat_template.jinja"
    if saved.exists():
        return saved
    config = folder / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str) and template:
            out = scratch / "chat_template.jinja"
            out.write_text(template, encoding="utf-8")
            return out
    raise CommandError(
        f"{model_path} has no chat template (chat_template.jinja or tokenizer_config.json); "
        "serve a model saved by tunedesk (merge writes one) or add the template"
    )


def _lora_rank(adapter: str) -> int | None:
    try:
        cfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    r = cfg.get("r")
    return int(r) if isinstance(r, int) else None


@dataclass
class VLLMLaunch:
    model: str
    served_name: str
    port: int
    chat_template: Path | None
    host: str = "127.0.0.1"
    tensor_parallel_size: int = 1
    loras: list[ModelSpec] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.cli.main",
            "serve",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--served-model-name",
            self.served_name,
            "--generation-config",
            "vllm",
            "--tensor-parallel-size",
            str(self.tensor_parallel_size),
        ]
        if self.chat_template is not None:
            cmd += ["--chat-template", str(self.chat_template)]
        if self._writes_hermes_calls() and not any(
            a.startswith(("--tool-call-parser", "--enable-auto-tool-choice"))
            for a in self.extra_args
        ):
            # `tool_choice: auto` reads calls out of the answer as the embedded engine does.
            cmd += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
        if self.loras:
            cmd += ["--enable-lora", "--lora-modules"]
            cmd += [f"{spec.name}={spec.adapter}" for spec in self.loras]
            ranks = [r for spec in self.loras if spec.adapter and (r := _lora_rank(spec.adapter))]
            if ranks and max(ranks) > 16:  # vLLM's default --max-lora-rank is 16
                cmd += ["--max-lora-rank", str(max(ranks))]
        return cmd + list(self.extra_args)

    def _writes_hermes_calls(self) -> bool:
        """The template writes tool calls as <tool_call> blocks (tunedesk's and Qwen's do),
        which vLLM's `hermes` parser reads. Other templates get no parser unless one is
        passed with --vllm-arg."""
        if self.chat_template is None:
            return False
        return "<tool_call>" in self.chat_template.read_text(encoding="utf-8")


def launch_for(registry: ModelRegistry, settings: ServeSettings, scratch: Path) -> VLLMLaunch:
    specs = registry.list()
    bases = [s for s in specs if not s.adapter]
    if len(bases) != 1:
        raise CommandError(
            "the vllm engine serves one base model (plus LoRA adapters); got "
            f"{[s.name for s in bases]}"
        )
    base = bases[0]
    return VLLMLaunch(
        model=base.path,
        served_name=base.name,
        port=free_port(),
        chat_template=chat_template_file(base.path, scratch),
        tensor_parallel_size=settings.tensor_parallel_size,
        loras=[s for s in specs if s.adapter],
        extra_args=list(settings.vllm_args),
    )


class VLLMSupervisor:
    """Runs the child, gates on /health, restarts it with back-off when it dies."""

    def __init__(
        self, launch: VLLMLaunch, startup_timeout_s: float = 900.0, max_restarts: int = 5
    ) -> None:
        self.launch = launch
        self.startup_timeout_s = startup_timeout_s
        self.max_restarts = max_restarts
        self.healthy = False
        self.status = "starting"
        self._proc: subprocess.Popen[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://{self.launch.host}:{self.launch.port}"

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        restarts = 0
        while not self._stopping:
            started = time.monotonic()
            self._spawn()
            if await self._wait_healthy():
                self.healthy, self.status = True, "healthy"
                log.info("vLLM is up at %s", self.url)
                await asyncio.to_thread(self._proc.wait)  # type: ignore[union-attr]
                self.healthy = False
                if self._stopping:
                    return
                code = self._proc.returncode if self._proc else None
                log.error("vLLM exited with code %s; restarting", code)
            if time.monotonic() - started > 600:
                restarts = 0  # it ran a good while: count crash loops, not rare crashes
            restarts += 1
            if restarts > self.max_restarts:
                self.status = f"vLLM failed {restarts} times in a row; giving up (see its log)"
                log.error(self.status)
                return
            self.status = f"restarting (attempt {restarts})"
            await asyncio.sleep(min(30.0, 2.0**restarts))

    def _spawn(self) -> None:
        cmd = self.launch.command()
        log.info("starting vLLM: %s", " ".join(cmd))
        # Its own process group, so stopping it also stops its workers (tensor parallel).
        self._proc = subprocess.Popen(cmd, start_new_session=True, env=os.environ.copy())

    async def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout_s
        async with httpx.AsyncClient(timeout=5.0) as client:
            while time.monotonic() < deadline and not self._stopping:
                if self._proc is None or self._proc.poll() is not None:
                    self.status = "vLLM exited during start-up"
                    return False
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1.0)
        self.status = "vLLM did not become healthy in time"
        self._terminate()
        return False

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.to_thread(self._terminate)
        if self._task is not None:
            self._task.cancel()


class VLLMEngine(ProxyEngine):
    kind = "vllm"

    def __init__(
        self, registry: ModelRegistry, settings: ServeSettings, metrics: Metrics | None = None
    ) -> None:
        ensure_vllm_installed()
        self._scratch = tempfile.TemporaryDirectory(prefix="tunedesk-vllm-")
        self.launch = launch_for(registry, settings, Path(self._scratch.name))
        self.supervisor = VLLMSupervisor(self.launch, settings.vllm_startup_timeout_s)
        super().__init__(
            registry,
            self.supervisor.url,
            timeout_s=settings.request_timeout_s,
            ask_usage=settings.upstream_usage,
            salt_by_key=True,  # our own vLLM: its prefix cache is scoped per key, as ours is
            metrics=metrics,
        )
        registry.subscribe(self._refuse_changes)

    def _refuse_changes(self, name: str, spec: ModelSpec | None) -> None:
        # A running vLLM serves the models it was started with; say so rather than 404 later.
        log.warning("model %s changed after vLLM started; it takes effect on restart", name)

    async def start(self) -> None:
        self.supervisor.start()

    async def stop(self) -> None:
        await self.supervisor.stop()
        await super().stop()
        self._scratch.cleanup()

    async def ready(self) -> tuple[bool, str]:
        if not self.supervisor.healthy:
            return False, self.supervisor.status
        return await super().ready()
