"""The training loop: QLoRA / LoRA supervised fine-tuning, readable top to bottom.

`run_training(cfg, run_dir)` does, in order:

1. set up `accelerate` (one CPU or GPU here; `accelerate launch` runs the same code on several
   GPUs with DDP, or FSDP / DeepSpeed through an accelerate config), seeds, determinism;
2. tokenise the splits with the shared chat format (loss only on the assistant's tokens);
3. load the base (4-bit NF4 for QLoRA, full precision for LoRA) and add LoRA adapters;
4. build AdamW and a warm-up + cosine/linear/constant schedule;
5. on `resume`, restore adapter, optimizer, schedule, RNG states and data position from the
   newest checkpoint, so the run continues exactly where it was;
6. train: each optimizer step takes one length-grouped batch (split into accumulation
   micro-batches and across processes), logs metrics every `log_every` steps, evaluates every
   `eval_every`, checkpoints every `save_every` (atomically), stops early if asked;
7. evaluate once more, save the final adapter (with tokenizer and chat template) and a summary.

SIGTERM or Ctrl-C stops the run at the next step boundary with a checkpoint (status
"cancelled"), so nothing trained is lost.

Metrics go to `metrics.jsonl` (one JSON object per line with "step" and "split") and
TensorBoard (`tb/`). The loss is the mean cross-entropy over answer tokens in the step; token
accuracy is the share of answer tokens whose argmax prediction is right; sequence accuracy is
the share of examples whose every answer token is right (what OpenAI's legacy fine-tuning
results reported).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from tunedesk.io import atomic_dir, atomic_write_json, atomic_write_jsonl, read_jsonl
from tunedesk.train.config import TrainConfig, resolve_path

log = logging.getLogger("tunedesk.train")

# on_event(level, type, message, data): how a job hears about progress ("info"/"warning",
# "message"/"metrics"). Only the main process calls it.
EventCallback = Callable[[str, str, str, dict[str, Any]], None]

CHECKPOINTS = "checkpoints"
METRIC_KEYS = ("loss", "tokens", "correct", "seqs", "seqs_correct")


class TrainingError(RuntimeError):
    """Training can't start or go on; `code` says why (config_error, data_error, ...)."""

    def __init__(self, message: str, code: str = "training_error") -> None:
        super().__init__(message)
        self.code = code


def _embedding_training(model: Any) -> dict[str, Any]:
    """peft options that train the input embeddings (and an untied output head) in full."""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    embed = names[id(model.get_input_embeddings())]
    if getattr(model.config, "tie_word_embeddings", False):
        # One trained copy shared by both ends; untied copies would be merged into a model
        # whose config ties them again (peft issue #2777).
        return {"modules_to_save": [embed], "ensure_weight_tying": True}
    head = names[id(model.get_output_embeddings())]
    return {"modules_to_save": [embed, head]}


def run_training(
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_event: EventCallback | None = None,
) -> dict[str, Any]:
    """Fine-tune `cfg.base_model` with (Q)LoRA; write everything under `run_dir`.

    Returns the summary (also written to run_dir/summary.json): status ("succeeded" or
    "cancelled"), steps, final train and validation metrics, throughput, and where the adapter
    and last checkpoint are.
    """
    started = time.time()
    if "torch" not in sys.modules:
        # OpenMP threads that spin while they wait steal the cores of a busy machine: on two
        # shared cores we measured steps 8x slower. Sleeping waiters cost almost nothing.
        # (Read once, when torch loads; a process that imported torch already keeps its own.)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = run_dir / CHECKPOINTS
    # From here on SIGTERM / Ctrl-C only set a flag, so a cancel during the (slow) set-up
    # still ends cleanly.
    stop = _StopRequest()
    stop.install()
    import torch

    # Thread count and determinism are process-wide: put them back for the caller.
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return _train(cfg, run_dir, ckpt_root, resume, progress, on_event, stop, started)
    finally:
        stop.restore()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    ckpt_root: Path,
    resume: bool,
    progress: bool,
    on_event: EventCallback | None,
    stop: _StopRequest,
    started: float,
) -> dict[str, Any]:
    """The body of `run_training`, one section per step of the module docstring."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from tunedesk.train.data import (
        DataError,
        LengthGroupedBatcher,
        collate,
        eval_batches,
        split_micro_batches,
        tokenize_split,
    )

    # ---- 1. Processes, device, seeds ----------------------------------------------------------
    if cfg.deterministic:
        # cuBLAS needs this before its first use to pick deterministic kernels.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    on_cuda = torch.cuda.is_available()
    dtype_name = cfg.compute_dtype
    if dtype_name == "auto":
        dtype_name = (
            ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if on_cuda else "float32"
        )
    compute_dtype = getattr(torch, dtype_name)
    mixed = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[dtype_name]
    accelerator = Accelerator(mixed_precision=mixed, cpu=not on_cuda)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    device = accelerator.device
    set_seed(cfg.seed)
    if cfg.deterministic:
        # warn_only: a kernel without a deterministic version warns instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    def event(level: str, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        if not main:
            return
        (log.warning if level == "warning" else log.info)(message)
        if on_event is not None:
            on_event(level, kind, message, data or {})

    # ---- 2. Tokenizer and data ----------------------------------------------------------------
    from transformers import AutoTokenizer

    base = _resolve_model(cfg.base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except Exception as exc:
        raise TrainingError(
            f"base_model {cfg.base_model!r}: can't load its tokenizer ({exc})", "config_error"
        ) from exc
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id works; eos is the usual pick.
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id

    data_dir = resolve_path(cfg.data_dir)
    train_path = resolve_path(cfg.train_file) if cfg.train_file else data_dir / "train.jsonl"
    val_path = resolve_path(cfg.val_file) if cfg.val_file else data_dir / "val.jsonl"
    try:
        train = tokenize_split(train_path, tokenizer, cfg.max_seq_len)
        val = tokenize_split(val_path, tokenizer, cfg.max_seq_len) if val_path.is_file() else None
        batcher = LengthGroupedBatcher(
            train.lengths, cfg.batch_size, cfg.seed, min_batch_size=world * cfg.grad_accum
        )
    except DataError as exc:
        raise TrainingError(str(exc), "data_error") from exc
    for name, split in (("train", train), ("val", val)):
        if split is not None and split.dropped:
            why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in split.dropped.items())
            event(
                "warning",
                "message",
                f"{name} split: left out {sum(split.dropped.values())} of {split.total_lines} "
                f"examples ({why}; max_seq_len={cfg.max_seq_len})",
                {"split": name, "dropped": split.dropped},
            )
    if val is not None and not val.examples:
        val = None
    steps_per_epoch = len(batcher)
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    event(
        "info",
        "message",
        f"Training on {len(train.examples)} examples ({train.n_tokens} tokens, "
        f"{train.n_loss_tokens} trained) for {total_steps} steps of {cfg.batch_size} "
        f"sequences ({steps_per_epoch} steps per epoch); validating on "
        f"{len(val.examples) if val else 0} examples",
        {
            "train_examples": len(train.examples),
            "val_examples": len(val.examples) if val else 0,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
        },
    )

    # ---- 3. Model: quantized (or not) base + LoRA adapters ------------------------------------
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    load_kwargs: dict[str, Any] = {"dtype": compute_dtype}
    if cfg.quantization == "nf4":
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        # A quantized model can't be moved after loading: load it straight onto this
        # process's device.
        load_kwargs["device_map"] = {"": accelerator.local_process_index if on_cuda else "cpu"}
    try:
        # One "Loading weights" bar, not one per process drawn over each other.
        with _progress_bars(progress and main):
            model = AutoModelForCausalLM.from_pretrained(base, **load_kwargs)
    except Exception as exc:
        raise TrainingError(
            f"base_model {cfg.base_model!r}: can't load it ({exc})", "config_error"
        ) from exc
    model.config.use_cache = False  # the KV cache is for generation only
    for module in model.modules():
        # bitsandbytes (0.50, CPUs with AVX512-BF16) repacks 4-bit weights into an
        # inference-only layout on the first eval-mode forward and keeps it when training
        # resumes; that path has no autograd, so after an evaluation training crashes on
        # layers with a bias and silently stops gradients through the others. No repacking.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    ckpt_kwargs = {"use_reentrant": False}  # non-reentrant: works with DDP and frozen inputs
    if cfg.quantization == "nf4":
        # Freezes the base, keeps norms/embeddings in fp32 and turns on checkpointing.
        with warnings.catch_warnings():
            # peft still calls transformers' deprecated gradient_checkpointing_* aliases.
            warnings.simplefilter("ignore", FutureWarning)
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs=ckpt_kwargs,
            )
    elif cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
        **_embedding_training(model) if cfg.train_embeddings else {},
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft uses deprecated aliases
            model = get_peft_model(model, lora)
    except ValueError as exc:  # e.g. lora_target names no module of this model
        raise TrainingError(f"lora_target {cfg.lora_target!r}: {exc}", "config_error") from exc
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    event(
        "info",
        "message",
        f"Loaded {cfg.base_model} ({'QLoRA nf4' if cfg.quantization == 'nf4' else 'LoRA'}, "
        f"{dtype_name}) on {device}: {n_trainable / 1e6:.2f}M trainable of "
        f"{n_total / 1e6:.1f}M parameters",
        {"trainable_params": n_trainable, "total_params": n_total, "device": str(device)},
    )

    # ---- 4. Optimizer and schedule ------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.scheduler, warmup, total_steps)
    )
    # The scheduler stays outside accelerate: batch_size is global, so it steps once per
    # optimizer step whatever the number of processes.
    model, optimizer = accelerator.prepare(model, optimizer)

    # ---- 5. Resume ----------------------------------------------------------------------------
    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batch_index": 0,
        "best_val_loss": None,
        "best_step": None,
        "evals_without_improvement": 0,
        "elapsed_seconds": 0.0,
        "trained_tokens": 0,
        # Running sums since the last log line: saved in checkpoints so a resumed run logs
        # exactly the numbers an uninterrupted one would.
        "window": _empty_window(),
    }
    resumed_from = None
    if main:
        _remove_stale_temp_dirs(ckpt_root)
    if resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            event("warning", "message", "No checkpoint to resume from: starting from step 0")
        else:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
            set_peft_model_state_dict(accelerator.unwrap_model(model), adapter)
            # Several CPU processes run on device "cpu:0", a location torch.load can't restore
            # tensors to: load onto plain "cpu" there.
            here = torch.device("cpu") if device.type == "cpu" else device
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=here))
            scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt"))
            state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
            rng_states = torch.load(ckpt / "rng.pt")
            _set_rng_state(rng_states[min(rank, len(rng_states) - 1)])
            resumed_from = state["step"]
            if main:
                _truncate_metrics(run_dir / "metrics.jsonl", state["step"])
            event(
                "info",
                "message",
                f"Resumed from checkpoint {ckpt.name} (epoch {state['epoch']}, "
                f"batch {state['batch_index']})",
                {"step": state["step"], "checkpoint": str(ckpt)},
            )

    # ---- 6. Train -----------------------------------------------------------------------------
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops TensorBoard points a killed run wrote after its last checkpoint.
        writer = SummaryWriter(
            log_dir=str(run_dir / "tb"), purge_step=state["step"] + 1 if resumed_from else None
        )
    metrics_path = run_dir / "metrics.jsonl"

    def write_metrics(split: str, step: int, values: dict[str, Any]) -> None:
        if not main:
            return
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, int | float) and key not in ("epoch", "elapsed_seconds"):
                writer.add_scalar(f"{split}/{key}", value, step)
        writer.flush()

    def forward(batch: dict[str, Any]) -> tuple[Any, Any]:
        """Forward a padded batch; return the summed answer-token cross-entropy (with grad) and
        detached [loss sum, answer tokens, correct tokens, sequences, fully correct sequences].

        Logits are computed only where the next token is an answer token (`logits_to_keep` as
        a boolean mask): the output projection is the costliest layer of a small model and,
        with a 150k vocabulary, the largest tensor of a big one. Prompt positions need none.
        """
        target = batch["labels"][:, 1:]  # position t predicts token t+1
        keep = target != -100
        mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
        mask[:, :-1] = keep
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=mask,
        ).logits.float()  # (answer tokens, vocab), row by row
        wanted = target[keep]
        loss_sum = torch.nn.functional.cross_entropy(logits, wanted, reduction="sum")
        with torch.no_grad():
            correct = logits.argmax(-1) == wanted
            rows = keep.nonzero()[:, 0]
            wrong_per_row = torch.zeros(keep.size(0), device=keep.device)
            wrong_per_row.index_add_(0, rows, (~correct).float())
            has_answer = keep.any(dim=1)
            stats = torch.stack(
                [
                    loss_sum.detach().double(),
                    keep.sum().double(),
                    correct.sum().double(),
                    has_answer.sum().double(),
                    ((wrong_per_row == 0) & has_answer).sum().double(),
                ]
            )
        return loss_sum, stats

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """Validation loss and accuracies over the whole validation split."""
        model.eval()
        batches = eval_batches(val.lengths, cfg.eval_batch_size or micro_size)
        totals = torch.zeros(5, dtype=torch.float64, device=device)
        # Every process runs the same number of forward passes (a spare one repeats batch 0
        # with weight 0), so collective ops inside the model never wait on each other.
        for j in range(math.ceil(len(batches) / world)):
            k = j * world + rank
            indices = batches[k] if k < len(batches) else batches[0]
            batch = collate([val.examples[i] for i in indices], pad_id)
            batch = {name: t.to(device) for name, t in batch.items()}
            with accelerator.autocast():
                _, stats = forward(batch)
            totals += stats.to(totals) * (1.0 if k < len(batches) else 0.0)
        totals = accelerator.reduce(totals, "sum")
        model.train()
        loss, tokens, correct, seqs, seqs_ok = totals.tolist()
        return {
            "loss": loss / max(tokens, 1),
            "token_accuracy": correct / max(tokens, 1),
            "sequence_accuracy": seqs_ok / max(seqs, 1),
        }

    def save_checkpoint(path: Path) -> None:
        """Adapter, optimizer, schedule, RNG states of every process, data position."""
        from accelerate.utils import gather_object

        rng_states = gather_object([_get_rng_state()]) if world > 1 else [_get_rng_state()]
        if main:
            with atomic_dir(path) as tmp:
                accelerator.unwrap_model(model).save_pretrained(tmp / "adapter")
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(rng_states, tmp / "rng.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            _prune_checkpoints(ckpt_root, cfg.keep_last)
        accelerator.wait_for_everyone()

    def run_eval(step: int) -> dict[str, float]:
        """Evaluate, log, and keep the adapter in best/ when the validation loss improves."""
        result = evaluate()
        write_metrics("val", step, result)
        event(
            "info",
            "metrics",
            f"Step {step}/{total_steps}: validation loss={result['loss']:.4f}, "
            f"token accuracy={result['token_accuracy']:.3f}, "
            f"sequence accuracy={result['sequence_accuracy']:.3f}",
            {"step": step, "total_steps": total_steps, "split": "val", **result},
        )
        if _track_best(state, result["loss"], step):
            if main:
                with atomic_dir(ckpt_root / "best") as tmp:
                    accelerator.unwrap_model(model).save_pretrained(tmp / "adapter")
                    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            accelerator.wait_for_everyone()
        return result

    micro_size = max(1, cfg.batch_size // (cfg.grad_accum * world))
    model.train()
    step = state["step"]
    last_train: dict[str, Any] = {}
    last_val: dict[str, float] = {}
    status = "succeeded"
    early_stopped = False
    seen_tokens_at_start = state["trained_tokens"]
    session_step_seconds = 0.0  # time in training steps only (no eval, no checkpoints)
    t_session = time.time()
    last_eval_step = None
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    window = state["window"]
    if stop.requested:  # cancelled while loading: nothing new to save
        log.warning("stop requested while loading: stopping")
        status = "cancelled"
    try:
        for epoch, batch_index, batch in batcher.iter_from(state["epoch"], state["batch_index"]):
            if step >= total_steps or status == "cancelled":
                break
            # -- one optimizer step: micro-batches of this process's share of the batch --
            t_step = time.time()
            n_step_tokens = sum(train.examples[i].n_loss_tokens for i in batch)
            micro = split_micro_batches(batch, cfg.grad_accum, rank, world)
            step_stats = torch.zeros(5, dtype=torch.float64, device=device)
            pad_free = 0
            for m, indices in enumerate(micro):
                inputs = collate([train.examples[i] for i in indices], pad_id)
                inputs = {name: t.to(device) for name, t in inputs.items()}
                pad_free += int(inputs["attention_mask"].sum())
                # Gradients are all-reduced only on the last micro-batch.
                sync = nullcontext() if m == len(micro) - 1 else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    loss_sum, stats = forward(inputs)
                    # Mean over every answer token of the whole step (all micro-batches, all
                    # processes); x world because DDP averages the processes' gradients.
                    accelerator.backward(loss_sum * world / n_step_tokens)
                step_stats += stats
            grad_norm = 0.0
            if cfg.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
            lr_now = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            step_seconds = time.time() - t_step
            session_step_seconds += step_seconds

            # -- bookkeeping: position of the next batch, running metric sums --
            state["epoch"], state["batch_index"] = (
                (epoch + 1, 0) if batch_index + 1 >= steps_per_epoch else (epoch, batch_index + 1)
            )
            state["step"] = step
            if world > 1:  # metrics cover every process's share of the batch
                step_stats = accelerator.reduce(step_stats, "sum")
                pad_free = int(accelerator.reduce(torch.tensor(pad_free, device=device)).item())
            for key, value in zip(METRIC_KEYS, step_stats.tolist(), strict=True):
                window[key] += value
            window["pad_free_tokens"] += pad_free
            window["seconds"] += step_seconds
            window["grad_norm"] += grad_norm
            window["steps"] += 1
            state["trained_tokens"] += pad_free

            if step % cfg.log_every == 0 or step == total_steps:
                now = time.time()
                elapsed = state["elapsed_seconds"] + (now - t_session)
                tokens = max(window["tokens"], 1)
                last_train = {
                    "loss": window["loss"] / tokens,
                    "token_accuracy": window["correct"] / tokens,
                    "sequence_accuracy": window["seqs_correct"] / max(window["seqs"], 1),
                    "lr": lr_now,
                    "grad_norm": window["grad_norm"] / max(window["steps"], 1),
                    "tokens_per_second": window["pad_free_tokens"] / max(window["seconds"], 1e-9),
                    "epoch": round(step / steps_per_epoch, 4),
                    "elapsed_seconds": round(elapsed, 2),
                    "trained_tokens": state["trained_tokens"],
                }
                write_metrics("train", step, last_train)
                bar.set_postfix(loss=f"{last_train['loss']:.4f}", lr=f"{lr_now:.2e}")
                event(
                    "info",
                    "metrics",
                    f"Step {step}/{total_steps}: training loss={last_train['loss']:.4f}, "
                    f"token accuracy={last_train['token_accuracy']:.3f}, "
                    f"sequence accuracy={last_train['sequence_accuracy']:.3f}, "
                    f"{last_train['tokens_per_second']:.0f} tokens/s",
                    {"step": step, "total_steps": total_steps, "split": "train", **last_train},
                )
                window = state["window"] = _empty_window()

            # -- evaluation (the last step's comes after the loop), best/, early stopping --
            due = cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps
            if val is not None and due:
                last_val, last_eval_step = run_eval(step), step
                patience = cfg.early_stopping_patience
                early_stopped = bool(patience and state["evals_without_improvement"] >= patience)

            cancel = stop.requested
            if world > 1:  # every process must agree to stop at the same step
                flag = accelerator.reduce(torch.tensor(int(cancel), device=device), "sum")
                cancel = bool(flag.item())
            cancel = cancel and step < total_steps  # a stop after the last step is just the end
            if (cfg.save_every and step % cfg.save_every == 0) or cancel:
                state["elapsed_seconds"] += time.time() - t_session
                t_session = time.time()
                save_checkpoint(ckpt_root / f"step-{step}")
                event(
                    "info",
                    "message",
                    f"Checkpoint saved at step {step}",
                    {"step": step, "checkpoint": str(ckpt_root / f"step-{step}")},
                )
            if cancel:
                log.warning("stop requested: stopped after step %d", step)
                status = "cancelled"
                event("info", "message", f"Cancelled at step {step}/{total_steps}", {"step": step})
                break
            if early_stopped:
                event(
                    "info",
                    "message",
                    f"Early stopping at step {step}: no better validation loss in "
                    f"{state['evals_without_improvement']} evaluations (best "
                    f"{state['best_val_loss']:.4f} at step {state['best_step']})",
                    {"step": step, "best_step": state["best_step"]},
                )
                break
    finally:
        bar.close()
    state["elapsed_seconds"] += time.time() - t_session
    t_session = time.time()

    # ---- 7. Final evaluation, adapter, summary ------------------------------------------------
    adapter_dir = run_dir / "adapter"
    if status == "succeeded":
        if val is not None and last_eval_step != step:
            last_val = run_eval(step)
        if cfg.save_every and step % cfg.save_every and not early_stopped:
            # The end is resumable too: `--resume` with a larger max_steps extends the run.
            save_checkpoint(ckpt_root / f"step-{step}")
        if main:
            with atomic_dir(adapter_dir) as tmp:
                if early_stopped and (ckpt_root / "best" / "adapter").is_dir():
                    shutil.copytree(ckpt_root / "best" / "adapter", tmp, dirs_exist_ok=True)
                else:
                    accelerator.unwrap_model(model).save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)  # tokenizer + chat template travel with it
        accelerator.wait_for_everyone()
        event("info", "message", f"Saved adapter to {adapter_dir}", {"adapter": str(adapter_dir)})
    if writer is not None:
        writer.close()

    last_ckpt = latest_checkpoint(ckpt_root)
    session_tokens = state["trained_tokens"] - seen_tokens_at_start
    # The step whose weights adapter/ holds: the best evaluation's if early stopping ended it.
    adapter_step = None
    if status == "succeeded":
        adapter_step = state["best_step"] if early_stopped else step
    summary = {
        "status": status,
        "early_stopped": early_stopped,
        "step": step,
        "total_steps": total_steps,
        "epoch": round(step / steps_per_epoch, 4),
        "train_loss": last_train.get("loss"),
        "train_token_accuracy": last_train.get("token_accuracy"),
        "train_sequence_accuracy": last_train.get("sequence_accuracy"),
        "val_loss": last_val.get("loss"),
        "val_token_accuracy": last_val.get("token_accuracy"),
        "val_sequence_accuracy": last_val.get("sequence_accuracy"),
        "best_val_loss": state["best_val_loss"],
        "best_step": state["best_step"],
        "adapter_step": adapter_step,
        "trained_tokens": state["trained_tokens"],
        "tokens_per_second": session_tokens / max(session_step_seconds, 1e-9),
        "train_seconds": round(state["elapsed_seconds"], 2),
        "wall_seconds": round(time.time() - started, 2),
        "resumed_from_step": resumed_from,
        "train_examples": len(train.examples),
        "val_examples": len(val.examples) if val else 0,
        "dropped": {"train": train.dropped, "val": val.dropped if val else {}},
        "quantization": cfg.quantization,
        "compute_dtype": dtype_name,
        "device": str(device),
        "processes": world,
        "trainable_params": n_trainable,
        "adapter_dir": str(adapter_dir) if status == "succeeded" else None,
        "last_checkpoint": str(last_ckpt) if last_ckpt else None,
    }
    if main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


# ---- helpers (in the order the loop uses them) ----------------------------------------------


def _empty_window() -> dict[str, float]:
    return dict.fromkeys(METRIC_KEYS, 0.0) | {
        "pad_free_tokens": 0,
        "seconds": 0.0,
        "grad_norm": 0.0,
        "steps": 0,
    }


def _resolve_model(name: str) -> str:
    """A local folder (relative to the workspace root) if one exists, else the hub id as is."""
    local = resolve_path(name)
    return str(local) if local.exists() else name


def _lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at step s: linear warm-up, then cosine/linear decay to 0."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete `step-N` checkpoint folder, or None."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    steps = [
        (int(p.name.split("-", 1)[1]), p)
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and p.name.split("-", 1)[1].isdigit()
    ]
    return max(steps)[1] if steps else None


def _remove_stale_temp_dirs(ckpt_root: Path) -> None:
    # A run killed while writing a checkpoint leaves its hidden temp folder behind.
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(".") and (p.name.endswith(".tmp") or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


def _prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    found = sorted(
        (int(p.name.split("-", 1)[1]), p)
        for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and p.name.split("-", 1)[1].isdigit()
    )
    for _, path in found[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def _get_rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


@contextmanager
def _progress_bars(shown: bool):
    """transformers' own progress bars (model loading) hidden unless `shown`; never turned on
    where the user turned them off (HF_HUB_DISABLE_PROGRESS_BARS)."""
    from transformers.utils import logging as hf_logging

    if shown or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows a killed run wrote after the checkpoint we resume from."""
    if path.is_file():
        atomic_write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= step])


def _track_best(state: dict[str, Any], val_loss: float, step: int) -> bool:
    """Record a validation loss; True if it is the best so far."""
    best = state["best_val_loss"]
    if best is None or val_loss < best:
        state.update(best_val_loss=val_loss, best_step=step, evals_without_improvement=0)
        return True
    state["evals_without_improvement"] += 1
    return False


class _StopRequest:
    """SIGTERM / Ctrl-C set a flag the loop checks between steps (a second Ctrl-C aborts)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        # Only a flag, no logging: a handler runs between any two bytecodes of the main
        # thread, the import machinery's included, and the console log handler imports tqdm
        # lazily. A job cancelled while its modules were still loading failed with a
        # circular-import ImportError instead of ending cancelled.
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
