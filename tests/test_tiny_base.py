"""The embedded tiny base: offline, standard Hugging Face format, deterministic."""

from __future__ import annotations

import hashlib
import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from tunedesk.train.sample_data import domain_corpus, generate_pairs
from tunedesk.train.tiny_base import TinyBaseConfig, build_tiny_base

SMALL = dict(
    vocab_size=600,
    hidden_size=64,
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
    intermediate_size=128,
)


def _texts():
    pairs = generate_pairs(300, seed=5)
    return [p["prompt"] for p in pairs] + [p["completion"] for p in pairs]


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_model_and_tokenizer(tmp_path):
    a = build_tiny_base(tmp_path / "a", _texts(), TinyBaseConfig(**SMALL), log=lambda _: None)
    b = build_tiny_base(tmp_path / "b", _texts(), TinyBaseConfig(**SMALL), log=lambda _: None)
    c = build_tiny_base(
        tmp_path / "c", _texts(), TinyBaseConfig(**SMALL, seed=1), log=lambda _: None
    )
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_files_are_standard_and_special_tokens_right(tmp_path):
    out = build_tiny_base(tmp_path / "m", _texts(), TinyBaseConfig(**SMALL), log=lambda _: None)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size >= len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # Chinese and English text round-trip through the byte-level BPE.
    text = "申购费1.5%，T+1到账。Fund fees: 0.15% p.a."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_pretraining_lowers_loss(tmp_path):
    cfg = TinyBaseConfig(**SMALL, pretrain_steps=12, pretrain_seq_len=64, pretrain_batch_size=8)
    out = build_tiny_base(
        tmp_path / "p", _texts(), cfg, pretrain_texts=domain_corpus(200), log=lambda _: None
    )
    card = json.loads((out / "tunedesk_base.json").read_text())
    assert card["pretrain_loss_last"] < card["pretrain_loss_first"] - 0.5
