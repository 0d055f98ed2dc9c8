"""Fine-tuning jobs: the store, the status machine, and `tunedesk train` / `tunedesk jobs`."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tunedesk.cli import main
from tunedesk.train.config import TrainConfig
from tunedesk.train.jobs import ID_PREFIX, JobError, JobNotFound, JobStore, pid_alive


def write_config(tmp_path: Path, tiny_base: Path, prepared_dir: Path, name: str, **fields) -> Path:
    cfg = {
        "base_model": str(tiny_base),
        "data_dir": str(prepared_dir),
        "runs_dir": str(tmp_path / "runs"),
        "gradient_checkpointing": False,
        "max_seq_len": 256,
        "batch_size": 8,
        "max_steps": 6,
        "lr": 5e-3,
        "log_every": 2,
        "eval_every": 0,
        "save_every": 0,
        "num_threads": 1,
    } | fields
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TUNEDESK_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---- config errors (no torch, fast) ----------------------------------------------------------


def test_bad_config_values_name_the_field(tiny_base, prepared_dir, workspace, capsys):
    cfg = write_config(workspace, tiny_base, prepared_dir, "ok.yaml")
    assert main(["train", str(cfg), "--lora_r=abc"]) == 2
    err = capsys.readouterr().err
    assert "lora_r must be an integer, got 'abc'" in err and "--lora_r" in err

    bad = write_config(workspace, tiny_base, prepared_dir, "bad.yaml", quantization="int3")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "quantization must be one of 'nf4', 'none', got 'int3'" in err

    assert main(["train", str(cfg), "--lora_dropout=1.5"]) == 2
    assert "lora_dropout must be in [0, 1)" in capsys.readouterr().err
    assert main(["train", str(cfg), "--batch_size=6", "--grad_accum=4"]) == 2
    assert "batch_size (6) must be a multiple of grad_accum (4)" in capsys.readouterr().err
    assert main(["train", str(cfg), "--lora_rank=8"]) == 2
    assert "unknown field 'lora_rank' (did you mean 'lora_r'?)" in capsys.readouterr().err
    assert main(["train", str(cfg), f"--data_dir={workspace / 'nowhere'}"]) == 2
    assert "--data_dir" in capsys.readouterr().err
    assert main(["jobs", "show", "ftjob-nope"]) == 2
    assert "no job 'ftjob-nope'" in capsys.readouterr().err
    assert not (workspace / "runs").exists() or not list((workspace / "runs").iterdir())


def test_shipped_recipes_load():
    from tunedesk.config import load_config
    from tunedesk.train.config import CONFIGS_DIR

    names = ["tiny-cpu", "qwen2.5-1.5b-qlora", "qwen2.5-7b-qlora", "llama3.1-8b-qlora"]
    for name in names:
        cfg = load_config(TrainConfig, CONFIGS_DIR / f"{name}.yaml")
        assert cfg.quantization == "nf4"
    assert load_config(TrainConfig, CONFIGS_DIR / "tiny-cpu.yaml").base_model == "models/tiny-base"


# ---- the store (fast) --------------------------------------------------------------------------


def test_store_create_get_list_and_cancel_a_queued_job(tmp_path):
    store = JobStore(tmp_path / "runs")
    first = store.create(TrainConfig(runs_dir=str(tmp_path / "runs")))
    time.sleep(1.05)  # created_at has one-second resolution
    second = store.create(TrainConfig(lr=1e-4))
    assert first.id.startswith(ID_PREFIX) and len(first.id) == len(ID_PREFIX) + 12
    assert [j.id for j in store.list()] == [second.id, first.id]
    assert store.get(second.id[:10]).id == second.id
    assert store.get(second.id[len(ID_PREFIX) :]).id == second.id  # "ftjob-" is optional
    with pytest.raises(JobNotFound):
        store.get("ftjob-000000000000")
    with pytest.raises(JobNotFound):
        store.get("../" + second.id)  # ids name folders: nothing outside runs/
    assert second.config().lr == 1e-4
    for name in ("config.yaml", "status.json", "events.jsonl"):
        assert (second.dir / name).is_file()
    info = second.info()
    assert info["status"] == "queued" and info["object"] == "fine_tuning.job"

    store.cancel(second.id)
    assert second.status == "cancelled"
    assert [e["message"] for e in second.events()][-1] == "Job cancelled"
    with pytest.raises(Exception, match="already cancelled"):
        store.cancel(second.id)

    # A failure found outside training (say, bad data) fails a queued job, once.
    assert first.fail("invalid_file", "line 3 is not JSON")
    assert first.info()["error"] == {"code": "invalid_file", "message": "line 3 is not JSON"}
    assert not first.fail("other", "ignored")


def test_create_adopts_a_folder_another_process_made_first_but_never_a_job(tmp_path):
    # `accelerate launch`: a non-main process may make runs/<id>/ before rank 0 creates the job.
    store = JobStore(tmp_path / "runs")
    job_id = "ftjob-0123456789ab"
    (store.root / job_id / "checkpoints").mkdir(parents=True)
    with pytest.raises(JobNotFound):
        store.get(job_id)  # a bare folder is not a job
    job = store.create(TrainConfig(), job_id=job_id)
    assert store.get(job_id).id == job_id and job.status == "queued"
    with pytest.raises(JobError, match="already exists"):
        store.create(TrainConfig(), job_id=job_id)
    assert job.status == "queued"  # the existing job is untouched


def test_a_running_job_whose_process_died_reads_as_failed(tmp_path):
    store = JobStore(tmp_path / "runs")
    job = store.create(TrainConfig())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with job._locked() as data:
        data.update(status="running", pid=proc.pid)
    info = job.info()
    assert info["status"] == "failed"
    assert info["error"]["message"] == f"the training process exited unexpectedly (pid {proc.pid})"
    assert json.loads(job.status_path.read_text())["status"] == "failed"  # written back
    assert job.events()[-1]["level"] == "error"

    # A zombie (exited, not yet reaped by its parent) is dead too.
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    _wait_for(
        lambda: Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1][0] == "Z",
        30,
        "the child to exit",
    )
    assert not pid_alive(zombie.pid)
    zombie.wait()


# ---- real background jobs ----------------------------------------------------------------------


def _detach(cfg: Path, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "tunedesk.cli", "train", str(cfg), "--detach"],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
        timeout=60,
    )
    return out.stdout.strip()


@pytest.mark.slow
def test_background_job_list_follow_cancel_results_and_resume(
    tiny_base, prepared_dir, workspace, capsys
):
    import threading

    cfg = write_config(
        workspace,
        tiny_base,
        prepared_dir,
        "job.yaml",
        max_steps=400,
        epochs=100.0,
        log_every=1,
        eval_every=3,
    )
    job_id = _detach(cfg, workspace)
    store = JobStore(workspace / "runs")
    job = store.get(job_id)
    pid = job.info()["pid"]
    try:
        # follow streams the job live from another thread until it ends
        followed: dict = {}
        follower = threading.Thread(
            target=lambda: followed.update(rc=main(["jobs", "follow", job_id, "--interval", "0.2"]))
        )
        follower.start()

        _wait_for(lambda: any(e["type"] == "metrics" for e in job.events()), 120, "a step")
        assert job.status == "running"
        assert main(["jobs", "list"]) == 0
        assert main(["jobs", "cancel", job_id[:10]]) == 0  # a prefix is enough

        follower.join(120)
        assert not follower.is_alive() and followed["rc"] == 1  # cancelled: not a success
        out = capsys.readouterr().out
        assert f"{job_id} " in out and "running" in out  # the listing
        assert "cancelling" in out  # cancel's answer
        for expected in (
            "Job started",
            "Step 1/400: training loss=",
            "Cancellation requested",
            "Job cancelled",
        ):
            assert expected in out, expected
        info = job.info()
        assert info["status"] == "cancelled" and info["summary"]["status"] == "cancelled"
        step = info["summary"]["step"]
        assert (job.dir / "checkpoints" / f"step-{step}" / "trainer_state.json").is_file()
        assert (job.dir / "train.log").stat().st_size > 0
        _wait_for(lambda: not pid_alive(pid), 30, "the cancelled process to exit")
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    # Resume the cancelled job in this process, up to a smaller step budget.
    assert main(["train", "--resume", job_id, f"--max_steps={step + 3}", "--no-progress"]) == 0
    assert job.info()["status"] == "succeeded"
    capsys.readouterr()
    assert main(["jobs", "follow", job_id]) == 0  # a finished job: replay and exit 0
    assert "Job succeeded" in capsys.readouterr().out

    # results: the OpenAI-style CSV, one row per logged step
    out_csv = workspace / "results.csv"
    assert main(["jobs", "results", job_id, "--out", str(out_csv)]) == 0
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert [int(r["step"]) for r in rows] == list(range(1, step + 4))
    assert {
        "train_loss",
        "train_accuracy",
        "train_sequence_accuracy",
        "valid_loss",
        "valid_token_accuracy",
        "valid_sequence_accuracy",
        "learning_rate",
        "tokens_per_second",
    } <= set(rows[0])
    assert rows[2]["valid_loss"] and not rows[0]["valid_loss"]  # evaluated at step 3
    assert all(float(r["train_loss"]) > 0 for r in rows)
    assert main(["jobs", "show", job_id]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["fine_tuned_model"].endswith("adapter") and shown["trained_tokens"] > 0
