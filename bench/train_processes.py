"""Benchmark: `tunedesk train --processes N` against one process using every core's threads.

Runs the real command three times on the same recipe (configs/tiny-cpu.yaml unless --config),
one after the other, each for --steps optimizer steps with evaluation and checkpoints off:

- one process, torch's default threads (one per core): what a plain `tunedesk train` does;
- one process, one thread;
- `--processes N` (default: one per core), each process with cores/N threads.

Prints trained tokens/s (the job summary's `tokens_per_second`: non-pad tokens over the time
spent in optimizer steps), the final train loss (the runs see the same batches, so it should
agree to a few decimals) and the ratios against the first run.

    python bench/train_processes.py                       # models/tiny-base, data/prepared
    python bench/train_processes.py --base DIR --data PREPARED_DIR --steps 120
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(label: str, args: argparse.Namespace, runs: Path, job: str, extra: list[str], env: dict):
    cmd = [sys.executable, "-m", "tunedesk", "train", args.config, "--job-id", job]
    cmd += ["--no-progress", f"--base_model={args.base}", f"--data_dir={args.data}"]
    cmd += [f"--runs_dir={runs}", f"--max_steps={args.steps}", "--eval_every=0", "--save_every=0"]
    cmd += [f"--log_every={args.steps}", *extra]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((runs / job / "summary.json").read_text())
    return {
        "label": label,
        "tokens_per_second": summary["tokens_per_second"],
        "train_seconds": summary["train_seconds"],
        "train_loss": summary["train_loss"],
        "processes": summary["processes"],
    }


def main(argv: list[str] | None = None) -> int:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--base", default="models/tiny-base")
    p.add_argument("--data", default="data/prepared")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--processes", type=int, default=max(2, cores))
    args = p.parse_args(argv)
    for what, path in (("--base", args.base), ("--data", args.data)):
        if not (ROOT / path).exists() and not Path(path).exists():
            sys.exit(f"{what} {path} not found (run `make demo` once, or pass {what}=...)")

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "WORLD_SIZE")}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    results = []
    with tempfile.TemporaryDirectory(prefix="tunedesk-bench-procs-") as tmp:
        runs = Path(tmp)
        results.append(
            run(f"1 process x {cores} threads", args, runs, "ftjob-b0000000000a", [], env)
        )
        one = {**env, "OMP_NUM_THREADS": "1"}
        results.append(run("1 process x 1 thread", args, runs, "ftjob-b0000000000b", [], one))
        n = args.processes
        label = f"{n} processes x {max(1, cores // n)} thread(s)"
        procs = ["--processes", str(n)]
        results.append(run(label, args, runs, "ftjob-b0000000000c", procs, env))

    base = results[0]["tokens_per_second"]
    print(f"\n{cores} cores, {args.steps} steps of {args.config}\n")
    print("| run | tokens/s | step time (s) | train loss | tokens/s ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        ratio = r["tokens_per_second"] / base
        print(
            f"| {r['label']} | {r['tokens_per_second']:.0f} | {r['train_seconds']:.1f} "
            f"| {r['train_loss']:.4f} | {ratio:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
