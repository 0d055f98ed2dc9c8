"""Shared pieces of the serve tests: the tiny model (built once, cached across runs), broken
variants of it, LoRA adapters for it, and servers started for real on 127.0.0.1.

The other test_serve_* modules import from here; the one test below checks the cache itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

TINY = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=1,
    num_key_value_heads=1,
    intermediate_size=128,
)


def _source_digest() -> str:
    import tunedesk.train.sample_data as sample_data
    import tunedesk.train.tiny_base as tiny_base

    h = hashlib.sha256(json.dumps(TINY, sort_keys=True).encode())
    for module in (tiny_base, sample_data):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def build_tiny(root: Path) -> Path:
    """The tiny Qwen2 model under `root`, rebuilt only when its recipe's source changes."""
    from tunedesk.train.sample_data import generate_pairs
    from tunedesk.train.tiny_base import TinyBaseConfig, build_tiny_base

    out = root / f"tiny-{_source_digest()}"
    if not (out / "model.safetensors").exists():
        pairs = generate_pairs(300)
        texts = [p["prompt"] for p in pairs] + [p["completion"] for p in pairs]
        build_tiny_base(out, texts, TinyBaseConfig(**TINY), log=lambda _: None)
    return out


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) A and B, saved as a trainer would save it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # init_lora_weights=False: B is random rather than zero, so the adapter changes outputs.
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=LORA_TARGETS,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def vllm_launch(tmp_path: Path, base: Path, rank: int):
    """The vLLM engine's launch for `base` served as "assistant", with a LoRA adapter "faq" of
    `rank`, tensor parallel size 2 and a passed-through flag: what the command-line tests
    check. Returns the launch and the adapter folder; its scratch folder is tmp_path/scratch."""
    from tunedesk.serve.engines.vllm import launch_for
    from tunedesk.serve.model_ref import build_registry
    from tunedesk.serve.settings import ServeSettings

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": rank}))
    settings = ServeSettings(
        model=str(base),
        served_model_name="assistant",
        loras=[f"faq={adapter}"],
        tensor_parallel_size=2,
        vllm_args="--max-model-len 4096",
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return launch_for(build_registry(settings), settings, scratch), adapter


def cache_root(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("tunedesk-serve"))
    return tmp_path_factory.mktemp("tunedesk-serve")


def nan_model(base: Path, out: Path) -> Path:
    """Same model with NaN in its final norm: loads fine, every forward yields NaN logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def corrupt_model(base: Path, out: Path) -> Path:
    """Same folder with the weight file cut short: loading it fails."""
    shutil.copytree(base, out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return out


def options_model(base: Path, out: Path) -> Path:
    """Same weights under a template that also reads `documents`, `reasoning_effort` and
    `enable_thinking` (as Qwen3's does: an empty think block when thinking is off), for the
    request options that only reach a template that reads them."""
    from tunedesk.chat_format import CHATML_TEMPLATE

    shutil.copytree(base, out, dirs_exist_ok=True)
    loop = "{% for message in messages %}"
    ending = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    assert loop in CHATML_TEMPLATE and CHATML_TEMPLATE.endswith(ending)
    template = (
        CHATML_TEMPLATE.removesuffix(ending).replace(
            loop,
            "{% if reasoning_effort %}<|im_start|>system\nReasoning: {{ reasoning_effort }}"
            "<|im_end|>\n{% endif %}"
            "{% for doc in documents or [] %}<|im_start|>system\n{{ doc.title }}: "
            "{{ doc.text }}<|im_end|>\n{% endfor %}" + loop,
            1,
        )
        + "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>"
        "\n\n{% endif %}{% endif %}"
    )
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


@contextmanager
def serve(settings, registry, engine=None, keys=None, ready_timeout=120):
    """A real uvicorn server in a thread, ready (default model loaded) when yielded."""
    from tunedesk.serve.app import create_app
    from tunedesk.serve.engines.factory import build_engine
    from tunedesk.serve.testing import ServerThread

    engine = engine or build_engine(settings, registry)
    with ServerThread(create_app(settings, engine, keys=keys)) as server:
        server.wait_ready(timeout=ready_timeout)
        yield server


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name or (want and key == f"{name}{{{want}}}"):
            return float(value)
    return 0.0


def sse_events(raw: bytes) -> list[str]:
    return [
        line[len("data: ") :]
        for line in raw.decode("utf-8").split("\n\n")
        if line.startswith("data: ")
    ]


def test_tiny_model_is_cached(pytestconfig, tmp_path_factory):
    root = cache_root(pytestconfig, tmp_path_factory)
    first = build_tiny(root)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert build_tiny(root) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert (first / "chat_template.jinja").exists() or (first / "tokenizer_config.json").exists()
