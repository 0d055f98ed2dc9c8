"""The training loop on CPU: answer-only labels, batching, QLoRA and LoRA runs, exact resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tunedesk.chat_format import IGNORE_INDEX
from tunedesk.config import load_config
from tunedesk.train.config import TrainConfig
from tunedesk.train.data import LengthGroupedBatcher, collate, split_micro_batches, tokenize_split
from tunedesk.train.jobs import JobStore, pid_alive

REPO = Path(__file__).resolve().parents[1]


def make_config(tmp_path: Path, tiny_base: Path, prepared_dir: Path, **fields) -> Path:
    """A small, fast recipe as a YAML file (what users write), fields overriding defaults."""
    cfg = {
        "base_model": str(tiny_base),
        "data_dir": str(prepared_dir),
        "runs_dir": str(tmp_path / "runs"),
        "quantization": "nf4",
        "gradient_checkpointing": False,
        "max_seq_len": 256,
        "batch_size": 8,
        "epochs": 1.0,
        "max_steps": 12,
        "lr": 1e-2,
        "warmup_ratio": 0.0,
        "log_every": 1,
        "eval_every": 0,
        "save_every": 0,
        "num_threads": 1,  # identical kernels in every process: resumed == uninterrupted
    } | fields
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


# ---- data -------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_assistant_answers_and_their_end_token(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    rows = [
        {
            "messages": [
                {"role": "system", "content": "你是基金客服。"},
                {"role": "user", "content": "货币基金有风险吗？"},
                {"role": "assistant", "content": "货币基金风险较低。"},
                {"role": "user", "content": "赎回多久到账？"},
                {"role": "assistant", "content": "一般T+1到账。"},
            ]
        },
        {  # a weight-0 turn is context, not a target
            "messages": [
                {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "旧回答", "weight": 0},
                {"role": "user", "content": "费率多少？"},
                {"role": "assistant", "content": "申购费率为1.5%。"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "长" * 400},
                {"role": "assistant", "content": "x"},
            ]
        },
    ]
    path = tmp_path / "split.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    split = tokenize_split(path, tok, max_seq_len=128)
    assert split.dropped == {"too_long": 1}  # dropped and counted, never truncated
    assert len(split.examples) == 2

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for example, answers in zip(
        split.examples, [["货币基金风险较低。", "一般T+1到账。"], ["申购费率为1.5%。"]], strict=True
    ):
        ids, labels = example.input_ids, example.labels
        # Hand-built expectation: each answer's own tokens followed by <|im_end|>, found in
        # order in the rendered ids; every other label is -100.
        expected = [IGNORE_INDEX] * len(ids)
        cursor = 0
        for answer in answers:
            target = tok(answer, add_special_tokens=False)["input_ids"] + [im_end]
            start = next(i for i in range(cursor, len(ids)) if ids[i : i + len(target)] == target)
            expected[start : start + len(target)] = target
            cursor = start + len(target)
        assert labels == expected
        trained = tok.decode([t for t in labels if t != IGNORE_INDEX])
        assert trained == "".join(a + "<|im_end|>" for a in answers)
        assert "user" not in trained and "assistant" not in trained


def test_batcher_is_length_grouped_deterministic_and_resumable():
    import random

    rng = random.Random(1)
    lengths = [rng.randint(10, 300) for _ in range(1003)]
    batcher = LengthGroupedBatcher(lengths, batch_size=16, seed=7, mega_batch_mult=8)
    assert len(batcher) == 1003 // 16 + 1  # the short last batch (11 >= 1) is kept
    epoch0 = batcher.epoch_batches(0)
    assert len(epoch0) == len(batcher)
    assert sorted(i for b in epoch0 for i in b) == list(range(1003))  # each example once
    assert epoch0 == LengthGroupedBatcher(lengths, 16, 7, 8).epoch_batches(0)
    assert epoch0 != batcher.epoch_batches(1)  # a new order every epoch
    # The longest example leads (out-of-memory shows at step 1).
    assert max(lengths[i] for i in epoch0[0]) == max(lengths)

    # Padding to each batch's own longest wastes far less than random batches would.
    def padding(batches):
        return sum(
            len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches
        )

    shuffled = list(range(1003))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i : i + 16] for i in range(0, 1003, 16)]
    assert padding(epoch0) < 0.25 * padding(random_batches)

    # Resuming at (epoch 1, batch 5) replays exactly what an uninterrupted run sees.
    straight = batcher.iter_from(0, 0)
    for _ in range(len(batcher) + 5):
        next(straight)
    resumed = batcher.iter_from(1, 5)
    for _ in range(len(batcher)):
        assert next(resumed) == next(straight)


def test_micro_batches_split_a_step_and_collate_pads_per_batch():
    from tunedesk.train.data import Example

    batch = list(range(10))
    parts = [split_micro_batches(batch, 2, rank, 2) for rank in range(2)]
    assert sorted(i for p in parts for mb in p for i in mb) == batch
    assert all(len(p) == 2 for p in parts)

    examples = [Example([5, 6, 7], [-100, 6, 7]), Example([5, 6], [-100, 6])]
    out = collate(examples, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, 6, -100]]


# ---- training runs ----------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_run_learns_and_changes_the_adapter(quantization, tiny_base, prepared_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from tunedesk.train.loop import run_training

    cfg = load_config(
        TrainConfig,
        make_config(
            tmp_path,
            tiny_base,
            prepared_dir,
            quantization=quantization,
            max_steps=16,
            eval_every=5,
            save_every=8,
            keep_last=1,
        ),
    )
    events: list[tuple] = []
    summary = run_training(
        cfg, tmp_path / "run", progress=False, on_event=lambda *e: events.append(e)
    )

    assert summary["status"] == "succeeded" and summary["step"] == 16
    assert summary["quantization"] == quantization
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 16
    # A random-init base's frozen, tiny tied embeddings cap how far the loss can fall (logits
    # stay within about +-1.3), so "learns" here means a clear, steady decrease.
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.025, losses
    assert summary["val_loss"] is not None and summary["val_loss"] < losses[0]
    assert 0 <= summary["val_token_accuracy"] <= 1 and summary["tokens_per_second"] > 0

    # LoRA B starts at zero: after training every adapted layer's B has moved.
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b_weights = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert b_weights and all(float(v.abs().max()) > 0 for v in b_weights.values())
    assert {"q_proj", "down_proj"} <= {k.split(".")[-3] for k in b_weights}  # all-linear
    assert (tmp_path / "run" / "adapter" / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "adapter" / "chat_template.jinja").is_file() or "chat_template" in (
        tmp_path / "run" / "adapter" / "tokenizer_config.json"
    ).read_text()

    # Checkpoints: step-16 only (keep_last=1), best/ kept, each complete.
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["best", "step-16"]
    state = json.loads((tmp_path / "run/checkpoints/step-16/trainer_state.json").read_text())
    assert state["step"] == 16 and state["best_val_loss"] is not None
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "run/checkpoints/step-16" / name).is_file()
    opt = torch.load(tmp_path / "run/checkpoints/step-16/optimizer.pt")
    assert opt["state"]  # Adam moments were saved

    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val_rows] == [5, 10, 15, 16]
    assert val_rows[-1]["loss"] < val_rows[0]["loss"]
    assert {"loss", "token_accuracy", "sequence_accuracy"} <= set(val_rows[0])
    train_row = rows[0]
    assert {
        "loss",
        "token_accuracy",
        "sequence_accuracy",
        "lr",
        "tokens_per_second",
        "elapsed_seconds",
    } <= set(train_row)
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    messages = [e[2] for e in events]
    assert any(m.startswith("Step 16/16: training loss=") for m in messages)
    assert any(m.startswith("Step 16/16: validation loss=") for m in messages)


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(
    tiny_base, prepared_dir, tmp_path, monkeypatch
):
    from tunedesk.cli import main
    from tunedesk.train.loop import run_training

    monkeypatch.setenv("TUNEDESK_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    fields = {"max_steps": 24, "save_every": 4, "keep_last": 2, "eval_every": 12, "log_every": 3}
    cfg_path = make_config(tmp_path, tiny_base, prepared_dir, **fields)

    # The job runs as a real background process, which we SIGKILL after its first checkpoint.
    out = subprocess.run(
        [sys.executable, "-m", "tunedesk.cli", "train", str(cfg_path), "--detach"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        timeout=60,
    )
    job_id = out.stdout.strip()
    store = JobStore(tmp_path / "runs")
    job = store.get(job_id)
    try:
        _wait_for(
            lambda: (job.dir / "checkpoints" / "step-4").is_dir(), 120, "the first checkpoint"
        )
        pid = job.info()["pid"]
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not pid_alive(pid), 30, "the killed process to go")
    finally:
        info = json.loads(job.status_path.read_text())
        if info.get("pid") and pid_alive(info["pid"]):
            os.kill(info["pid"], signal.SIGKILL)
    assert not (job.dir / "adapter").exists(), "the run finished before it could be killed"

    # Reading the job notices the dead process.
    info = job.info()
    assert info["status"] == "failed"
    assert info["error"] == {
        "code": "process_exited",
        "message": f"the training process exited unexpectedly (pid {pid})",
    }
    assert any("exited unexpectedly" in e["message"] for e in job.events())

    # Resume it (in this process) and compare with an uninterrupted run of the same recipe.
    assert main(["train", "--resume", job_id[:12], "--no-progress"]) == 0
    resumed = job.info()
    assert resumed["status"] == "succeeded" and resumed["error"] is None
    reference = run_training(load_config(TrainConfig, cfg_path), tmp_path / "ref", progress=False)

    s = resumed["summary"]
    assert s["resumed_from_step"] >= 4 and s["step"] == reference["step"] == 24
    assert s["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-3)
    assert s["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-3)
    assert s["trained_tokens"] == reference["trained_tokens"]
    # The metric history is the uninterrupted one: rows past the checkpoint were replaced.
    assert train_losses(job.dir) == pytest.approx(train_losses(tmp_path / "ref"), rel=1e-3)
    messages = [e["message"] for e in job.events()]
    assert "Job resumed" in messages and messages[-1] == "Job succeeded"


@pytest.mark.slow
def test_processes_2_trains_one_job_in_two_processes_like_one(
    tiny_base, prepared_dir, tmp_path, monkeypatch
):
    """`--processes 2` runs the same command in two torchrun workers (gloo on CPU): one job,
    each process half of every batch, so the losses are those of a one-process run."""
    from tunedesk.cli import main

    monkeypatch.setenv("TUNEDESK_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    fields = {"max_steps": 6, "save_every": 3, "eval_every": 3, "log_every": 1}
    cfg_path = make_config(tmp_path, tiny_base, prepared_dir, **fields)
    assert main(["train", str(cfg_path), "--job-id", "ftjob-000000000001", "--no-progress"]) == 0

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "WORLD_SIZE")}

    def train_in_two_processes(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "tunedesk.cli", "train", *args, "--processes", "2"]
            + ["--no-progress"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stderr

    stderr = train_in_two_processes(str(cfg_path), "--job-id", "ftjob-000000000002")
    assert "2 processes (torchrun)" in stderr
    # One process speaks: no model-loading bars from each worker drawn over each other.
    assert "Loading weights" not in stderr and stderr.count("Loaded ") == 1

    store = JobStore(tmp_path / "runs")
    one, two = store.get("ftjob-000000000001"), store.get("ftjob-000000000002")
    info = two.info()
    assert info["status"] == "succeeded"
    s1, s2 = one.info()["summary"], info["summary"]
    assert s2["processes"] == 2 and s1["processes"] == 1
    assert s2["step"] == s1["step"] == 6
    assert s2["trained_tokens"] == s1["trained_tokens"]  # every example once, in both
    # Same global batches: the losses agree up to the order of floating-point sums.
    assert train_losses(two.dir) == pytest.approx(train_losses(one.dir), rel=5e-3)
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], rel=5e-3)
    assert (two.dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (two.dir / "checkpoints" / "step-6").is_dir()
    # Only rank 0 keeps the books: one start and one end in the job's events.
    messages = [e["message"] for e in two.events()]
    assert messages.count("Job started") == 1 and messages[-1] == "Job succeeded"

    # Resuming in two processes continues the same job from its last checkpoint.
    train_in_two_processes("--resume", "ftjob-000000000002", "--max_steps=8")
    resumed = two.info()["summary"]
    assert resumed["status"] == "succeeded" and resumed["processes"] == 2
    assert resumed["resumed_from_step"] == 6 and resumed["step"] == 8
    assert [e["message"] for e in two.events()].count("Job resumed") == 1


@pytest.mark.slow
def test_processes_2_stop_like_one_process(tiny_base, prepared_dir, tmp_path):
    """Ctrl-C (a SIGINT to the terminal's foreground group) and `jobs cancel` end a
    `--processes 2` job as they end a one-process job: a checkpoint, status cancelled, exit 1,
    every process gone, and none of torchrun's tracebacks or failure reports."""
    import psutil

    job_id = "ftjob-0000000000c1"
    fields = {"epochs": 1000.0, "max_steps": 2000, "save_every": 5, "log_every": 1}
    cfg_path = make_config(tmp_path, tiny_base, prepared_dir, **fields)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "WORLD_SIZE")}
    job = JobStore(tmp_path / "runs").get  # the job exists once the command has started

    def start(*args: str) -> subprocess.Popen:
        # Its own process group, as a terminal gives a foreground command.
        return subprocess.Popen(
            [sys.executable, "-m", "tunedesk.cli", "train", *args, "--processes", "2"]
            + ["--no-progress"],
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=env,
            start_new_session=True,
        )

    def train_steps() -> int:
        metrics = tmp_path / "runs" / job_id / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return sum('"split": "train"' in line for line in lines)  # a line being written too

    def job_processes() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if job_id in (p.info["cmdline"] or [])]

    def finish(proc: subprocess.Popen) -> str:
        try:
            _, stderr = proc.communicate(timeout=120)
        finally:
            for p in job_processes() if proc.poll() is None else []:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()  # torchrun and its workers too: they run in a session of their own
        assert proc.returncode == 1, stderr[-3000:]  # as one process: only success exits 0
        assert "Traceback" not in stderr and "FAILED" not in stderr, stderr[-3000:]
        assert "Failed to load" not in stderr  # bitsandbytes' warning about a kernel never used
        assert not job_processes(), "processes of the job still running"
        return stderr

    # Ctrl-C once it has trained a few steps.
    proc = start(str(cfg_path), "--job-id", job_id)
    _wait_for(lambda: train_steps() >= 3, 180, "three training steps", poll=0.2)
    os.killpg(proc.pid, signal.SIGINT)
    stderr = finish(proc)
    info = job(job_id).info()
    stopped_at = info["summary"]["step"]
    assert info["status"] == "cancelled" and 3 <= stopped_at < 2000
    assert f"Cancelled at step {stopped_at}/2000" in stderr
    assert (tmp_path / "runs" / job_id / "checkpoints" / f"step-{stopped_at}").is_dir()

    # Resumed in two processes, then cancelled as `tunedesk jobs cancel` does (SIGTERM to the
    # process the job's status names, rank 0 here).
    proc = start("--resume", job_id)
    _wait_for(lambda: train_steps() >= stopped_at + 2, 180, "two more steps", poll=0.2)
    JobStore(tmp_path / "runs").cancel(job_id)
    finish(proc)
    info = job(job_id).info()
    assert info["status"] == "cancelled"
    assert info["summary"]["resumed_from_step"] == stopped_at
    assert info["summary"]["step"] >= stopped_at + 2
    messages = [e["message"] for e in job(job_id).events()]
    assert messages.count("Job cancelled") == 2 and messages.count("Job resumed") == 1

    # The command itself SIGKILLed (it can't pass anything on): torchrun, out of the
    # terminal's reach in its own session, must not train on unowned. The kernel tells it
    # (parent-death signal), and the job still ends cancelled with a checkpoint.
    stopped_at = job(job_id).info()["summary"]["step"]
    proc = start("--resume", job_id)
    _wait_for(lambda: train_steps() >= stopped_at + 2, 180, "two more steps", poll=0.2)
    proc.kill()
    try:
        proc.communicate(timeout=120)  # its stderr stays open until torchrun's workers exit
        _wait_for(lambda: not job_processes(), 30, "the job's processes to exit")
    finally:
        for p in job_processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    info = job(job_id).info()
    assert info["status"] == "cancelled" and info["summary"]["step"] >= stopped_at + 2
    assert (tmp_path / "runs" / job_id / "checkpoints" / f"step-{info['summary']['step']}").is_dir()


def test_processes_must_be_positive_and_stay_in_the_foreground(
    tiny_base, prepared_dir, tmp_path, monkeypatch, capsys
):
    from tunedesk.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg_path = make_config(tmp_path, tiny_base, prepared_dir)
    assert main(["train", str(cfg_path), "--processes", "0"]) == 2
    assert "--processes must be 1 or more" in capsys.readouterr().err
    assert main(["train", str(cfg_path), "--processes", "2", "--detach"]) == 2
    assert "drop --detach" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_training_goes_on_after_an_evaluation_that_saves_nothing(tiny_base, prepared_dir, tmp_path):
    """bitsandbytes repacks 4-bit weights for inference on an eval-mode CPU forward (with
    AVX512-BF16) and only undoes it when a state dict is taken; training on the packed layout
    crashes or silently loses gradients. With a learning rate too small to change anything,
    the second evaluation doesn't improve, so neither best/ nor a checkpoint is written after
    it, and the next steps must still train."""
    from tunedesk.train.loop import run_training

    cfg = load_config(
        TrainConfig,
        make_config(tmp_path, tiny_base, prepared_dir, max_steps=6, eval_every=2, lr=1e-12),
    )
    summary = run_training(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "succeeded" and summary["step"] == 6
    assert summary["best_step"] == 2  # later evaluations never improved


def test_train_embeddings_trains_the_tied_embeddings_and_merges(tiny_base, prepared_dir, tmp_path):
    """`train_embeddings`: the input embeddings (tied to the output head) are trained in full
    beside the QLoRA adapters, saved with the adapter, and the merged model keeps them tied."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tunedesk.train.loop import run_training
    from tunedesk.train.merge import merge_adapter

    cfg = load_config(
        TrainConfig,
        make_config(
            tmp_path,
            tiny_base,
            prepared_dir,
            train_embeddings=True,
            lr=1e-2,
            max_steps=6,
            eval_every=0,
            save_every=0,
        ),
    )
    summary = run_training(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "succeeded"
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    embed_keys = [k for k in saved if "embed_tokens" in k]
    assert embed_keys, sorted(saved)[:5]
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    trained = saved[embed_keys[0]]
    assert trained.shape == base.get_input_embeddings().weight.shape
    assert not torch.equal(trained, base.get_input_embeddings().weight)

    report = merge_adapter(tmp_path / "run", tmp_path / "merged", base=str(tiny_base))
    assert report["parity"]["passed"], report["parity"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(merged.get_input_embeddings().weight, trained)
    assert torch.equal(merged.get_output_embeddings().weight, trained)  # still one matrix


def test_a_stop_signal_only_sets_a_flag(caplog):
    """The handler runs between any two bytecodes of the trainer, the import machinery's
    included: anything more than a flag (it used to log, and the console handler imports
    tqdm lazily) failed a job cancelled while its modules were loading, with a
    circular-import ImportError, instead of ending it cancelled."""
    import logging

    from tunedesk.train.loop import _StopRequest

    stop = _StopRequest()
    stop.install()
    try:
        with caplog.at_level(logging.DEBUG):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # delivered at the next bytecode boundary
                if stop.requested:
                    break
        assert stop.requested
        assert caplog.records == []
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is not stop._handle
