"""`make demo`: the main job end to end on the embedded default, step by step.

Each step runs the real `tunedesk` command in a subprocess, exactly as a user would type it,
so the demo exercises the product rather than a shortcut through it:

1. build the tiny base   2. generate and prepare the data   3. QLoRA-train   4. merge
5. evaluate base against fine-tuned (report.html)   6. serve, ask one question through the
official `openai` client, print the answer, stop the server.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "医药和消费有什么基金推荐的"


def _run(title: str, *args: str, timings: list[tuple[str, float]]) -> None:
    print(f"\n\033[1m==> {title}\033[0m\n$ tunedesk {' '.join(args)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tunedesk", *args])
    timings.append((title, time.perf_counter() - started))
    if done.returncode != 0:
        raise SystemExit(f"demo step failed: tunedesk {' '.join(args)} (exit {done.returncode})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(model_dir: Path, timings: list[tuple[str, float]]) -> str:
    import httpx
    from openai import OpenAI

    port = _free_port()
    title = "serve and ask one question"
    cmd = [
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--served-model-name",
        "fund-assistant",
    ]
    print(f"\n\033[1m==> {title}\033[0m\n$ tunedesk {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "tunedesk", *cmd])
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited early (exit {server.returncode})")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("the server did not become ready within 120 s")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo")
        reply = client.chat.completions.create(
            model="fund-assistant",
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=200,
        )
        answer = reply.choices[0].message.content or ""
        print(f"\nQ: {QUESTION}\nA: {answer}\n", flush=True)
        return answer
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        timings.append((title, time.perf_counter() - started))


def main() -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP workers that spin while waiting steal the other core from the tokenizer, the
    # data loader and the server's event loop; waiting asleep costs nothing here.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    timings: list[tuple[str, float]] = []
    started = time.perf_counter()
    job = f"ftjob-{secrets.token_hex(6)}"
    merged = Path("models") / f"{job}-merged"
    _run(
        "build the tiny base (offline, briefly pre-trained on the domain corpus)",
        "base",
        "build",
        "--pretrain-steps",
        os.environ.get("TUNEDESK_DEMO_PRETRAIN_STEPS", "600"),
        "--pretrain-batch-size",
        "8",
        "--pretrain-seq-len",
        "128",
        timings=timings,
    )
    _run(
        "generate the sample fund Q&A",
        "data",
        "sample",
        "--out",
        "data/fund_qa.jsonl",
        timings=timings,
    )
    _run(
        "prepare: validate, clean, dedup, split",
        "prepare",
        "data/fund_qa.jsonl",
        "--out",
        "data/prepared",
        "--show",
        "5",
        timings=timings,
    )
    # One training process per core (up to 2): on small models a second process gains far
    # more than a second thread per matmul (see configs/tiny-cpu.yaml).
    processes = str(max(1, min(2, os.cpu_count() or 1)))
    _run(
        "QLoRA fine-tune",
        "train",
        "configs/tiny-cpu.yaml",
        "--processes",
        processes,
        "--job-id",
        job,
        timings=timings,
    )
    _run("merge the adapter", "merge", job, "--out", str(merged), timings=timings)
    _run(
        "evaluate base vs fine-tuned",
        "eval",
        "--model",
        "base=models/tiny-base",
        "--model",
        f"ft={job}",
        "--data",
        "data/prepared/test.jsonl",
        "--out",
        "out/eval",
        timings=timings,
    )
    _ask(merged, timings)

    total = time.perf_counter() - started
    print("\033[1mdemo finished\033[0m")
    for title, seconds in timings:
        print(f"  {seconds:7.1f} s  {title}")
    print(f"  {total:7.1f} s  total")
    summary_path = Path("out/eval/summary.json")
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        f1 = {m["label"]: m["metrics"].get("char_f1") for m in summary.get("models", [])}
        if f1.get("base") is not None and f1.get("ft") is not None:
            print(
                f"  held-out char-F1: base {f1['base']:.3f} -> fine-tuned {f1['ft']:.3f} "
                f"({f1['ft'] - f1['base']:+.3f})"
            )
        print("  report: out/eval/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
