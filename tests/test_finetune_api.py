"""OpenAI's fine-tuning workflow, unchanged, against tunedesk: the official `openai` SDK talks to
a real uvicorn server on 127.0.0.1 serving the tiny base with `finetune=True`; jobs train and
merge in subprocesses on a temporary workspace (TUNEDESK_HOME).

One server per module (restarted once, by the restart test). Jobs are a few steps of LoRA on
48 sample conversations, so most of each job's time is the subprocesses importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from test_serve_support import build_tiny, cache_root

from tunedesk.serve.auth import KeyStore
from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings
from tunedesk.train.jobs import pid_alive

KEY = "sk-finetune-test"
WIDGET_KEY = "sk-finetune-widget"
BASE = "tiny"
JOB_TIMEOUT = 300  # seconds; a job is ~10-40 s on an idle 2-core box
# A few quick steps of plain LoRA, one torch thread (the machine is shared).
FAST = {
    "quantization": "none",
    "gradient_checkpointing": False,
    "max_seq_len": 256,
    "max_steps": 4,
    "log_every": 2,
    "eval_every": 0,
    "save_every": 0,
    "num_threads": 1,
}
SMALL_BATCH = {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}}


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    from tunedesk.train.sample_data import generate_pairs

    return [
        {
            "messages": [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": p["completion"]},
            ]
        }
        for p in generate_pairs(n, seed=seed)
    ]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


TRAIN = jsonl(chat_rows(48))
UPLOAD_LIMIT = 100_000


class Server:
    """The server under test; `restart()` replaces it with a fresh one on the same workspace."""

    def __init__(self, home: Path, tiny: Path) -> None:
        self.home, self.tiny = home, tiny
        self.thread = None

    def start(self) -> Server:
        from tunedesk.serve.app import create_app
        from tunedesk.serve.engines.factory import build_engine
        from tunedesk.serve.testing import ServerThread

        # Other bodies are held to 8 KB, uploads to 100 KB: the 19 KB training file must go
        # through on the upload limit alone.
        settings = ServeSettings(
            finetune=True,
            cpu_threads=1,
            max_running=2,
            max_body_bytes=8_000,
            max_upload_bytes=UPLOAD_LIMIT,
        )
        registry = ModelRegistry()
        registry.register(BASE, str(self.tiny))
        keyfile = self.home / "keys"
        keyfile.write_text(f"{KEY}\n{WIDGET_KEY} name=widget scopes=chat models={BASE}\n")
        keys = KeyStore.load([], keyfile)
        engine = build_engine(settings, registry)
        self.thread = ServerThread(create_app(settings, engine, keys=keys)).start()
        self.thread.wait_ready()
        self.client = OpenAI(base_url=self.thread.base_url, api_key=KEY, max_retries=0, timeout=60)
        return self

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.thread = None

    def status_json(self, job_id: str) -> dict:
        return json.loads((self.home / "runs" / job_id / "status.json").read_text())


def _kill_leftover_training(home: Path) -> None:
    """Training processes outlive the server by design: stop any a failed test left behind."""
    from tunedesk.train.jobs import ACTIVE

    for status_path in (home / "runs").glob("ftjob-*/status.json"):
        status = json.loads(status_path.read_text())
        pid = status.get("pid")
        if status["status"] in ACTIVE and pid and pid_alive(pid, status.get("pid_start")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(pytestconfig, tmp_path_factory):
    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    home = tmp_path_factory.mktemp("ft-home")
    with pytest.MonkeyPatch.context() as mp:
        # The workspace: where the server keeps files and jobs, and where the training and
        # merge subprocesses (and `tunedesk jobs list`) look.
        mp.setenv("TUNEDESK_HOME", str(home))
        srv = Server(home, tiny).start()
        try:
            yield srv
        finally:
            srv.stop()
            _kill_leftover_training(home)


def wait_for(client: OpenAI, job_id: str, statuses: set[str], timeout: float = JOB_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        if job.status in {"succeeded", "failed", "cancelled"} or time.monotonic() > deadline:
            events = client.fine_tuning.jobs.list_events(job_id, limit=30).data
            log = "\n".join(f"  [{e.level}] {e.message}" for e in reversed(events))
            raise AssertionError(
                f"job {job_id} is {job.status} (error {job.error}), wanted {statuses}:\n{log}"
            )
        time.sleep(0.25)


# --- files ----------------------------------------------------------------------------------


def test_upload_refuses_an_unreadable_file_naming_its_lines(server):
    client = server.client
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("notes.jsonl", b"hello\n{not json\n"), purpose="fine-tune")
    message = err.value.body["message"]
    assert "notes.jsonl" in message and "line 1" in message and "line 2" in message
    assert err.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("a.jsonl", TRAIN), purpose="assistants")
    assert err.value.body["param"] == "purpose"
    # A chat widget's restricted key may not upload training data (or start jobs).
    widget = OpenAI(base_url=server.thread.base_url, api_key=WIDGET_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        widget.files.create(file=("a.jsonl", TRAIN), purpose="fine-tune")
    with pytest.raises(openai.PermissionDeniedError):
        widget.fine_tuning.jobs.list()


def test_uploads_have_their_own_size_limit_and_need_a_key_first(server):
    assert 8_000 < len(TRAIN) < UPLOAD_LIMIT  # over the body limit, under the upload limit
    big = TRAIN * (UPLOAD_LIMIT // len(TRAIN) + 1)
    with pytest.raises(openai.APIStatusError) as err:
        server.client.files.create(file=("big.jsonl", big), purpose="fine-tune")
    assert err.value.status_code == 413 and str(UPLOAD_LIMIT) in err.value.body["message"]
    # Other routes keep the small limit.
    with pytest.raises(openai.APIStatusError) as err:
        server.client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "x" * 9_000}], max_tokens=1
        )
    assert err.value.status_code == 413
    # Without a key the upload is refused before its body is read: the 401 comes back while
    # the client has sent 100 of the 90,000 bytes it announced.
    anonymous = OpenAI(base_url=server.thread.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.files.create(file=("a.jsonl", TRAIN), purpose="fine-tune")
    with socket.create_connection((server.thread.host, server.thread.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-wrong\r\n"
            b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 90000\r\n\r\n"
            + b"--xyz\r\n"
            + b"x" * 93
        )
        assert s.recv(4096).startswith(b"HTTP/1.1 401")
    # Missing fields and a broken multipart body are 400s.
    url = server.thread.base_url + "/files"
    headers = {"Authorization": f"Bearer {KEY}"}
    no_file = httpx.post(url, headers=headers, data={"purpose": "fine-tune"})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    no_purpose = httpx.post(url, headers=headers, files={"file": ("a.jsonl", TRAIN)})
    assert no_purpose.status_code == 400 and no_purpose.json()["error"]["param"] == "purpose"
    broken = httpx.post(
        url,
        headers={**headers, "Content-Type": "multipart/form-data; boundary=xyz"},
        content=b"--xyz\r\nnot a part",
    )
    assert broken.status_code == 400 and "error" in broken.json()


def test_files_create_list_retrieve_content_delete(server):
    client = server.client
    f = client.files.create(file=("fund_qa.jsonl", TRAIN), purpose="fine-tune")
    assert f.id.startswith("file-") and f.object == "file" and f.purpose == "fine-tune"
    assert f.status == "processed" and f.bytes == len(TRAIN) and f.filename == "fund_qa.jsonl"
    assert client.files.retrieve(f.id).created_at == f.created_at
    assert client.files.content(f.id).content == TRAIN
    listed = client.files.list(purpose="fine-tune", limit=1)
    assert listed.data[0].id == f.id  # newest first
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


# --- jobs -----------------------------------------------------------------------------------


def test_bad_create_requests_are_openai_errors(server):
    client = server.client
    f = client.files.create(file=("t.jsonl", TRAIN), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError) as err:
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=f.id)
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=BASE, training_file="file-nope")
    assert err.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(
            model=BASE, training_file=f.id, extra_body={"tunedesk": {"lora_rank": 8}}
        )
    assert err.value.body["param"] == "tunedesk.lora_rank" and "lora_r" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(
            model=BASE, training_file=f.id, extra_body={"tunedesk": {"lora_r": 0}}
        )
    assert err.value.body["param"] == "tunedesk.lora_r"


def test_a_file_without_usable_records_fails_the_job_with_the_reason(server):
    client = server.client
    bad = jsonl(
        [
            {"messages": [{"role": "user", "content": "你好"}]},
            {"messages": [{"role": "user", "content": "申购费是多少？"}, {"role": "assistant"}]},
        ]
    )
    f = client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert f.status == "error" and "line 1" in f.status_details
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    job = wait_for(client, job.id, {"failed"}, timeout=60)
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    message = job.error.message
    assert "no usable examples" in message and "bad.jsonl" in message
    assert message.endswith(
        "no usable examples: line 1: no assistant turn: there is nothing to learn "
        "[no_assistant_turn]; line 2: field 'messages[1].content' is missing [missing_field]"
    )
    # The training job (same id, same folder) agrees, and never started a process.
    status = server.status_json(job.id)
    assert status["status"] == "failed" and status["pid"] is None


def test_seed_workflow_train_events_checkpoints_chat(server):
    client = server.client
    train = client.files.create(file=("fund_qa.jsonl", TRAIN), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=train.id,
        suffix="faq",
        seed=7,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2}
            },
        },
        extra_body={"tunedesk": FAST},
    )
    assert job.id.startswith("ftjob-") and job.status == "validating_files"
    assert job.model == BASE and job.training_file == train.id and job.seed == 7
    assert job.hyperparameters.batch_size == 4 and job.hyperparameters.n_epochs == 1
    assert job.hyperparameters.learning_rate_multiplier == 2
    assert job.fine_tuned_model is None

    job = wait_for(client, job.id, {"succeeded"})
    assert job.fine_tuned_model == f"ft:{BASE}:faq:{job.id}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at
    assert job.error is None and len(job.result_files) == 1

    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    assert events[0].message == "The job has successfully completed"  # newest first
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    assert all(e.object == "fine_tuning.job.event" for e in events)
    train_m = [e for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert [e.message.split(":")[0] for e in train_m] == ["Step 4/4", "Step 2/4"]
    assert train_m[0].message.startswith("Step 4/4: training loss=")
    assert train_m[0].data["step"] == 4 and train_m[0].data["train_loss"] > 0
    # No validation file: 10% of the training file was held out and evaluated at the end.
    (val_m,) = [e for e in events if e.type == "metrics" and "valid_loss" in e.data]
    assert val_m.message.startswith("Step 4/4: validation loss=")
    first = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert first.has_more and len(first.data) == 2
    second = client.fine_tuning.jobs.list_events(job.id, limit=2, after=first.data[-1].id)
    assert second.data[0].id == events[2].id

    (ckpt,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpt.object == "fine_tuning.job.checkpoint" and ckpt.step_number == 4
    assert ckpt.fine_tuning_job_id == job.id
    assert ckpt.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-4"
    assert ckpt.metrics.step == 4 and ckpt.metrics.train_loss == train_m[0].data["train_loss"]
    assert ckpt.metrics.full_valid_loss == val_m.data["valid_loss"]

    served = {m.id for m in client.models.list()}
    assert {job.fine_tuned_model, ckpt.fine_tuned_model_checkpoint} <= served
    reply = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": "申购费是多少？"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.model == job.fine_tuned_model and reply.choices[0].message.content

    results = client.files.retrieve(job.result_files[0])
    assert results.purpose == "fine-tune-results" and results.filename == "step_metrics.csv"
    csv_text = client.files.content(results.id).text
    assert csv_text.startswith("step,epoch,train_loss") and "\n4," in csv_text

    page = client.fine_tuning.jobs.list(limit=1)
    assert page.data[0].id == job.id and page.has_more  # newest first; older jobs follow


def test_cancel_a_running_job(server):
    client = server.client
    train = client.files.create(file=("fund_qa.jsonl", TRAIN), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=train.id,
        method=SMALL_BATCH,
        extra_body={"tunedesk": {**FAST, "max_steps": 5000}},
    )
    wait_for(client, job.id, {"running"}, timeout=120)
    pid = server.status_json(job.id)["pid"]
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    # The trainer stops at the next step (with a checkpoint) and exits.
    deadline = time.monotonic() + 120
    while server.status_json(job.id)["status"] != "cancelled" or pid_alive(pid):
        assert time.monotonic() < deadline, server.status_json(job.id)
        time.sleep(0.2)
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


def test_a_server_restart_mid_job_resumes_it_from_its_last_checkpoint(server):
    client = server.client
    train = client.files.create(file=("fund_qa.jsonl", TRAIN), purpose="fine-tune")
    fields = {**FAST, "max_steps": 30, "save_every": 3, "log_every": 3}
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=train.id,
        suffix="restart",
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"batch_size": 4, "n_epochs": 3}},
        },
        extra_body={"tunedesk": fields},
    )
    # Wait for the first checkpoint (on disk: polling the API would lose time to the race).
    checkpoints = server.home / "runs" / job.id / "checkpoints"
    deadline = time.monotonic() + 180
    while not any(checkpoints.glob("step-*")):
        assert time.monotonic() < deadline, client.fine_tuning.jobs.retrieve(job.id)
        time.sleep(0.05)
    # The machine "crashes": the trainer is frozen, the server goes away, the trainer dies.
    pid = server.status_json(job.id)["pid"]
    os.kill(pid, signal.SIGSTOP)
    assert server.status_json(job.id)["status"] == "running", "the job ended before the crash"
    server.stop()
    os.kill(pid, signal.SIGKILL)
    # A process takes a moment to die after SIGKILL: start the new server after it has, as
    # after a real crash (a trainer still alive at start-up is adopted, and a later death fails
    # the job).
    deadline = time.monotonic() + 30
    while pid_alive(pid, server.status_json(job.id).get("pid_start")):
        assert time.monotonic() < deadline, "the killed trainer did not exit"
        time.sleep(0.02)
    server.start()  # a new server on the same workspace

    client = server.client
    # The old server's worker stopped (joined) before the trainer died, so the new server's
    # first look at the job finds its process dead while nobody watched: it resumes the job
    # from the last checkpoint rather than failing it.
    job = wait_for(client, job.id, {"succeeded", "failed"})
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=500).data]
    assert job.status == "succeeded", (job.error, messages[:5])
    assert any(f"pid {pid}" in m for m in messages)  # the death is on record
    assert any("resuming from its newest checkpoint (step-" in m for m in messages)
    assert any(m.startswith("Resumed from checkpoint step-") for m in messages)
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number == 30
    assert job.fine_tuned_model in {m.id for m in client.models.list()}


def test_delete_a_fine_tuned_model_and_a_checkpoint(server):
    """`client.models.delete`: a checkpoint's name alone, then the fine-tune with its merged
    weights; both stay deleted after a restart, and the job keeps its record and adapter."""
    client = server.client
    train = client.files.create(file=("fund_qa.jsonl", TRAIN), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=train.id,
        suffix="old",
        method=SMALL_BATCH,
        extra_body={"tunedesk": {**FAST, "save_every": 2}},
    )
    job = wait_for(client, job.id, {"succeeded"})
    ft = job.fine_tuned_model
    steps = {c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data}
    assert steps == {2, 4}
    early, final = f"{ft}:ckpt-step-2", f"{ft}:ckpt-step-4"
    assert {ft, early, final} <= {m.id for m in client.models.list()}

    widget = OpenAI(base_url=server.thread.base_url, api_key=WIDGET_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        widget.models.delete(ft)
    with pytest.raises(openai.PermissionDeniedError, match="not made by this server"):
        client.models.delete(BASE)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(f"ft:{BASE}:nope:ftjob-0")

    gone = client.models.delete(early)
    assert (gone.id, gone.object, gone.deleted) == (early, "model", True)
    served = {m.id for m in client.models.list()}
    assert early not in served and {ft, final} <= served
    server.stop()
    server.start()
    client = server.client
    served = {m.id for m in client.models.list()}
    assert early not in served and {ft, final} <= served

    merged = server.home / "runs" / job.id / "merged"
    assert (merged / "config.json").is_file()
    gone = client.models.delete(ft)
    assert (gone.id, gone.deleted) == (ft, True)
    served = {m.id for m in client.models.list()}
    assert not {ft, early, final} & served and BASE in served
    assert not merged.exists() and not (merged.parent / "merged.deleted").exists()
    assert (server.home / "runs" / job.id / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=ft, messages=[{"role": "user", "content": "q"}])
    with pytest.raises(openai.NotFoundError):
        client.models.delete(ft)
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded" and job.fine_tuned_model == ft  # as OpenAI keeps it
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data]
    assert f"Fine-tuned model deleted: {ft}" in events

    server.stop()
    server.start()
    served = {m.id for m in server.client.models.list()}
    assert not {ft, early, final} & served and BASE in served


def test_api_jobs_are_the_tunedesk_jobs(server):
    """One store: `tunedesk jobs list` (a separate process, same runs folder) shows every API
    job with the same status."""
    api = {j.id: j.status for j in server.client.fine_tuning.jobs.list(limit=100).data}
    assert api and all(s in ("succeeded", "failed", "cancelled") for s in api.values())
    out = subprocess.run(
        [sys.executable, "-m", "tunedesk", "jobs", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TUNEDESK_HOME": str(server.home)},
    ).stdout
    cli = {row["id"]: row["status"] for row in map(json.loads, out.splitlines())}
    assert cli == api
    table = subprocess.run(
        [sys.executable, "-m", "tunedesk", "jobs", "--runs-dir", str(server.home / "runs"), "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert all(job_id in table for job_id in api)


def test_serve_flag_turns_the_api_on():
    from tunedesk.cli import build_parser
    from tunedesk.serve.commands import settings_from_args

    args = build_parser().parse_args(["serve", "--finetune", "--finetune-max-jobs", "2"])
    settings = settings_from_args(args)
    assert settings.finetune and settings.finetune_max_jobs == 2
    assert not settings_from_args(build_parser().parse_args(["serve"])).finetune
