"""The embedded default base model: a tiny Qwen2-architecture LM built entirely offline.

Nothing is downloaded. A byte-level BPE tokenizer is trained on local text, a small Qwen2
causal LM is initialised from a seed and, optionally, briefly pre-trained on a local domain
corpus so that fine-tuning has language to build on. The result is a standard Hugging Face
folder (safetensors, tokenizer.json, chat template, generation_config.json) that
`AutoModelForCausalLM` / `AutoTokenizer` and vLLM load like any hub model.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tunedesk.chat_format import CHATML_TEMPLATE
from tunedesk.io import atomic_dir

# Qwen2's pre-tokenizer split: words, single digits (so numbers and fees tokenise digit by
# digit), punctuation runs and whitespace, then byte-level encoding of each piece.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]


@dataclass
class TinyBaseConfig:
    """Shape and build settings of the tiny base model."""

    vocab_size: int = 6000
    """Target BPE vocabulary size (special tokens included); the embedding is padded to 64."""
    hidden_size: int = 192
    """Model width. Head dim is hidden_size / num_attention_heads (64 by default, vLLM-friendly)."""
    num_hidden_layers: int = 4
    """Number of transformer blocks."""
    num_attention_heads: int = 3
    """Query heads."""
    num_key_value_heads: int = 1
    """Key/value heads (grouped-query attention, as in Qwen2)."""
    intermediate_size: int = 512
    """MLP width."""
    max_position_embeddings: int = 2048
    """Longest sequence the model accepts."""
    seed: int = 0
    """Seeds the tokenizer corpus order, the weight init and pre-training: same seed, same model."""
    pretrain_steps: int = 0
    """Steps of full-parameter LM pre-training on the local corpus (0: random init only)."""
    pretrain_seq_len: int = 256
    """Tokens per pre-training sequence."""
    pretrain_batch_size: int = 16
    """Sequences per pre-training step."""
    pretrain_lr: float = 3e-3
    """Peak learning rate of pre-training (cosine decay after 10% warm-up)."""


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Train a byte-level BPE tokenizer with ChatML special tokens; returns a transformers
    fast tokenizer with the chat template, eos `<|im_end|>` and pad `<|endoftext|>` set."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # NFC, as Qwen2's tokenizer does: transformers' Qwen2Tokenizer re-adds it on load, so the
    # saved tokenizer.json must carry it for every loader to tokenise identically.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _padded(n: int, multiple: int = 64) -> int:
    return int(math.ceil(n / multiple) * multiple)


def init_model(cfg: TinyBaseConfig, tokenizer):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=_padded(len(tokenizer)),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    return Qwen2ForCausalLM(config)


def _pack_corpus(tokenizer, texts: Sequence[str], seq_len: int) -> list[list[int]]:
    """Concatenate documents, separated by `<|endoftext|>`, into fixed-length blocks."""
    sep = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(sep)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def pretrain(
    model,
    tokenizer,
    texts: Sequence[str],
    cfg: TinyBaseConfig,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Full-parameter next-token pre-training on `texts`; returns the loss per step."""
    import torch
    from tqdm import tqdm

    blocks = _pack_corpus(tokenizer, texts, cfg.pretrain_seq_len)
    if not blocks:
        raise ValueError("pre-training corpus is shorter than one sequence")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.1)
    warmup = max(1, cfg.pretrain_steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.pretrain_lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.pretrain_steps - warmup)
        return cfg.pretrain_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    order: list[int] = []
    losses: list[float] = []
    bar = tqdm(range(cfg.pretrain_steps), desc="pre-train tiny base", unit="step")
    for step in bar:
        if len(order) < cfg.pretrain_batch_size:
            fresh = list(range(len(blocks)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch_idx, order = order[: cfg.pretrain_batch_size], order[cfg.pretrain_batch_size :]
        batch = torch.tensor([blocks[i] for i in batch_idx], dtype=torch.long)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    if losses:
        log(f"pre-training: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    return losses


def build_tiny_base(
    out_dir: str | Path,
    tokenizer_texts: Sequence[str],
    cfg: TinyBaseConfig | None = None,
    pretrain_texts: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> Path:
    """Build the tiny base into `out_dir` (replaced atomically) and return its path."""
    import torch
    from transformers import GenerationConfig

    cfg = cfg or TinyBaseConfig()
    started = time.time()
    torch.manual_seed(cfg.seed)
    texts = list(tokenizer_texts)
    random.Random(cfg.seed).shuffle(texts)
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    model = init_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny base: {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
    losses: list[float] = []
    if cfg.pretrain_steps > 0:
        losses = pretrain(model, tokenizer, pretrain_texts, cfg, log=log)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=False, max_new_tokens=256
    )
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        card = {
            "tunedesk_tiny_base": asdict(cfg),
            "parameters": n_params,
            "pretrain_loss_first": losses[0] if losses else None,
            "pretrain_loss_last": losses[-1] if losses else None,
            "build_seconds": round(time.time() - started, 1),
        }
        (tmp / "tunedesk_base.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"tiny base written to {out_dir} in {time.time() - started:.1f}s")
    return out_dir
