"""Benchmark: tunedesk's trainer (`run_training`) against TRL's `SFTTrainer`, side by side.

Both runs get the same base model, the same prepared data tokenised by the same
`tunedesk.chat_format.encode_conversation` (loss only on the assistant's tokens: TRL gets the
ids plus a `completion_mask` column and `completion_only_loss=True`), the same LoRA rank, alpha,
dropout and targets, the same max length, quantization mode, optimizer (AdamW), peak lr,
warm-up + cosine schedule, gradient clipping, batch size and number of optimizer steps. TRL
keeps its defaults otherwise: random sampler, its padding collator
(`DataCollatorForLanguageModeling`), no packing, no padding-free.

Each trainer runs in its own subprocess, so its peak RSS is its own (the child reports
`getrusage(RUSAGE_SELF).ru_maxrss`; the parent also polls the child's RSS with psutil). Both
children get `OMP_WAIT_POLICY=PASSIVE` (what `run_training` sets for itself), so the comparison is
of the training code, not of OpenMP's spin-waiting on shared cores.

Reported per run:
- trained tokens/s: non-pad tokens (sum of the attention mask over the batches actually trained)
  / wall time of the training loop (TRL: on_train_begin -> on_train_end; tunedesk: its
  `train_seconds`, with evaluation and checkpoints switched off during the loop);
- peak RSS (CPU) or peak VRAM (`torch.cuda.max_memory_allocated`, --gpu);
- final train loss: mean answer-token cross-entropy of the last `--log-every` steps as each
  trainer logs it, and the validation loss of the final adapter, computed the same way for both
  (sum of cross-entropy over answer tokens / number of answer tokens, whole val split);
- --gpu: MFU = 6 * N * tokens/s / (--peak-tflops * 1e12), N = all parameters of the base.

    python bench/train_throughput.py                      # CPU, tiny base, plain LoRA, 40 steps
    python bench/train_throughput.py --quantization nf4   # QLoRA (bitsandbytes CPU 4-bit) for both
    python bench/train_throughput.py --base DIR --data PREPARED_DIR --steps 80
    python bench/train_throughput.py --gpu --peak-tflops 989   # H100 SXM dense bf16

--gpu: a random-init Qwen2.5-1.5B-shaped model (Qwen2Config: hidden 1536, 28 layers, 12 heads,
2 KV heads, MLP 8960, vocab 151936, tied embeddings) saved in bf16, QLoRA nf4 with bf16
compute for both, max length 1024, conversations made longer by chaining --gpu-turns sample
Q&A pairs into one multi-turn conversation, gradient checkpointing on for both (turn it off with
--no-gradient-checkpointing). Random weights change nothing in the cost of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny-cpu.yaml"

# Qwen2.5-1.5B's shape (config.json of Qwen/Qwen2.5-1.5B-Instruct).
QWEN15B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


# ---- set-up (parent) ---------------------------------------------------------------------------


def _tunedesk(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "tunedesk", *args], cwd=cwd, check=True)


def ensure_tiny_base(work: Path) -> Path:
    base = work / "tiny-base"
    if not (base / "config.json").is_file():
        print(f"building the tiny base in {base}", flush=True)
        _tunedesk("base", "build", "--out", str(base), "--pretrain-steps", "0", cwd=work)
    return base


def ensure_data(work: Path) -> Path:
    prepared = work / "prepared"
    if not (prepared / "train.jsonl").is_file():
        raw = work / "fund_qa.jsonl"
        print(f"sampling and preparing data in {prepared}", flush=True)
        _tunedesk("data", "sample", "--out", str(raw), cwd=work)
        subprocess.run(
            [sys.executable, "-m", "tunedesk", "prepare", str(raw), "--out", str(prepared)],
            cwd=work,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return prepared


def chain_conversations(prepared: Path, out: Path, turns: int, seed: int = 0) -> Path:
    """--gpu data: `turns` consecutive Q&A conversations chained into one multi-turn one."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split in ("train", "val"):
        rows = [
            json.loads(x) for x in (prepared / f"{split}.jsonl").read_text("utf-8").splitlines()
        ]
        rows = [r for r in rows if r.get("messages")]
        rng.shuffle(rows)
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(0, len(rows) - turns + 1, turns):
                msgs = [
                    m for r in rows[i : i + turns] for m in r["messages"] if m["role"] != "system"
                ]
                f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return out


def build_qwen_shaped(work: Path, tokenizer_from: Path) -> tuple[Path, int]:
    """Random-init Qwen2.5-1.5B-shaped model (bf16) with the tiny base's tokenizer."""
    out = work / "qwen2.5-1.5b-shaped"
    meta = out / "n_params.json"
    if not meta.is_file():
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        print(f"building a random-init Qwen2.5-1.5B-shaped model in {out}", flush=True)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN15B)).to(torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)
        meta.write_text(json.dumps({"n_params": n}))
        del model
    return out, json.loads(meta.read_text())["n_params"]


# ---- the children ------------------------------------------------------------------------------


def _child_tunedesk(spec: dict) -> dict:
    from tunedesk.config import load_config
    from tunedesk.train.config import TrainConfig
    from tunedesk.train.loop import run_training

    overrides = [
        f"--base_model={spec['base']}",
        f"--data_dir={spec['data']}",
        f"--quantization={spec['quantization']}",
        f"--compute_dtype={'bfloat16' if spec['gpu'] else 'float32'}",
        f"--max_steps={spec['steps']}",
        f"--batch_size={spec['batch_size']}",
        "--grad_accum=1",
        f"--max_seq_len={spec['max_len']}",
        f"--lora_r={spec['lora_r']}",
        f"--lora_alpha={spec['lora_alpha']}",
        f"--lora_dropout={spec['lora_dropout']}",
        f"--lora_target={spec['lora_target']}",
        f"--lr={spec['lr']}",
        f"--warmup_ratio={spec['warmup_ratio']}",
        "--scheduler=cosine",
        "--weight_decay=0.0",
        "--max_grad_norm=1.0",
        f"--gradient_checkpointing={str(spec['gradient_checkpointing']).lower()}",
        f"--log_every={spec['log_every']}",
        "--eval_every=0",  # only the final evaluation, after the timed loop
        "--save_every=0",
        f"--seed={spec['seed']}",
        "--epochs=100",  # max_steps decides
    ]
    cfg = load_config(TrainConfig, CONFIG, overrides)
    cfg.validate()
    import torch

    if spec["gpu"]:
        torch.cuda.reset_peak_memory_stats()
    s = run_training(cfg, Path(spec["run_dir"]) / "tunedesk", progress=False)
    return {
        "steps": s["step"],
        "tokens": s["trained_tokens"],
        "seconds": s["train_seconds"],
        "train_loss": s["train_loss"],
        "val_loss": s["val_loss"],
        "trainable_params": s["trainable_params"],
        "peak_vram": torch.cuda.max_memory_allocated() if spec["gpu"] else None,
    }


def _val_loss(model, examples, pad_id: int, batch_size: int, device) -> float:
    """Answer-token mean cross-entropy over the split (tunedesk's definition)."""
    import torch

    from tunedesk.train.data import collate, eval_batches

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for idx in eval_batches([len(e.input_ids) for e in examples], batch_size):
            b = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            target = b["labels"][:, 1:]
            logits = logits[:, :-1].float()
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
                )
            )
            count += float((target != -100).sum())
    model.train()
    return total / max(count, 1.0)


def _child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        TrainerCallback,
    )
    from trl import SFTConfig, SFTTrainer

    from tunedesk.train.data import tokenize_split

    torch.manual_seed(spec["seed"])
    gpu = spec["gpu"]
    dtype = torch.bfloat16 if gpu else torch.float32
    tok = AutoTokenizer.from_pretrained(spec["base"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    data = Path(spec["data"])
    train = tokenize_split(data / "train.jsonl", tok, spec["max_len"])
    val_path = data / "val.jsonl"
    val = tokenize_split(val_path, tok, spec["max_len"]) if val_path.is_file() else None
    ds = Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in train.examples],
            "completion_mask": [[int(t != -100) for t in e.labels] for e in train.examples],
        }
    )

    kwargs: dict = {"dtype": dtype}
    if spec["quantization"] == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": 0 if gpu else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(spec["base"], **kwargs)
    model.config.use_cache = False
    for module in model.modules():  # the same bitsandbytes CPU work-around tunedesk applies
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    target = spec["lora_target"]
    lora = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
        target_modules=target if target == "all-linear" else target.split(","),
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(Path(spec["run_dir"]) / "trl"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=int(spec["warmup_ratio"] * spec["steps"]),  # tunedesk's rounding
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=spec["log_every"],
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=spec["seed"],
        bf16=gpu,
        fp16=False,
        use_cpu=not gpu,
        gradient_checkpointing=spec["gradient_checkpointing"],
        completion_only_loss=True,
        max_length=spec["max_len"],
        packing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    counted = {"tokens": 0, "t0": None, "t1": None}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if gpu:
                torch.cuda.synchronize()
            counted["t0"] = time.time()

        def on_train_end(self, *a, **k):
            if gpu:
                torch.cuda.synchronize()
            counted["t1"] = time.time()

    class CountingSFTTrainer(SFTTrainer):
        # Counted where a batch is trained, not in the collator: accelerate's data loader
        # fetches one batch ahead, which a collator-side count would include.
        def training_step(self, model, inputs, *a, **k):
            counted["tokens"] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *a, **k)

    trainer = CountingSFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=lora,
        callbacks=[Timer()],
    )
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak_vram = torch.cuda.max_memory_allocated() if gpu else None
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    device = next(trainer.model.parameters()).device
    val_loss = None
    if val is not None and val.examples:
        val_loss = _val_loss(
            trainer.model, val.examples, tok.pad_token_id, spec["batch_size"], device
        )
    return {
        "steps": trainer.state.global_step,
        "tokens": counted["tokens"],
        "seconds": counted["t1"] - counted["t0"],
        "train_loss": losses[-1] if losses else None,
        "val_loss": val_loss,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "peak_vram": peak_vram,
    }


def child_main(which: str, spec_path: str, out_path: str) -> None:
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    spec = json.loads(Path(spec_path).read_text())
    result = (_child_tunedesk if which == "tunedesk" else _child_trl)(spec)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    Path(out_path).write_text(json.dumps(result))


# ---- the parent --------------------------------------------------------------------------------


def run_child(which: str, spec: dict, work: Path) -> dict:
    import psutil

    spec_path = work / f"spec-{which}.json"
    out_path = work / f"result-{which}.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    env["TUNEDESK_HOME"] = str(work)
    cmd = [sys.executable, __file__, "--child", which, str(spec_path), str(out_path)]
    print(f"--- running {which} ...", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=work, env=env)
    ps = psutil.Process(proc.pid)
    polled = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(True))
            polled = max(polled, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"{which} run failed with exit code {proc.returncode}")
    result = json.loads(out_path.read_text())
    result["polled_rss"] = polled
    result["wall"] = time.time() - t0
    result["tokens_per_s"] = result["tokens"] / max(result["seconds"], 1e-9)
    return result


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def report(res: dict[str, dict], args: argparse.Namespace, n_params: int | None) -> None:
    td, trl = res["tunedesk"], res["trl"]
    mem_key, mem_name = (
        ("peak_vram", "peak VRAM (GiB)") if args.gpu else ("peak_rss", "peak RSS (MiB)")
    )
    scale = 2**30 if args.gpu else 2**20
    rows = [
        ("optimizer steps", lambda r: str(r["steps"])),
        ("trained (non-pad) tokens", lambda r: str(r["tokens"])),
        ("training loop (s)", lambda r: f"{r['seconds']:.1f}"),
        ("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}"),
        (mem_name, lambda r: f"{r[mem_key] / scale:.2f}"),
    ]
    if not args.gpu:
        rows.append(("polled RSS (MiB)", lambda r: f"{r['polled_rss'] / 2**20:.0f}"))
    rows += [
        (f"final train loss (last {args.log_every} steps)", lambda r: _fmt(r["train_loss"])),
        ("val loss (final adapter)", lambda r: _fmt(r["val_loss"])),
        ("trainable params", lambda r: str(r["trainable_params"])),
        ("child wall (s, incl. load/eval)", lambda r: f"{r['wall']:.1f}"),
    ]
    if args.gpu and n_params and args.peak_tflops:
        rows.append(
            (
                "MFU (6*N*tok/s / peak)",
                lambda r: f"{6 * n_params * r['tokens_per_s'] / (args.peak_tflops * 1e12):.2%}",
            )
        )
    width = max(len(name) for name, _ in rows)
    print()
    print(f"| {'metric':<{width}} | tunedesk | TRL SFTTrainer |")
    print(f"|{'-' * (width + 2)}|---------:|---------------:|")
    for name, f in rows:
        print(f"| {name:<{width}} | {f(td):>8} | {f(trl):>14} |")
    print()
    print(
        f"tokens/s  tunedesk/TRL: {td['tokens_per_s'] / trl['tokens_per_s']:.2f}x (target >= 1.5x)"
    )
    print(f"peak mem  tunedesk/TRL: {td[mem_key] / trl[mem_key]:.2f}x (target <= 1.0x)")
    for key, name in (("train_loss", "train loss"), ("val_loss", "val loss")):
        if td[key] is not None and trl[key] is not None:
            d = td[key] - trl[key]
            print(
                f"{name:<9} tunedesk-TRL: {d:+.4f} ({td[key]:.4f} vs {trl[key]:.4f}; target <= 0)"
            )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:5])
        return
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "tunedesk-bench-train"))
    p.add_argument("--base", help="base model folder (default: build the tiny base in --work)")
    p.add_argument("--data", help="prepared data folder (default: sample + prepare in --work)")
    p.add_argument("--quantization", choices=["none", "nf4"], default=None)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=None, help="default 256 (CPU), 1024 (--gpu)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-target", default="all-linear")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--only", choices=["tunedesk", "trl"], help="run one side only (debugging)")
    p.add_argument("--gpu", action="store_true", help="Qwen2.5-1.5B-shaped QLoRA bf16 on CUDA")
    p.add_argument("--gpu-turns", type=int, default=8, help="Q&A pairs chained per conversation")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, for MFU")
    args = p.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tiny = ensure_tiny_base(work) if (args.base is None or args.data is None) else None
    data = Path(args.data) if args.data else ensure_data(work)
    n_params = None
    if args.gpu:
        base, n_params = (Path(args.base), None) if args.base else build_qwen_shaped(work, tiny)
        if not args.data:
            data = chain_conversations(
                data, work / f"prepared-chained{args.gpu_turns}", args.gpu_turns
            )
        quant = args.quantization or "nf4"
        max_len = args.max_len or 1024
        gc = True if args.gradient_checkpointing is None else args.gradient_checkpointing
    else:
        base = Path(args.base) if args.base else tiny
        quant = args.quantization or "none"
        max_len = args.max_len or 256
        gc = bool(args.gradient_checkpointing)
    run_dir = Path(tempfile.mkdtemp(prefix="runs-", dir=work))
    spec = {
        "base": str(base.resolve()),
        "data": str(data.resolve()),
        "quantization": quant,
        "gpu": args.gpu,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_len": max_len,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "lora_target": args.lora_target,
        "lr": args.lr,
        "warmup_ratio": args.warmup_ratio,
        "log_every": args.log_every,
        "seed": args.seed,
        "gradient_checkpointing": gc,
        "run_dir": str(run_dir),
    }
    print(
        f"base={spec['base']} data={spec['data']} quantization={quant} steps={args.steps} "
        f"batch={args.batch_size} max_len={max_len} lora r={args.lora_r} alpha={args.lora_alpha} "
        f"target={args.lora_target} gradient_checkpointing={gc} load={os.getloadavg()}",
        flush=True,
    )
    sides = [args.only] if args.only else ["tunedesk", "trl"]
    res = {side: run_child(side, spec, work) for side in sides}
    if args.only:
        print(json.dumps(res, indent=2))
        return
    report(res, args, n_params)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
