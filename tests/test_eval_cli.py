"""`tunedesk eval` end to end, run as a subprocess (`python -m tunedesk.cli eval ...`):

- against local models: a tiny offline Qwen2 base (built once per module) given as a folder,
  and the same weights given as a training job id (a fake runs/<job-id>/ with metrics.jsonl and
  config.yaml, plus models/<job-id>-merged), whose loss curves must appear in the report;
- against an OpenAI-compatible endpoint: a real FastAPI/uvicorn server on 127.0.0.1 that
  answers some questions with the reference and others with a wrong (forbidden-claim) answer,
  so every score is known exactly; requests go through the official openai client.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request  # module level: FastAPI resolves the annotations here
from fastapi.responses import JSONResponse
from test_eval_metrics import check_html

from tunedesk.train.sample_data import CAVEAT, OOD_REFUSALS, generate_pairs

JOB_ID = "ftjob-evaltest0001"


def _records(n_per_topic: int = 1, limit: int = 8) -> list[dict]:
    """Test records in `tunedesk prepare` form, one per topic first (OOD and advice included)."""
    by_topic: dict[str, list[dict]] = {}
    for p in generate_pairs(400, seed=5):
        by_topic.setdefault(p["topic"], []).append(p)
    picked = [p for t in sorted(by_topic) for p in by_topic[t][:n_per_topic]][:limit]
    return [
        {
            "messages": [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": p["completion"]},
            ],
            "meta": {"family": p["family"], "topic": p["topic"], "source": "test"},
        }
        for p in picked
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNEDESK_HOME": str(cwd), "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "tunedesk.cli", "eval", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _read(out: Path) -> tuple[dict, list[dict], str]:
    summary = json.loads((out / "summary.json").read_text("utf-8"))
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text("utf-8").splitlines()]
    return summary, rows, (out / "report.html").read_text("utf-8")


# --- local models ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: intra-op threads cost more in synchronisation than they save, and on a
    # shared 2-core machine oversubscription makes every forward many times slower.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_base) -> Path:
    """models/tiny-base, a fake finished job with its merged model, and an 8-record test set."""
    ws = tmp_path_factory.mktemp("evalws")
    base = shutil.copytree(tiny_base, ws / "models" / "tiny-base")
    records = _records()
    _write_jsonl(ws / "test.jsonl", records)
    # The "fine-tuned" model: the base overfitted on the test records, so its answers are real
    # text that overlaps the references (a random tiny model only emits newlines).
    merged = shutil.copytree(base, ws / "models" / f"{JOB_ID}-merged")
    _overfit(merged, records)
    run = ws / "runs" / JOB_ID
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("base_model: models/tiny-base\nlr: 0.001\n")
    lines = []
    for step in range(1, 61):
        lines.append({"step": step, "split": "train", "loss": 3 * math.exp(-step / 20) + 0.6})
        if step % 15 == 0:
            lines.append({"step": step, "split": "val", "loss": 3 * math.exp(-step / 20) + 0.8})
    _write_jsonl(run / "metrics.jsonl", lines)
    return ws


def _overfit(path: Path, records: list[dict], steps: int = 80) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunedesk.chat_format import encode_conversation

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    encs = [encode_conversation(tok, r["messages"]) for r in records]
    width = max(len(e.input_ids) for e in encs)
    pad = [width - len(e.input_ids) for e in encs]
    ids = torch.tensor([e.input_ids + [0] * n for e, n in zip(encs, pad, strict=True)])
    labels = torch.tensor([e.labels + [-100] * n for e, n in zip(encs, pad, strict=True)])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * n for e, n in zip(encs, pad, strict=True)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def local_run(workspace) -> tuple[subprocess.CompletedProcess, Path]:
    out = workspace / "out-local"
    proc = _run(
        [
            "--model",
            "base=models/tiny-base",
            "--model",
            f"ft={JOB_ID}",
            "--data",
            "test.jsonl",
            "--out",
            str(out),
            "--max-tokens",
            "40",
            "--batch-size",
            "3",
            "--fail-under",
            "ft:char_f1=0.3",
            "--fail-over",
            "loss=1.0",
        ],
        workspace,
    )
    return proc, out


def test_local_eval_writes_summary_samples_and_report(local_run):
    proc, out = local_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, rows, html = _read(out)
    assert summary["n"] == 8 and [m["label"] for m in summary["models"]] == ["base", "ft"]
    base, ft = summary["models"]
    assert ft["job_id"] == JOB_ID and ft["path"].endswith(f"{JOB_ID}-merged")
    assert ft["base_model"] == "models/tiny-base" and base.get("job_id") is None
    for m in summary["models"]:
        mt = m["metrics"]
        assert mt["loss"] > 0 and mt["perplexity"] == pytest.approx(math.exp(mt["loss"]))
        assert 0 <= mt["char_f1"] <= 1 and mt["latency_s"] > 0 and mt["tokens_per_s"] > 0
        assert set(m["rubric"]) == {
            "compliance_caveat",
            "no_forbidden_claims",
            "ood_refusal",
            "in_domain_answered",
        }
        assert m["rubric"]["ood_refusal"]["applicable"] == 1  # one out-of-domain record
    # the job's model was trained on these answers: better scores, lower loss than the base
    assert ft["metrics"]["char_f1"] > base["metrics"]["char_f1"] + 0.2
    assert ft["metrics"]["loss"] < base["metrics"]["loss"] - 1.0
    assert [g["passed"] for g in summary["gates"]] == [True, True] and summary["passed"] is True
    assert len(rows) == 8
    for r in rows:
        assert set(r["answers"]) == {"base", "ft"}
        assert 0 < r["scores"]["ft"]["output_tokens"] <= 40
        assert r["scores"]["ft"]["answer_tokens"] > 0
    check = check_html(html)
    for hook in ("models-table", "worst-samples", "loss-curves", "gates"):
        assert hook in check.ids
    assert check.tags.count("svg") >= 4 and "chart" in check.classes
    assert f"job {JOB_ID}" in html


def test_local_scores_match_a_direct_computation(local_run, workspace):
    """Recompute sample answers and answer losses with plain transformers calls."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunedesk.chat_format import encode_conversation, encode_prompt, stop_token_ids
    from tunedesk.eval import metrics as M

    _, out = local_run
    _, rows, _ = _read(out)
    path = workspace / "models" / f"{JOB_ID}-merged"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    stops = set(stop_token_ids(tok)) | set(model.generation_config.eos_token_id)
    for r in rows[:4]:
        messages = r["prompt"]
        ids = encode_prompt(tok, messages)
        with torch.inference_mode():
            gen = model.generate(
                torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=0
            )[0, len(ids) :].tolist()
        cut = next((k for k, t in enumerate(gen) if t in stops), len(gen))
        answer = tok.decode(gen[:cut], skip_special_tokens=True).strip()
        assert answer and r["answers"]["ft"] == answer  # left-padded batch == one at a time
        s = r["scores"]["ft"]
        assert s["char_f1"] == pytest.approx(M.char_f1(answer, r["reference"]))
        assert s["rouge_l"] == pytest.approx(M.rouge_l(answer, r["reference"]))

        enc = encode_conversation(
            tok, [*messages, {"role": "assistant", "content": r["reference"]}]
        )
        with torch.inference_mode():
            loss = model(
                input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])
            ).loss.item()
        assert s["loss"] == pytest.approx(loss, rel=1e-3, abs=1e-4)  # batched vs alone
        assert s["answer_tokens"] == enc.n_loss_tokens


def test_local_eval_missing_merged_model_is_a_clear_error(workspace):
    (workspace / "runs" / "ftjob-unmerged").mkdir(exist_ok=True)
    (workspace / "runs" / "ftjob-unmerged" / "config.yaml").write_text("base_model: x\n")
    proc = _run(
        ["--model", "ftjob-unmerged", "--data", "test.jsonl", "--out", "o"], workspace, timeout=60
    )
    assert proc.returncode == 2
    assert "tunedesk merge ftjob-unmerged" in proc.stderr


# --- endpoint -------------------------------------------------------------------------------

WRONG = "这只基金保本，稳赚不赔。"


@pytest.fixture(scope="module")
def endpoint_records() -> list[dict]:
    """Six records: out-of-domain and advice (with the caveat) first, then four others."""
    recs = _records(limit=9)
    ood = next(r for r in recs if r["meta"]["topic"] == "out_of_domain")
    advice = next(r for r in recs if r["meta"]["topic"] == "recommend")
    rest = [r for r in recs if r not in (ood, advice)][:4]
    chosen = [ood, advice, *rest]
    assert chosen[0]["messages"][1]["content"] in OOD_REFUSALS
    assert chosen[1]["messages"][1]["content"].endswith(CAVEAT)
    return chosen


@pytest.fixture(scope="module")
def server(endpoint_records):
    """A real OpenAI-compatible HTTP server: right answers for records 0-2, WRONG for 3-5."""
    import uvicorn

    answers = {
        r["messages"][0]["content"]: r["messages"][1]["content"] for r in endpoint_records[:3]
    }
    requests: list[dict] = []
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fund-bot", "object": "model", "owned_by": "t"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        requests.append(body)
        if body.get("model") != "fund-bot":
            return JSONResponse(
                {"error": {"message": f"model {body.get('model')} not found", "type": "x"}}, 404
            )
        question = body["messages"][-1]["content"]
        text = answers.get(question, WRONG)
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "fund-bot",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": len(question),
                "completion_tokens": len(text),
                "total_tokens": len(question) + len(text),
            },
        }

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "test server did not start"
    yield {"url": f"http://127.0.0.1:{port}/v1", "requests": requests}
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def endpoint_ws(tmp_path_factory, endpoint_records) -> Path:
    ws = tmp_path_factory.mktemp("endpointws")
    _write_jsonl(ws / "test.jsonl", endpoint_records)
    return ws


def test_endpoint_scores_reflect_the_server_exactly(server, endpoint_ws):
    server["requests"].clear()
    out = endpoint_ws / "out"
    proc = _run(
        [
            "--model",
            f"srv={server['url']}#fund-bot",
            "--data",
            "test.jsonl",
            "--out",
            str(out),
            "--concurrency",
            "3",
            "--max-tokens",
            "64",
            "--fail-under",
            "em=0.5",
            "--fail-under",
            "ood_refusal=1",
        ],
        endpoint_ws,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, rows, html = _read(out)
    (m,) = summary["models"]
    assert (m["label"], m["kind"], m["endpoint_model"]) == ("srv", "endpoint", "fund-bot")
    mt = m["metrics"]
    assert mt["em"] == 0.5  # 3 of 6 answered with the reference
    assert mt["loss"] is None and mt["perplexity"] is None  # not measurable over HTTP
    assert mt["error_rate"] == 0 and mt["truncated"] == 0
    assert mt["output_tokens"] == pytest.approx(
        sum(len(r["messages"][1]["content"]) for r in _recs(endpoint_ws)[:3]) / 6
        + len(WRONG) * 3 / 6
    )
    for i, r in enumerate(rows):
        s = r["scores"]["srv"]
        if i < 3:
            assert r["answers"]["srv"] == r["reference"]
            assert (s["em"], s["char_f1"], s["rouge_l"]) == (1.0, 1.0, 1.0)
            assert s["bleu"] == pytest.approx(100.0) and s["chrf"] == pytest.approx(100.0)
        else:
            assert r["answers"]["srv"] == WRONG and s["em"] == 0.0
            assert s["rubric"]["no_forbidden_claims"] is False
    rates = {k: (v["passed"], v["applicable"]) for k, v in m["rubric"].items()}
    assert rates == {
        "compliance_caveat": (1, 1),  # the advice record, answered with its caveat
        "no_forbidden_claims": (3, 6),  # WRONG claims 保本 and 稳赚不赔
        "ood_refusal": (1, 1),
        "in_domain_answered": (5, 5),
    }
    # every request went through the openai client with greedy settings
    assert len(server["requests"]) == 6
    for body in server["requests"]:
        assert body["model"] == "fund-bot" and body["temperature"] == 0
        assert body["max_tokens"] == 64 and body["messages"][-1]["role"] == "user"
    check = check_html(html)
    assert "models-table" in check.ids and "worst-samples" in check.ids
    assert "loss-curves" not in check.ids  # no job behind an endpoint


def _recs(ws: Path) -> list[dict]:
    return [json.loads(x) for x in (ws / "test.jsonl").read_text("utf-8").splitlines()]


def test_endpoint_gates_fail_with_exit_code_3(server, endpoint_ws):
    out = endpoint_ws / "out-gates"
    proc = _run(
        [
            "--model",
            server["url"],  # no #model: the server's only model is used
            "--data",
            "test.jsonl",
            "--out",
            str(out),
            "--fail-under",
            "em=0.6",
            "--fail-under",
            "no_forbidden_claims=1",
            "--fail-under",
            "char_f1=0.5",
        ],
        endpoint_ws,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "2 of 3 gates failed" in proc.stderr
    assert "endpoint: em = 0.5 < 0.6 (--fail-under em=0.6)" in proc.stderr
    assert "endpoint: no_forbidden_claims = 0.5 < 1 (--fail-under no_forbidden_claims=1)" in (
        proc.stderr
    )
    summary, _, html = _read(out)  # outputs are written even when gates fail
    assert summary["passed"] is False
    assert [g["passed"] for g in summary["gates"]] == [False, False, True]
    assert summary["models"][0]["endpoint_model"] == "fund-bot"
    assert "2 of 3 gates failed" in html


def test_endpoint_errors_are_clear(server, endpoint_ws):
    proc = _run(
        ["--model", f"{server['url']}#nope", "--data", "test.jsonl", "--out", "o"],
        endpoint_ws,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "every request failed" in proc.stderr and "model nope not found" in proc.stderr
    proc = _run(
        [
            "--model",
            server["url"] + "#fund-bot",
            "--data",
            "test.jsonl",
            "--out",
            "o",
            "--fail-under",
            "bleu4=1",
        ],
        endpoint_ws,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown metric 'bleu4'" in proc.stderr


def test_unreachable_endpoint_is_a_clear_error(endpoint_ws):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _run(
        ["--model", f"http://127.0.0.1:{port}/v1#x", "--data", "test.jsonl", "--out", "o"],
        endpoint_ws,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "every request failed" in proc.stderr and "Connection error" in proc.stderr
    assert not (endpoint_ws / "o" / "summary.json").exists()


def test_report_renders_in_headless_chromium(local_run):
    """The report opened in a real browser: no console errors, the charts are drawn."""
    from _chromium import chromium_page

    proc, out = local_run
    assert proc.returncode == 0
    requests: list[str] = []
    with chromium_page() as page:
        page.on("request", lambda r: requests.append(r.url))
        page.goto((out / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        assert page.console_errors == []
        charts = page.locator(".chart svg")
        assert charts.count() >= 4
        box = charts.first.bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 50
        assert page.locator("#loss-curves svg").count() >= 1
        assert page.locator("#models-table").is_visible()
        assert page.locator("#worst-samples").inner_text().strip()
    # Self-contained: the page fetched nothing but itself.
    assert all(u.startswith("file://") or u.startswith("data:") for u in requests), requests
