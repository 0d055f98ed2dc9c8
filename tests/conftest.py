"""Shared fixtures: a tiny offline base model and prepared sample data, built once per session.

`tiny_base` is a small Qwen2-architecture model (hidden 64, 2 layers, ~2k vocabulary) with the
ChatML template, built from the sample data's own text (random init, no pre-training);
`prepared_dir` holds train/val/test.jsonl from `tunedesk prepare` on sample fund Q&A pairs.
Both live in a session temp folder and are never modified by tests.
"""

from __future__ import annotations

import os

# Before anything loads torch: OpenMP threads that spin while waiting make every test several
# times slower on a busy machine (see tunedesk.train.loop).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TEST_PAIRS = 400  # enough for prepare's minimum and a few dozen training steps


@pytest.fixture(scope="session")
def sample_pairs() -> list[dict]:
    """Deterministic fund Q&A prompt/completion pairs (the sample generator, seed 0)."""
    from tunedesk.train.sample_data import generate_pairs

    return generate_pairs(TEST_PAIRS, seed=0)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, sample_pairs: list[dict]) -> Path:
    """Path of a small random-init Qwen2 model folder with a ChatML tokenizer."""
    from tunedesk.train.sample_data import domain_corpus
    from tunedesk.train.tiny_base import TinyBaseConfig, build_tiny_base

    cfg = TinyBaseConfig(
        vocab_size=2000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    # As `tunedesk base build` does: the tokenizer sees domain prose and the Q&A texts.
    texts = domain_corpus(n_docs=200, seed=1)
    texts += [p["prompt"] for p in sample_pairs] + [p["completion"] for p in sample_pairs]
    out = tmp_path_factory.mktemp("tiny-base") / "tiny-base"
    return build_tiny_base(out, texts, cfg, log=lambda _m: None)


@pytest.fixture(scope="session")
def prepared_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, sample_pairs: list[dict]
) -> Path:
    """Folder with train.jsonl / val.jsonl / test.jsonl prepared from the sample pairs."""
    from transformers import AutoTokenizer

    from tunedesk.io import atomic_write_jsonl
    from tunedesk.train.prepare.pipeline import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("data")
    raw = root / "fund_qa.jsonl"
    atomic_write_jsonl(raw, sample_pairs)
    out = root / "prepared"
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    prepare([raw], out, PrepareOptions(seed=0), tokenizer=tokenizer, tokenizer_name=str(tiny_base))
    assert (out / "train.jsonl").is_file() and (out / "val.jsonl").is_file()
    return out
