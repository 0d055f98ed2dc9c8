"""The lean forward (fastpath.py) and its slab cache against the transformers forward.

The served numbers must be the model's numbers: logits are compared with `model(...)` on
Qwen2- and Llama-shaped random models (q/k/v biases or not, grouped-query attention, a RoPE
scaling variant), through prefill with left padding, decode steps, rows joining and leaving,
and the slab's relayouts forced by tiny capacities.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from tunedesk.serve.engines.local import fastpath
from tunedesk.serve.engines.local.fastpath import LeanDecoder, unsupported_reason
from tunedesk.serve.engines.local.slab import SlabCache

SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
)


def _model(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    # Random init is near-uniform; larger weights make logits differ in a way a bug would show.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model


CONFIGS = {
    "qwen2-bias-gqa": lambda: Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
    "llama-mha-scaled-rope": lambda: LlamaConfig(
        **SMALL,
        num_key_value_heads=4,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "llama-mqa-bias": lambda: LlamaConfig(**SMALL, num_key_value_heads=1, attention_bias=True),
}


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one [n, longest] batch, and the mask of their real tokens."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _reference_last_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_match_the_transformers_forward(name):
    model = _model(CONFIGS[name]())
    assert unsupported_reason(model) is None
    reference = _model(CONFIGS[name]())  # untouched by the fusing
    lean = LeanDecoder(model)
    rng = random.Random(1)
    prompts = [[rng.randrange(300) for _ in range(n)] for n in (5, 17, 1, 9)]
    ids, mask = _left_pad(prompts)
    slab = lean.new_slab(torch.device("cpu"))
    with torch.inference_mode():
        logits, cache = lean.prefill(ids, (mask.cumsum(-1) - 1).clamp(min=0), mask)
        slab.join(cache, mask)
        seqs = [list(p) for p in prompts]
        for _step in range(6):
            for i, seq in enumerate(seqs):
                torch.testing.assert_close(
                    logits[i], _reference_last_logits(reference, seq), atol=1e-4, rtol=1e-4
                )
            nxt = logits.argmax(-1)
            for seq, t in zip(seqs, nxt.tolist(), strict=True):
                seq.append(t)
            positions = torch.tensor([[len(s) - 1] for s in seqs])
            logits = lean.decode(nxt[:, None], positions, slab)


def test_fused_weights_are_shared_not_copied():
    model = _model(CONFIGS["qwen2-bias-gqa"]())
    before = sum(p.numel() for p in model.parameters())
    lean = LeanDecoder(model)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() != lean.layers[0].qkv_t.data_ptr()
    for module, fused in [
        (attn.q_proj, lean.layers[0].qkv_t),
        (attn.o_proj, lean.layers[0].o_t),
        (model.model.layers[0].mlp.up_proj, lean.layers[0].gate_up_t),
    ]:
        assert module.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == before
    # A tied head stays tied (the embedding is row-major for lookups); a small one gets a
    # transposed copy for the output projection.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert lean.lm_head_t is not None and lean.lm_head_t.is_contiguous()
    torch.testing.assert_close(lean.lm_head_t, model.lm_head.weight.t())
    # An untied head is transposed in place, like the layers.
    untied = _model(CONFIGS["llama-mha-scaled-rope"]())
    lean = LeanDecoder(untied)
    for held in (untied.lm_head.weight, lean.lm_head):  # no row-major copy kept anywhere
        assert held.untyped_storage().data_ptr() == lean.lm_head_t.untyped_storage().data_ptr()


def test_a_big_tied_head_is_not_copied_and_still_exact(monkeypatch):
    monkeypatch.setattr(fastpath, "TIED_HEAD_COPY_LIMIT", 0)
    model = _model(CONFIGS["qwen2-bias-gqa"]())
    reference = _model(CONFIGS["qwen2-bias-gqa"]())
    lean = LeanDecoder(model)
    assert lean.lm_head_t is None
    slab = lean.new_slab(torch.device("cpu"))
    with torch.inference_mode():
        prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
        logits = _join(lean, slab, prompts)
        for lg, p in zip(logits, prompts, strict=True):
            torch.testing.assert_close(
                lg, _reference_last_logits(reference, p), atol=1e-4, rtol=1e-4
            )


def test_rows_join_and_leave_through_relayouts_and_stay_exact():
    """A random schedule of joins, steps and removals on a slab with tiny capacities (so the
    window moves, widens and the buffers grow many times); every row's logits at every step
    equal the transformers forward over that row's tokens alone."""
    model = _model(CONFIGS["qwen2-bias-gqa"]())
    reference = _model(CONFIGS["qwen2-bias-gqa"]())
    lean = LeanDecoder(model)
    slab = SlabCache(2, 2, 16, torch.float32, torch.device("cpu"), row_quantum=2, col_quantum=8)
    rng = random.Random(7)
    rows: list[dict] = []  # per row: tokens so far, steps left, logits
    relayouts = 0
    with torch.inference_mode():
        for _ in range(60):
            if not rows or rng.random() < 0.3:
                prompts = [[rng.randrange(300) for _ in range(rng.randint(1, 20))]]
                prompts += [[rng.randrange(300) for _ in range(rng.randint(1, 20))]] * rng.randint(
                    0, 1
                )
                ids, mask = _left_pad(prompts)
                cap = (slab.row_cap, slab.col_cap)
                logits, cache = lean.prefill(ids, (mask.cumsum(-1) - 1).clamp(min=0), mask)
                slab.join(cache, mask)
                relayouts += (slab.row_cap, slab.col_cap) != cap
                for i, p in enumerate(prompts):
                    rows.append(
                        {"tokens": list(p), "left": rng.randint(1, 12), "logits": logits[i]}
                    )
            for row in rows:
                torch.testing.assert_close(
                    row["logits"],
                    _reference_last_logits(reference, row["tokens"]),
                    atol=1e-4,
                    rtol=1e-4,
                )
            dead = [i for i, r in enumerate(rows) if r["left"] == 0]
            if dead:
                order = slab.remove(dead)
                rows = [rows[i] for i in order]
            if not rows:
                continue
            nxt = [int(r["logits"].argmax()) for r in rows]
            for r, t in zip(rows, nxt, strict=True):
                r["tokens"].append(t)
                r["left"] -= 1
            cap = slab.col_cap
            logits = lean.decode(
                torch.tensor(nxt)[:, None],
                torch.tensor([[len(r["tokens"]) - 1] for r in rows]),
                slab,
            )
            relayouts += slab.col_cap != cap
            for r, lg in zip(rows, logits, strict=True):
                r["logits"] = lg
            assert slab.rows == len(rows)
    assert relayouts >= 3  # the schedule really exercised growth


def _join(lean, slab, prompts):
    ids, mask = _left_pad(prompts)
    logits, cache = lean.prefill(ids, (mask.cumsum(-1) - 1).clamp(min=0), mask)
    slab.join(cache, mask)
    return logits


def _step(lean, slab, seqs):
    nxt = [s[-1] for s in seqs]
    positions = torch.tensor([[len(s) - 1] for s in seqs])
    return lean.decode(torch.tensor(nxt)[:, None], positions, slab)


def _poison(slab, rows, cols):
    for buf in slab.keys + slab.values:
        buf[rows, :, cols] = float("nan")


def test_stale_nan_cells_never_reach_a_live_row():
    """A row whose model output diverged leaves NaN in the buffers; masked cells are multiplied
    by a zero weight, and NaN * 0 is NaN, so every cell entering a row's window is zeroed."""
    model = _model(CONFIGS["qwen2-bias-gqa"]())
    reference = _model(CONFIGS["qwen2-bias-gqa"]())
    lean = LeanDecoder(model)
    with torch.inference_mode():
        # 1. A newcomer takes the place of a diverged row, with a shorter prompt than the window.
        slab = lean.new_slab(torch.device("cpu"))
        p = [5, 6, 7, 8, 9, 10]
        _join(lean, slab, [p, p])
        _poison(slab, 1, slice(None))
        assert slab.remove([1]) == [0]
        short = [3, 4]
        _join(lean, slab, [short])
        logits = _step(lean, slab, [p + [11], short + [12]])
        for lg, seq in zip(logits, [p + [11], short + [12]], strict=True):
            torch.testing.assert_close(
                lg, _reference_last_logits(reference, seq), atol=1e-4, rtol=1e-4
            )

        # 2. The window widens to the left over cells a surviving row never wrote.
        slab = lean.new_slab(torch.device("cpu"))
        a = [1, 2]
        _join(lean, slab, [a])
        for t in range(10):
            a.append(20 + t)
            _step(lean, slab, [a])
        b = [7, 8, 9]
        _join(lean, slab, [b])
        assert slab.remove([0]) == [1]
        assert slab.start > 0
        _poison(slab, slice(None), slice(0, slab.start))
        c = [4, 5, 6, 7, 8, 9, 10]
        _join(lean, slab, [c])
        seqs = [b + [13], c + [14]]
        logits = _step(lean, slab, seqs)
    assert torch.isfinite(logits).all()
    for lg, seq in zip(logits, seqs, strict=True):
        torch.testing.assert_close(lg, _reference_last_logits(reference, seq), atol=1e-4, rtol=1e-4)


def test_window_moved_back_in_place_leaves_nothing_stale_behind(monkeypatch):
    """When the window reaches the buffers' end it moves back to column 0 in the same buffers
    (fresh ones fault their pages in: a stall); the cells it leaves behind, poisoned here,
    must be written or cleared before any live row reads them. Short-lived rows keep the
    window narrow, so it moves many times without the buffers growing."""
    model = _model(CONFIGS["qwen2-bias-gqa"]())
    reference = _model(CONFIGS["qwen2-bias-gqa"]())
    lean = LeanDecoder(model)
    slab = SlabCache(2, 2, 16, torch.float32, torch.device("cpu"), row_quantum=4, col_quantum=16)
    rng = random.Random(3)
    rows: list[dict] = []
    moves = []
    move = SlabCache._move_window
    monkeypatch.setattr(
        SlabCache, "_move_window", lambda self, lead: [moves.append(lead), move(self, lead)]
    )
    with torch.inference_mode():
        _join(lean, slab, [[1, 2, 3]])
        rows.append({"tokens": [1, 2, 3], "left": 4})
        buffers = [*slab.keys, *slab.values]
        for _ in range(80):
            # Everything outside the live window is garbage from here on.
            _poison(slab, slice(None), slice(slab.end, None))
            _poison(slab, slice(slab.rows, None), slice(None))
            dead = [i for i, r in enumerate(rows) if r["left"] == 0]
            if dead:
                rows = [rows[i] for i in slab.remove(dead)]
            if len(rows) < 3:
                prompt = [rng.randrange(300) for _ in range(rng.randint(1, 3))]
                _join(lean, slab, [prompt])
                rows.append({"tokens": prompt, "left": rng.randint(2, 5)})
            for r in rows:
                r["tokens"].append(rng.randrange(300))
                r["left"] -= 1
            logits = _step(lean, slab, [r["tokens"] for r in rows])
            for lg, r in zip(logits, rows, strict=True):
                torch.testing.assert_close(
                    lg, _reference_last_logits(reference, r["tokens"]), atol=1e-4, rtol=1e-4
                )
        assert all(a is b for a, b in zip([*slab.keys, *slab.values], buffers, strict=True))
    assert len(moves) >= 3


def test_models_it_cannot_reproduce_are_refused_with_a_reason():
    sliding = _model(MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=4))
    assert unsupported_reason(sliding) == "sliding-window attention"
    gelu = _model(LlamaConfig(**SMALL, num_key_value_heads=2, hidden_act="gelu"))
    assert unsupported_reason(gelu) == "activation 'gelu'"
    from transformers import GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    )
    assert unsupported_reason(gpt2) == "model type 'gpt2'"
    mistral = _model(MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None))
    assert unsupported_reason(mistral) is None
