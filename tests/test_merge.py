"""Merging a LoRA / QLoRA adapter into its base model (train/merge.py, train/commands_merge.py).

Everything runs on the suite's shared tiny offline base (conftest's `tiny_base`, ~0.2M
parameters), so the real transformers/peft code paths are exercised in seconds on a CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_serve_support import LORA_TARGETS, make_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunedesk import cli
from tunedesk.chat_format import CHATML_TEMPLATE, encode_conversation, encode_prompt
from tunedesk.train.merge import (
    BUILTIN_PROMPTS,
    MergeError,
    MergeParityError,
    check_parity,
    merge_adapter,
    resolve_dtype,
)
from tunedesk.train.sample_data import generate_pairs
from tunedesk.train.tiny_base import IM_END


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models are tiny: intra-op threads cost more in synchronisation than they save, and
    # on a shared 2-core machine oversubscription makes every forward ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "adapter", seed=0)


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("merged") / "model"
    return out, merge_adapter(str(adapter), out, dtype="float32")


def _prompt_logits(model_dir: Path, messages: list[dict]) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([encode_prompt(tokenizer, messages)])).logits[0]


def _lora_b_norm(adapter_dir: Path) -> float:
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        names = f.keys()  # a safetensors handle is not iterable itself
        return sum(float(f.get_tensor(k).abs().sum()) for k in names if "lora_B" in k)


# ----------------------------------------------------------------------------------------------
# The merged folder


def test_merged_folder_is_a_standalone_model(merged, tiny_base):
    out, report = merged
    assert (out / "model.safetensors").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = f.keys()  # a safetensors handle is not iterable itself
    assert not [k for k in names if "lora" in k]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    gen = json.loads((out / "generation_config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert im_end in gen["eos_token_id"]
    assert len(gen["eos_token_id"]) == len(set(gen["eos_token_id"]))
    assert gen["pad_token_id"] == tokenizer.pad_token_id

    card = json.loads((out / "tunedesk_merge.json").read_text(encoding="utf-8"))
    assert card["base"] == str(tiny_base.resolve())
    assert card["dtype"] == "float32"
    assert card["parity"]["passed"] is True
    assert card["parity_prompt_source"] == "built-in"
    # Nothing but the finished folder is left beside it.
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_parity_report_is_within_fp32_tolerance(merged):
    _, report = merged
    parity = report["parity"]
    print(json.dumps({k: v for k, v in parity.items() if k != "per_prompt"}, indent=1))
    assert parity["prompts"] == len(BUILTIN_PROMPTS)
    assert parity["tolerance"] == pytest.approx(1e-3 * max(1.0, parity["logit_scale"]))
    assert parity["max_abs_logit_diff"] < parity["tolerance"]
    assert parity["greedy_identical"] is True
    assert parity["greedy_near_tie_flips"] == 0
    assert all(row["generated_tokens"] > 0 for row in parity["per_prompt"])


def test_the_adapter_changed_the_model(merged, tiny_base):
    out, report = merged
    messages = BUILTIN_PROMPTS[0]
    diff = float((_prompt_logits(out, messages) - _prompt_logits(tiny_base, messages)).abs().max())
    assert diff > 100 * report["parity"]["tolerance"]


def test_check_parity_passes_a_model_against_itself_and_rejects_a_different_one(merged, tiny_base):
    out, _ = merged
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base_model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    prompts = BUILTIN_PROMPTS[:2]

    same = check_parity(merged_model, merged_model, tokenizer, prompts, max_new_tokens=8)
    assert same["max_abs_logit_diff"] == 0.0
    assert same["greedy_identical"]

    # The plain base stands in for a merge that lost the adapter.
    with pytest.raises(MergeParityError) as info:
        check_parity(merged_model, base_model, tokenizer, prompts, max_new_tokens=8)
    report = info.value.report
    assert report["passed"] is False
    assert report["max_abs_logit_diff"] > report["tolerance"]
    assert "max |logit diff|" in str(info.value)


def test_failed_parity_leaves_the_previous_output_untouched(adapter, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("previous good merge")
    # Zero tolerance demands bit-identical logits, which a merge (a different summation
    # order) never gives: a genuine parity failure, raised before the atomic swap.
    with pytest.raises(MergeParityError, match="tolerance 0"):
        merge_adapter(str(adapter), out, dtype="float32", atol=0.0)
    assert (out / "keep.txt").read_text() == "previous good merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_resolve_dtype():
    expected = "bfloat16" if torch.cuda.is_available() else "float32"
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        expected = "float32"
    assert resolve_dtype("auto") == expected
    assert resolve_dtype("float16") == "float16"
    with pytest.raises(MergeError):
        resolve_dtype("int4")


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_merges_an_adapter_folder(adapter, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    assert cli.main(["merge", str(adapter), "--out", str(out), "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "parity on 4 prompts (float32)" in printed
    assert "identical 4/4" in printed
    assert (out / "model.safetensors").is_file()


def test_cli_merges_a_job_into_models_with_held_out_prompts(adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEDESK_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "runs" / "job-7"
    shutil.copytree(adapter, job / "adapter")
    data = tmp_path / "data" / "prepared"
    data.mkdir(parents=True)
    (job / "config.yaml").write_text(
        "base_model: ignored-adapter-names-it\ndata_dir: data/prepared\n"
    )
    (job / "status.json").write_text('{"state": "done"}')

    def row(question: str) -> str:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": "好"}]
        return json.dumps({"messages": messages}, ensure_ascii=False) + "\n"

    (data / "test.jsonl").write_text(row("基金A的管理费是多少？") + row("怎么定投？"))
    (data / "val.jsonl").write_text(row("赎回费怎么算？") + row("什么是R3？") + row("X？"))

    assert cli.main(["merge", "job-7", "--dtype", "float32"]) == 0
    card = json.loads((tmp_path / "models" / "job-7-merged" / "tunedesk_merge.json").read_text())
    assert card["job_id"] == "job-7"
    assert card["job_status"] == {"state": "done"}
    assert card["parity"]["prompts"] == 4  # two from test.jsonl, then two from val.jsonl
    assert card["parity_prompt_source"].endswith("test.jsonl, " + str(data / "val.jsonl"))


def test_cli_errors_are_one_line_and_non_zero(adapter, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUNEDESK_HOME", str(tmp_path))
    assert cli.main(["merge", "no-such-job"]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    # A bare adapter has no job id to name a default output after.
    assert cli.main(["merge", str(adapter)]) == 2
    assert "pass --out" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# QLoRA: an adapter trained on a 4-bit base merges into the full-precision base


def test_qlora_adapter_merges_into_the_fp32_base(tiny_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=quant)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    )
    # A few real optimiser steps on fund Q&A, so B moves away from its zero init.
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for pair in generate_pairs(6, seed=3):
        messages = [
            {"role": "user", "content": pair["prompt"]},
            {"role": "assistant", "content": pair["completion"]},
        ]
        enc = encode_conversation(tokenizer, messages, max_length=96)
        loss = model(
            input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])
        ).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    adapter = tmp_path / "qlora-adapter"
    model.save_pretrained(adapter)
    assert _lora_b_norm(adapter) > 0

    out = tmp_path / "merged"
    report = merge_adapter(str(adapter), out, dtype="float32")
    parity = report["parity"]
    assert parity["passed"] and parity["greedy_identical"]
    assert parity["max_abs_logit_diff"] < parity["tolerance"]
    assert report["tokenizer_from"] == "base"  # this adapter folder carries no tokenizer
    merged_model = AutoModelForCausalLM.from_pretrained(out)
    assert merged_model.dtype == torch.float32
    assert getattr(merged_model.config, "quantization_config", None) is None
    messages = BUILTIN_PROMPTS[1]
    diff = (_prompt_logits(out, messages) - _prompt_logits(tiny_base, messages)).abs().max()
    assert float(diff) > parity["tolerance"]

    # A base stored in 4 bits is refused rather than merged into.
    quantized = tmp_path / "base-4bit"
    AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=quant).save_pretrained(
        quantized
    )
    with pytest.raises(MergeError, match="quantised"):
        merge_adapter(str(adapter), tmp_path / "never", base=str(quantized), parity=False)
    assert not (tmp_path / "never").exists()


# An adapter that trains its own copy of a tied output head (peft modules_to_save=["lm_head"]):
# the merged model must keep that head apart from the input embeddings.


def test_adapter_with_its_own_head_unties_it_in_the_merged_model(tiny_base, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=LORA_TARGETS,
        modules_to_save=["lm_head"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # what training the head would do: it moves away from the embeddings
        head = peft_model.base_model.model.lm_head.modules_to_save["default"]
        head.weight.add_(0.5 * torch.randn_like(head.weight))
    adapter = tmp_path / "head-adapter"
    peft_model.save_pretrained(adapter)

    out = tmp_path / "merged"
    report = merge_adapter(str(adapter), out, dtype="float32")
    assert report["parity"]["passed"] and report["parity"]["greedy_identical"]
    merged_model = AutoModelForCausalLM.from_pretrained(out)
    assert not merged_model.config.tie_word_embeddings
    embed = merged_model.get_input_embeddings().weight
    assert not torch.equal(merged_model.get_output_embeddings().weight, embed)
    # The input side is the base's, untouched.
    base_embed = AutoModelForCausalLM.from_pretrained(tiny_base).get_input_embeddings().weight
    assert torch.equal(embed, base_embed)


def test_tunedesk_drops_bitsandbytes_warning_about_a_hub_kernel_it_never_runs():
    """On a CPU with AVX512-BF16, importing peft (merge, adapters, training) makes bitsandbytes
    warn that it could not fetch an inference kernel from the hub. With tunedesk imported
    first, as every tunedesk command and process does, the line is gone."""
    import subprocess
    import sys

    def stderr_of(code: str) -> str:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stderr

    if "Failed to load CPU gemm_4bit_forward" not in stderr_of("import peft"):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not warn here")
    assert "Failed to load" not in stderr_of("import tunedesk, peft")
