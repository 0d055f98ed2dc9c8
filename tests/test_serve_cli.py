"""`tunedesk serve` on the command line: settings precedence, --model resolution, the vLLM
command it would run (checked on CPU), and one real vLLM run for GPU machines."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from test_serve_support import vllm_launch

from tunedesk.cli import build_parser, main
from tunedesk.errors import CommandError
from tunedesk.serve.commands import settings_from_args
from tunedesk.serve.engines.vllm import (
    VLLM_MISSING,
    VLLMLaunch,
    VLLMSupervisor,
    chat_template_file,
    free_port,
)
from tunedesk.serve.model_ref import build_registry, resolve_model
from tunedesk.serve.settings import ServeSettings

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _model_dir(path: Path, template: str | None = "{{ messages }}") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if template is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return path


def _args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_serve_is_a_subcommand_with_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--engine", "--upstream-url", "--api-key-file", "--lora", "--cors-origin"):
        assert flag in out


def test_flags_override_environment_which_overrides_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEDESK_API_KEYS", "k1, k2")
    monkeypatch.setenv("TUNEDESK_PORT", "9001")
    monkeypatch.setenv("TUNEDESK_CORS_ORIGINS", "http://a.example,http://b.example")
    s = settings_from_args(_args("--port", "9002", "--lora", "x=/a", "--lora", "y=/b"))
    assert s.port == 9002
    assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"]
    assert "k1" not in repr(s)
    assert s.cors_origins == ["http://a.example", "http://b.example"]
    assert s.loras == ["x=/a", "y=/b"]
    s = settings_from_args(_args("--api-key", "k3"))
    assert [k.get_secret_value() for k in s.api_keys] == ["k3"] and s.port == 9001
    with pytest.raises(CommandError, match="max_running"):
        settings_from_args(_args("--max-running", "0"))
    assert s.upstream_usage is True
    monkeypatch.setenv("TUNEDESK_UPSTREAM_USAGE", "false")
    assert settings_from_args(_args()).upstream_usage is False
    assert settings_from_args(_args("--upstream-usage")).upstream_usage is True
    monkeypatch.delenv("TUNEDESK_UPSTREAM_USAGE")
    assert settings_from_args(_args("--no-upstream-usage")).upstream_usage is False


def test_model_resolves_folder_job_id_or_says_how_to_merge(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEDESK_HOME", str(tmp_path))
    folder = _model_dir(tmp_path / "somewhere" / "my-model")
    assert resolve_model(str(folder)) == resolve_model(str(folder))
    assert resolve_model(str(folder)).name == "my-model"
    merged = _model_dir(tmp_path / "models" / "ftjob-abc123-merged")
    ref = resolve_model("ftjob-abc123")
    assert (ref.path, ref.name) == (str(merged.resolve()), "ftjob-abc123")
    _model_dir(tmp_path / "runs" / "ftjob-def456" / "merged")
    assert resolve_model("ftjob-def456").path.endswith("ftjob-def456/merged")
    (tmp_path / "runs" / "ftjob-nomerge").mkdir(parents=True)
    with pytest.raises(CommandError, match="tunedesk merge ftjob-nomerge"):
        resolve_model("ftjob-nomerge")
    with pytest.raises(CommandError, match="tunedesk merge ftjob-zzz"):
        resolve_model("ftjob-zzz")
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct").path == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(CommandError, match="no such model"):
        resolve_model("not-a-thing")


def test_registry_from_settings_serves_base_and_adapters(tmp_path):
    base = _model_dir(tmp_path / "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 32}))
    s = ServeSettings(model=str(base), served_model_name="assistant", loras=[f"faq={adapter}"])
    registry = build_registry(s)
    assert [m.name for m in registry.list()] == ["assistant", "faq"]
    assert registry.get("faq").adapter == str(adapter.resolve())
    assert registry.get("faq").parent == "assistant" and registry.default == "assistant"
    with pytest.raises(CommandError, match="NAME=PATH"):
        build_registry(ServeSettings(model=str(base), loras=["no-equals"]))
    with pytest.raises(CommandError, match="not a LoRA adapter"):
        build_registry(ServeSettings(model=str(base), loras=[f"x={base}"]))


def test_vllm_command_line(tmp_path):
    base = _model_dir(
        tmp_path / "base", template="{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    launch, adapter = vllm_launch(tmp_path, base, rank=32)
    scratch = tmp_path / "scratch"
    cmd = launch.command()
    assert cmd[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", str(base.resolve())]

    def value(flag):
        return cmd[cmd.index(flag) + 1]

    assert value("--served-model-name") == "assistant"
    assert value("--host") == "127.0.0.1" and int(value("--port")) == launch.port
    assert value("--generation-config") == "vllm"
    assert value("--tensor-parallel-size") == "2"
    template = Path(value("--chat-template"))
    assert template.read_text() == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert "--enable-lora" in cmd and value("--lora-modules") == f"faq={adapter.resolve()}"
    assert value("--max-lora-rank") == "32"
    assert cmd[-2:] == ["--max-model-len", "4096"]
    assert "--tool-call-parser" not in cmd  # this template writes no tool calls
    # A template that writes <tool_call> blocks gets vLLM's parser for them, unless the
    # operator passes one.
    (base / "chat_template.jinja").write_text("{{ '<tool_call>' }}")
    tooled = dataclasses.replace(launch, chat_template=base / "chat_template.jinja")
    cmd = tooled.command()
    assert "--enable-auto-tool-choice" in cmd and value("--tool-call-parser") == "hermes"
    own = dataclasses.replace(tooled, extra_args=["--tool-call-parser=qwen3_xml"])
    assert own.command().count("--enable-auto-tool-choice") == 0
    # A saved chat_template.jinja is used as is; no template at all is refused.
    (base / "chat_template.jinja").write_text("saved")
    assert chat_template_file(str(base), scratch) == base / "chat_template.jinja"
    with pytest.raises(CommandError, match="no chat template"):
        chat_template_file(str(_model_dir(tmp_path / "bare", template=None)), scratch)


FAKE_VLLM = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class _FakeLaunch(VLLMLaunch):
    def command(self) -> list[str]:  # a stand-in child that answers /health like vLLM
        return [sys.executable, "-c", FAKE_VLLM, str(self.port)]


def test_supervisor_gates_on_health_and_restarts_a_crashed_child(tmp_path):
    launch = _FakeLaunch(model="m", served_name="m", port=free_port(), chat_template=tmp_path)

    async def run():
        sup = VLLMSupervisor(launch, startup_timeout_s=30)
        sup.start()
        try:
            await _until(lambda: sup.healthy)
            first = sup._proc.pid
            os.kill(first, signal.SIGKILL)  # crash
            await _until(lambda: not sup.healthy)
            await _until(lambda: sup.healthy and sup._proc.pid != first)
        finally:
            await sup.stop()
        assert sup._proc.poll() is not None  # stopped with the server

    asyncio.run(run())


async def _until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_fails_at_start_with_a_clear_message(tmp_path, capsys):
    base = _model_dir(tmp_path / "base")
    code = main(["serve", "--model", str(base), "--engine", "vllm", "--port", "0"])
    assert code == 2
    assert VLLM_MISSING in capsys.readouterr().err


def test_upstream_engine_needs_a_url(capsys):
    assert main(["serve", "--engine", "upstream"]) == 2
    assert "--upstream-url" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (pip install 'tunedesk[vllm]') and a GPU")
def test_vllm_engine_serves_the_tiny_model_with_the_training_template(
    pytestconfig, tmp_path_factory
):
    from openai import OpenAI
    from test_serve_support import build_tiny, cache_root, serve
    from transformers import AutoTokenizer

    from tunedesk.chat_format import encode_prompt, normalize_tools

    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    settings = ServeSettings(
        engine="vllm",
        model=str(tiny),
        served_model_name="tiny",
        vllm_args=["--gpu-memory-utilization", "0.3", "--max-model-len", "1024", "--enforce-eager"],
    )
    registry = build_registry(settings)
    messages = [{"role": "user", "content": "申购费是多少？"}]
    with serve(settings, registry, ready_timeout=900) as server:
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["tiny"]
        kw = dict(model="tiny", messages=messages, max_tokens=16, temperature=0)
        full = client.chat.completions.create(**kw)
        # vLLM rendered exactly the prompt training renders.
        tok = AutoTokenizer.from_pretrained(tiny)
        assert full.usage.prompt_tokens == len(encode_prompt(tok, messages))
        streamed = client.chat.completions.create(**kw, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == full.choices[0].message.content
        # The template's <tool_call> blocks come back as tool_calls (vLLM's hermes parser,
        # which the engine starts vLLM with), as on the embedded engine; the answer is held
        # to one such block so that the untrained model writes it.
        tools = [{"type": "function", "function": {"name": "fee", "parameters": {}}}]
        block = '<tool_call>\n{"name": "fee", "arguments": {"fund": "医药"}}\n</tool_call>'
        regex = "".join("\\" + c if c in set(r"\.^$*+?{}[]|()") else c for c in block)
        called = client.chat.completions.create(
            **{**kw, "max_tokens": 120},
            tools=tools,
            extra_body={"structured_outputs": {"regex": regex}},
        )
        [call] = called.choices[0].message.tool_calls
        assert called.choices[0].finish_reason == "tool_calls"
        assert (call.function.name, json.loads(call.function.arguments)) == (
            "fee",
            {"fund": "医药"},
        )
        assert called.usage.prompt_tokens == len(
            encode_prompt(tok, messages, normalize_tools(tools))
        )
