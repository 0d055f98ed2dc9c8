"""LoRA adapters served beside their base, and the vllm engine end to end without a GPU.

The transformers engine merges an adapter into its own copy of the base at load time; its
greedy answers must be the merged model's. The vllm engine is checked through everything
but vLLM itself: a stand-in `vllm` package on the child's path records the command line it
was given and serves it with tunedesk's transformers engine (the same OpenAI API, and it
honours `cache_salt` as vLLM does), so the supervisor, the command line (chat template,
generation config, LoRA modules) and the proxy all run for real. The real-vLLM run is the
gpu-marked test in test_serve_cli.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from test_serve_support import build_tiny, cache_root, make_adapter, serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunedesk.chat_format import encode_prompt
from tunedesk.serve.engines.factory import build_engine
from tunedesk.serve.model_ref import build_registry
from tunedesk.serve.settings import ServeSettings

MESSAGES = [{"role": "user", "content": "医药和消费有什么基金推荐的"}]
MAX_TOKENS = 12

FAKE_VLLM_MAIN = '''
"""Stand-in for `python -m vllm.entrypoints.cli.main serve MODEL ...` (tests only)."""
import json, os, sys

from tunedesk.cli import main

def run():
    argv = sys.argv[1:]
    with open(os.environ["FAKE_VLLM_RECORD"], "a", encoding="utf-8") as f:
        f.write(json.dumps(argv) + "\\n")
    assert argv[0] == "serve", argv
    options, loras, i = {}, [], 2
    while i < len(argv):
        if argv[i] == "--enable-lora":
            i += 1
        elif argv[i] == "--lora-modules":
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                loras.append(argv[i])
                i += 1
        else:
            options[argv[i]] = argv[i + 1]
            i += 2
    command = ["serve", "--model", argv[1], "--engine", "transformers", "--device", "cpu",
               "--cpu-threads", "1", "--host", options["--host"], "--port", options["--port"],
               "--served-model-name", options["--served-model-name"]]
    for spec in loras:
        command += ["--lora", spec]
    sys.exit(main(command))


# Guarded: the engine process tunedesk spawns imports this module again as its __main__.
if __name__ == "__main__":
    run()
'''


@pytest.fixture(scope="module")
def tiny(pytestconfig, tmp_path_factory) -> Path:
    return build_tiny(cache_root(pytestconfig, tmp_path_factory))


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    return make_adapter(tiny, tmp_path_factory.mktemp("adapter") / "faq", seed=0)


def _greedy(model: torch.nn.Module, tok, messages: list[dict]) -> str:
    ids = encode_prompt(tok, messages)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def expected(tiny, adapter) -> dict[str, str]:
    """Greedy answers of the base and of the base with the adapter merged, by transformers."""
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(tiny)
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    answers = {"tiny": _greedy(base, tok, MESSAGES)}
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    answers["faq"] = _greedy(merged, tok, MESSAGES)
    assert answers["faq"] != answers["tiny"]  # else the test below could not tell them apart
    return answers


def _ask(client: OpenAI, model: str, stream: bool = False):
    return client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=stream,
        extra_body={"ignore_eos": True},
    )


def _streamed_text(client: OpenAI, model: str) -> str:
    """The same question as `_ask`, streamed, its chunks joined."""
    return "".join(
        c.choices[0].delta.content or "" for c in _ask(client, model, stream=True) if c.choices
    )


def _check_both_models(client: OpenAI, expected: dict[str, str]) -> None:
    assert [m.id for m in client.models.list()] == ["tiny", "faq"]
    for name in ("tiny", "faq"):
        reply = _ask(client, name)
        assert reply.model == name
        assert reply.choices[0].message.content == expected[name]


def test_transformers_engine_serves_an_adapter_under_its_name(tiny, adapter, expected):
    settings = ServeSettings(model=str(tiny), served_model_name="tiny", loras=[f"faq={adapter}"])
    with serve(settings, build_registry(settings)) as server:
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
        _check_both_models(client, expected)


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch) -> Path:
    """A `vllm` package that is not vLLM, importable here and in the engine's child."""
    root = tmp_path / "fake-vllm"
    cli = root / "vllm" / "entrypoints" / "cli"
    cli.mkdir(parents=True)
    for folder in (root / "vllm", root / "vllm" / "entrypoints", cli):
        (folder / "__init__.py").write_text("")
    (cli / "main.py").write_text(FAKE_VLLM_MAIN)
    record = tmp_path / "vllm-argv.jsonl"
    monkeypatch.syspath_prepend(str(root))  # the engine checks that vllm is installed
    path = [str(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    return record


def _until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_vllm_engine_starts_proxies_and_restarts_its_child(fake_vllm, tiny, adapter, expected):
    settings = ServeSettings(
        engine="vllm",
        model=str(tiny),
        served_model_name="tiny",
        loras=[f"faq={adapter}"],
        vllm_startup_timeout_s=120,
    )
    registry = build_registry(settings)
    engine = build_engine(settings, registry)
    with serve(settings, registry, engine=engine, ready_timeout=120) as server:
        # What vLLM was told: the training chat template, our sampling defaults, the adapter.
        argv = json.loads(fake_vllm.read_text(encoding="utf-8").splitlines()[0])
        flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
        tok = AutoTokenizer.from_pretrained(tiny)
        assert Path(flag("--chat-template")).read_text(encoding="utf-8") == tok.chat_template
        assert flag("--generation-config") == "vllm"
        assert flag("--served-model-name") == "tiny"
        assert "--enable-lora" in argv and f"faq={adapter.resolve()}" in argv

        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
        _check_both_models(client, expected)
        full = _ask(client, "tiny")
        assert full.usage.prompt_tokens == len(encode_prompt(tok, MESSAGES))
        assert _streamed_text(client, "tiny") == full.choices[0].message.content

        # The child dies: /ready says so, the supervisor starts a new one, requests work again.
        supervisor = engine.supervisor
        first = supervisor._proc.pid
        os.killpg(first, signal.SIGKILL)
        ready = lambda: httpx.get(f"{server.url}/ready", timeout=5).status_code  # noqa: E731
        _until(lambda: ready() == 503)
        _until(lambda: ready() == 200 and supervisor._proc.pid != first, timeout=120)
        assert _ask(client, "faq").choices[0].message.content == expected["faq"]
        assert len(fake_vllm.read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="needs vLLM (pip install 'tunedesk[vllm]' on a GPU; a CPU build of vLLM runs it too)",
)
def test_real_vllm_serves_base_and_adapter_and_comes_back_after_a_crash(tiny, adapter):
    """The test above with vLLM itself behind the engine: the adapter through vLLM's LoRA
    support, streams, and a SIGKILLed vLLM restarted by the supervisor. vLLM's kernels need
    not give transformers' float32 answers token for token, so the answers are checked against
    each other: the adapter changes them, streaming does not."""
    settings = ServeSettings(
        engine="vllm",
        model=str(tiny),
        served_model_name="tiny",
        loras=[f"faq={adapter}"],
        vllm_startup_timeout_s=900,
        vllm_args=["--gpu-memory-utilization", "0.3", "--max-model-len", "1024", "--enforce-eager"],
    )
    registry = build_registry(settings)
    engine = build_engine(settings, registry)
    with serve(settings, registry, engine=engine, ready_timeout=900) as server:
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["tiny", "faq"]
        answers = {name: _ask(client, name) for name in ("tiny", "faq")}
        for name, reply in answers.items():
            assert reply.model == name and reply.usage.completion_tokens == MAX_TOKENS
        assert (
            answers["faq"].choices[0].message.content != answers["tiny"].choices[0].message.content
        )
        assert _streamed_text(client, "faq") == answers["faq"].choices[0].message.content

        supervisor = engine.supervisor
        first = supervisor._proc.pid
        os.killpg(first, signal.SIGKILL)
        ready = lambda: httpx.get(f"{server.url}/ready", timeout=5).status_code  # noqa: E731
        _until(lambda: ready() == 503)
        _until(lambda: ready() == 200 and supervisor._proc.pid != first, timeout=900)
        again = _ask(client, "faq").choices[0].message.content
        assert again == answers["faq"].choices[0].message.content


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or torch.cuda.is_available(),
    reason="token-for-token parity is a float32 check on vLLM's CPU build (make test-vllm-cpu); "
    "on a GPU vLLM runs its own bf16 kernels",
)
def test_vllm_answers_a_merged_model_token_for_token_as_the_transformers_engine(
    tiny, adapter, tmp_path
):
    """`tunedesk merge`'s output loads in vLLM, and vLLM, started as the engine starts it
    (training template, our sampling defaults), gives the embedded engine's greedy answers."""
    from tunedesk.cli import main

    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), "--base", str(tiny), "--out", str(merged)]) == 0
    questions = ["医药和消费有什么基金推荐的", "申购费是多少？", "定投怎么设置"]
    answers = {}
    for engine, extra in (("transformers", {}), ("vllm", {"vllm_startup_timeout_s": 900})):
        settings = ServeSettings(
            engine=engine,
            model=str(merged),
            served_model_name="ft",
            vllm_args=["--dtype", "float32", "--max-model-len", "1024"],
            **extra,
        )
        with serve(settings, build_registry(settings), ready_timeout=900) as server:
            client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)
            answers[engine] = [
                client.chat.completions.create(
                    model="ft",
                    messages=[{"role": "user", "content": q}],
                    max_tokens=24,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                for q in questions
            ]
    for ours, theirs in zip(answers["transformers"], answers["vllm"], strict=True):
        assert theirs.usage.prompt_tokens == ours.usage.prompt_tokens
        assert theirs.choices[0].message.content == ours.choices[0].message.content
