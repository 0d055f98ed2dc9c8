"""`TrainConfig`: every knob of a (Q)LoRA fine-tuning run, one documented field each.

Loaded with `tunedesk.config.load_config(TrainConfig, "configs/tiny-cpu.yaml", ["--lr=1e-4"])`;
`validate()` checks the values that types alone can't (ranges, combinations) and names the
field and its flag in every error. No heavy imports here: the CLI and the job store read
configs without loading torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tunedesk.config import ConfigError

# Where the shipped recipes live (configs/ at the repository root, beside train/).
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "tiny-cpu.yaml"


@dataclass
class TrainConfig:
    """A QLoRA / LoRA supervised fine-tuning run on prepared chat data."""

    # --- model ---------------------------------------------------------------------------------
    base_model: str = "models/tiny-base"
    """Base model: a local folder (relative paths are read from the workspace root) or a
    Hugging Face hub id such as Qwen/Qwen2.5-1.5B-Instruct. Its tokenizer must have a chat
    template."""
    quantization: Literal["nf4", "none"] = "nf4"
    """nf4: QLoRA, the frozen base is loaded in 4-bit NormalFloat (bitsandbytes). none: plain
    LoRA on the full-precision base."""
    double_quant: bool = True
    """QLoRA double quantization: also quantize the 4-bit blocks' scales (~0.4 bit/param saved)."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the matmuls (and of the unquantized base). auto: bfloat16 on a CUDA GPU that
    supports it (else float16), float32 on CPU."""
    lora_r: int = 16
    """LoRA rank: the inner dimension of each adapter's low-rank update."""
    lora_alpha: int = 32
    """LoRA scaling numerator: updates are scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.05
    """Dropout on the adapters' input during training."""
    lora_target: str = "all-linear"
    """Modules that get adapters: all-linear (every linear layer but the output head, as in the
    QLoRA paper) or a comma-separated list of module names such as q_proj,v_proj."""
    train_embeddings: bool = False
    """Also train the token embeddings in full beside the adapters (and the output head: with
    tied embeddings they stay one matrix). For a small base whose vocabulary holds whole
    domain phrases, the answer's first token picks the whole reply and the LoRA-only head
    can't learn that choice (tiny demo, same data: held-out char-F1 0.21 without, 0.35 with). Costs
    vocab x hidden trainable parameters; vLLM can't serve such an adapter unmerged."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less memory, ~30% more compute."""

    # --- data ----------------------------------------------------------------------------------
    data_dir: str = "data/prepared"
    """Folder written by `tunedesk prepare` (train.jsonl, val.jsonl)."""
    train_file: str | None = None
    """Training split; default: DATA_DIR/train.jsonl."""
    val_file: str | None = None
    """Validation split; default: DATA_DIR/val.jsonl (evaluation is skipped if it is missing)."""
    max_seq_len: int = 512
    """Longest example in tokens. Longer examples are dropped (and counted), never truncated,
    so no answer is ever cut short."""

    # --- optimisation --------------------------------------------------------------------------
    batch_size: int = 16
    """Sequences per optimizer step, over all devices and accumulation micro-steps."""
    grad_accum: int = 1
    """Micro-steps per optimizer step: each forward pass sees batch_size / (grad_accum x
    number of processes) sequences."""
    epochs: float = 3.0
    """Passes over the training split (fractions allowed)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (caps epochs; the schedule is sized to it)."""
    lr: float = 2e-4
    """Peak learning rate of AdamW on the adapter weights."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up: cosine or linear to 0, or constant."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""

    # --- bookkeeping ---------------------------------------------------------------------------
    runs_dir: str = "runs"
    """Where jobs keep their folders (runs/<job id>/)."""
    log_every: int = 10
    """Log training metrics (loss, token and sequence accuracy, lr, tokens/s) every N steps."""
    eval_every: int = 50
    """Evaluate on the validation split every N steps (and always at the end; 0: only then)."""
    eval_batch_size: int | None = None
    """Sequences per evaluation forward pass; default: the training micro-batch size."""
    save_every: int = 50
    """Write a resumable checkpoint every N steps (0: never; a cancelled run still saves one)."""
    keep_last: int = 2
    """Keep only the newest N step checkpoints (best/ is kept as well)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations in a row without a better validation loss (0: off).
    When it stops a run, adapter/ holds the best checkpoint's weights."""
    seed: int = 0
    """Seeds adapter init, dropout and the data order: same seed, same run."""
    deterministic: bool = True
    """Use deterministic kernels (torch.use_deterministic_algorithms) so a resumed run
    reproduces an uninterrupted one; turn off on GPUs for a little speed."""
    num_threads: int | None = None
    """CPU threads for torch (default: torch's choice, usually the number of cores)."""

    def validate(self) -> None:
        """Check ranges and combinations; raise ConfigError naming the field and its flag."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name} {why}, got {getattr(self, name)!r} (set --{name}=...)")

        for name in (
            "lora_r",
            "lora_alpha",
            "max_seq_len",
            "batch_size",
            "grad_accum",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for name in ("eval_every", "save_every", "keep_last", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise bad(name, "must be 0 or more")
        if self.keep_last < 1 and self.save_every > 0:
            raise bad("keep_last", "must be at least 1 when save_every is set")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "must be in [0, 1)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise bad("warmup_ratio", "must be in [0, 1)")
        if not self.lr > 0:
            raise bad("lr", "must be positive")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be 0 or more")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", "must be 0 (off) or more")
        if not self.epochs > 0:
            raise bad("epochs", "must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", "must be at least 1 (or null for no cap)")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise bad("eval_batch_size", "must be at least 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise bad("num_threads", "must be at least 1")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum "
                f"({self.grad_accum}) (set --batch_size=... or --grad_accum=...)"
            )
        if self.early_stopping_patience and self.eval_every == 0:
            raise ConfigError(
                "early_stopping_patience needs periodic evaluation: set --eval_every=N "
                "(or --early_stopping_patience=0)"
            )
        if not self.base_model.strip():
            raise bad("base_model", "must name a model folder or hub id")
        if not self.lora_target.strip():
            raise bad("lora_target", "must be all-linear or a list of module names")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (what config.yaml in a job folder holds)."""
        return asdict(self)

    @property
    def target_modules(self) -> str | list[str]:
        """`lora_target` in the form peft's LoraConfig expects."""
        if self.lora_target.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.lora_target.split(",") if m.strip()]


def resolve_path(value: str | Path) -> Path:
    """A config path: absolute as given, relative ones from the workspace root (paths.home())."""
    from tunedesk import paths

    p = Path(value).expanduser()
    return p if p.is_absolute() else paths.home() / p


def dump_yaml(cfg: TrainConfig) -> str:
    """The config as YAML, fields in declaration order (for runs/<id>/config.yaml)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
