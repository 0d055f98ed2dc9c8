"""`tunedesk train` and `tunedesk jobs`: start, follow, inspect and cancel fine-tuning jobs.

Argument parsing only at import time; torch and the training code are imported inside the
handlers (and not at all by `jobs` or `train --detach`, which stay quick).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunedesk.errors import CommandError

TRAIN_EPILOG = """\
examples:
  tunedesk train                                  # the embedded CPU recipe (configs/tiny-cpu.yaml)
  tunedesk train configs/qwen2.5-1.5b-qlora.yaml --lr=1e-4 --epochs=2
  tunedesk train configs/tiny-cpu.yaml --detach   # background job; prints its id
  tunedesk train --resume ftjob-3fa2             # continue from its newest checkpoint
  tunedesk train --processes 2                    # data-parallel: one process per CPU core or GPU
  accelerate launch -m tunedesk.cli train CONFIG --job-id ftjob-<12 hex>   # several GPUs

every field of the config can be overridden with --FIELD=VALUE; `tunedesk train --fields`
lists them with their defaults and meaning.
"""


def register(sub: argparse._SubParsersAction) -> None:
    _register_train(sub)
    _register_jobs(sub)


# --- tunedesk train ---------------------------------------------------------------------------


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="QLoRA/LoRA fine-tune a base model on prepared data (a job under runs/)",
        description="Fine-tune with QLoRA (4-bit NF4 base + LoRA adapters) or LoRA. Each run "
        "is a job with an id and a folder runs/<id>/ (status, events, metrics, checkpoints, "
        "adapter).",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config",
        nargs="?",
        type=Path,
        help="YAML recipe (default: configs/tiny-cpu.yaml; with --resume: the job's own)",
    )
    p.add_argument(
        "--resume",
        metavar="JOB_ID",
        help="continue a job from its newest checkpoint (an id prefix is enough); overrides "
        "such as --max_steps=N apply on top of the job's config",
    )
    p.add_argument(
        "--detach", action="store_true", help="run in the background; print the job id and exit"
    )
    p.add_argument(
        "--job-id",
        default=None,
        help="use this job id (created if new); lets every process of `accelerate launch` "
        "agree on one job",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="train data-parallel in N processes on this machine (torchrun underneath): one "
        "per GPU, or on CPU each with cores/N threads; the batch stays --batch_size in all",
    )
    p.add_argument("--fields", action="store_true", help="list the config fields and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--detached-child", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=_train, accepts_overrides=True)


def _load_cfg(path: Path | None, overrides: list[str]):
    from tunedesk.config import ConfigError, load_config
    from tunedesk.train.config import DEFAULT_CONFIG, TrainConfig

    try:
        return load_config(TrainConfig, path or DEFAULT_CONFIG, overrides)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


def _check_inputs(cfg) -> None:
    """Fail before creating a job when the data or a local base model is plainly missing."""
    from tunedesk.train.config import resolve_path

    data_dir = resolve_path(cfg.data_dir)
    train = resolve_path(cfg.train_file) if cfg.train_file else data_dir / "train.jsonl"
    if not train.is_file():
        flag = "--train_file" if cfg.train_file else "--data_dir"
        raise CommandError(
            f"training data {train} not found (set {flag}=..., or run `tunedesk prepare`)"
        )
    if cfg.val_file and not resolve_path(cfg.val_file).is_file():
        raise CommandError(f"val_file {resolve_path(cfg.val_file)} not found (set --val_file=...)")
    base = cfg.base_model
    looks_local = base.startswith((".", "/", "~")) or base.startswith("models/")
    if looks_local and not resolve_path(base).exists():
        hint = " (run `tunedesk base build`)" if "tiny-base" in base else ""
        raise CommandError(f"base_model {base} not found{hint} (set --base_model=...)")


def _rank() -> int:
    """This process's rank under `accelerate launch` / torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def _train(args: argparse.Namespace) -> int:
    from tunedesk.config import describe
    from tunedesk.train.config import TrainConfig
    from tunedesk.train.jobs import JobError, JobNotFound, JobStore

    if args.fields:
        print(describe(TrainConfig))
        return 0
    if args.resume and args.job_id and args.resume != args.job_id and not args.detached_child:
        raise CommandError("--resume and --job-id name different jobs; give one")
    overrides = list(getattr(args, "overrides", []) or [])

    job = None
    if args.resume:
        # The job is looked up under --runs_dir=..., else the given config's runs_dir, else
        # the workspace's runs/.
        runs_dir = _runs_dir_from(overrides)
        if runs_dir is None and args.config is not None:
            runs_dir = _load_cfg(args.config, []).runs_dir
        store = JobStore(runs_dir)
        try:
            job = store.get(args.resume)
        except JobNotFound as exc:
            raise CommandError(f"--resume: {exc}") from None
        cfg = _load_cfg(args.config or job.config_path, overrides)
    else:
        cfg = _load_cfg(args.config, overrides)
        store = JobStore(cfg.runs_dir)
    _check_inputs(cfg)

    if args.processes < 1:
        raise CommandError("--processes must be 1 or more")
    if args.processes > 1 and "WORLD_SIZE" not in os.environ:
        if args.detach:
            raise CommandError("--processes > 1 runs in the foreground only: drop --detach")
        try:
            # Made here, before any worker starts: a worker must never find the job's folder
            # half made (rank 0 then just opens it).
            job = job or _open_or_create(store, cfg, args.job_id)
        except JobError as exc:
            raise CommandError(str(exc)) from None
        return _launch_processes(args, overrides, store, job.id)

    if _rank() != 0:
        # A non-main process of a multi-GPU launch: train only; rank 0 keeps the job's books.
        if not (args.job_id or args.resume):
            raise CommandError("with several processes, pass --job-id ftjob-<12 hex> to all")
        from tunedesk.train.loop import run_training

        run_training(cfg, store.root / (args.resume or args.job_id), bool(args.resume), False)
        return 0

    try:
        job = job or _open_or_create(store, cfg, args.job_id)
        if (args.resume or args.config or overrides) and not args.detached_child:
            _save_config(job, cfg)
        if args.detach:
            store.start(job, resume=bool(args.resume))
            print(job.id)
            print(
                f"started in the background; follow it with `tunedesk jobs follow {job.id}`",
                file=sys.stderr,
            )
            return 0
        handler = _setup_logging(job.log_path, to_file=not args.detached_child)
        print(f"job {job.id}: {job.dir}", file=sys.stderr)
        progress = not args.no_progress and not args.detached_child and sys.stderr.isatty()
        try:
            final = store.run(
                job, resume=bool(args.resume), progress=progress, spawned=args.detached_child
            )
        finally:
            if handler is not None:
                logging.getLogger("tunedesk").removeHandler(handler)
                handler.close()
    except JobError as exc:
        raise CommandError(str(exc)) from None
    _print_final(final)
    if final["status"] == "cancelled" and os.environ.get(_STATUS_EXIT) == "1":
        # torchrun reports a non-zero exit as a crashed worker, with a page of traceback; a
        # cancel is a deliberate stop, and `--processes` maps the job's status back to exit 1.
        return 0
    return 0 if final["status"] == "succeeded" else 1


# Set by `--processes` for its workers: the launching process turns the job's status into
# the exit code, so a worker of a cancelled job exits 0 (a manual torchrun or accelerate launch
# keeps exit 1 for a cancel, as one process does).
_STATUS_EXIT = "TUNEDESK_PARENT_READS_STATUS"


def _open_or_create(store, cfg, job_id: str | None):
    """The job named `job_id` (created if new), or a new job with a random id."""
    from tunedesk.train.jobs import JobNotFound

    if job_id is None:
        return store.create(cfg)
    try:
        return store.get(job_id)
    except JobNotFound:
        return store.create(cfg, job_id=job_id)


def _launch_processes(
    args: argparse.Namespace, overrides: list[str], store: Any, job_id: str
) -> int:
    """Run this same command in `args.processes` processes under torchrun, one job for all.

    On CPU, small models gain little from a second thread per matmul, while a second process
    doubles the work done at once: on the tiny recipe, 2 processes x 1 thread trained 1.5x
    faster than 1 process x 2 threads (bench/train_processes.py). The global batch is
    unchanged (each process takes its share), so the recipe means the same thing with any
    process count.
    """
    n = args.processes
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    argv += ["-m", "tunedesk.cli", "train"]
    if args.config is not None:
        argv.append(str(args.config))
    argv += ["--resume", job_id] if args.resume else ["--job-id", job_id]
    if args.no_progress:
        argv.append("--no-progress")
    argv += overrides
    env = dict(os.environ)
    # torch's default is one thread per core in every process: N processes would fight over
    # the cores. (Ignored on GPU, where each process drives its own device.)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env[_STATUS_EXIT] = "1"
    print(f"job {job_id}: {n} processes (torchrun)", file=sys.stderr)
    # torchrun in a session of its own: Ctrl-C in a terminal reaches the whole foreground
    # group, and torchrun answers any signal with a traceback while it stops the workers.
    # Stops go to the workers instead, which checkpoint and end the job as cancelled (a
    # second Ctrl-C aborts, as with one process); torchrun then exits quietly.
    returncode = _run_forwarding_stops(argv, env)
    if store.get(job_id).info()["status"] == "succeeded":
        return 0
    return returncode or 1  # as with one process, only a succeeded job exits 0


def _run_forwarding_stops(argv: list[str], env: dict[str, str]) -> int:
    """Run the launcher `argv` in a session of its own until it exits, passing each SIGINT,
    SIGTERM or SIGHUP this process gets on to its workers as a SIGINT; its exit code."""
    import psutil

    asked = sent = 0

    def ask(signum: int, frame: Any) -> None:
        nonlocal asked
        asked += 1

    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    # Caught before the launcher starts: a stop in between must not leave it running alone.
    previous = {sig: signal.signal(sig, ask) for sig in stop_signals}
    try:
        launcher = subprocess.Popen(
            argv, env=env, start_new_session=True, preexec_fn=_stop_when_parent_dies()
        )
        while launcher.poll() is None:
            if sent < asked:
                # Workers not started yet get it on a later turn, once they are.
                with contextlib.suppress(psutil.Error):
                    workers = psutil.Process(launcher.pid).children()
                    for worker in workers:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            worker.send_signal(signal.SIGINT)
                    sent += 1 if workers else 0
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(timeout=0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return launcher.returncode


def _stop_when_parent_dies() -> Callable[[], None] | None:
    """For the launcher's child side of fork: a SIGTERM when this process dies, SIGKILL
    included, so torchrun (in a session of its own, out of the terminal's reach) stops its
    workers, which checkpoint and end the job as cancelled, instead of training on unowned.
    Linux only (prctl); elsewhere None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # before the fork: the child only calls it
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def in_child() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


def _runs_dir_from(overrides: list[str]) -> str | None:
    from tunedesk.config import parse_overrides

    try:
        return parse_overrides(overrides).get("runs_dir")
    except Exception:
        return None


def _save_config(job, cfg) -> None:
    from tunedesk.io import atomic_write_text
    from tunedesk.train.config import dump_yaml

    atomic_write_text(job.config_path, dump_yaml(cfg))


class _TqdmHandler(logging.Handler):
    """Log lines above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging(log_path: Path, to_file: bool) -> logging.Handler | None:
    """Training logs to stderr; in the foreground also to the job's train.log (a detached
    process's stderr already is train.log)."""
    root = logging.getLogger("tunedesk")
    root.setLevel(logging.INFO)
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        console = _TqdmHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(console)
    if not to_file:
        return None
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(file_handler)
    return file_handler


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_final(job: dict[str, Any]) -> None:
    s = job.get("summary") or {}
    print(f"{job['id']}: {job['status']}")
    if job.get("error"):
        print(f"  error: [{job['error']['code']}] {job['error']['message']}")
    if s:
        print(f"  steps        {s['step']}/{s['total_steps']} (epoch {s['epoch']})")
        print(
            f"  train        loss {_fmt(s['train_loss'])}  token acc "
            f"{_fmt(s['train_token_accuracy'], 3)}  sequence acc "
            f"{_fmt(s['train_sequence_accuracy'], 3)}"
        )
        print(
            f"  validation   loss {_fmt(s['val_loss'])}  token acc "
            f"{_fmt(s['val_token_accuracy'], 3)}  sequence acc "
            f"{_fmt(s['val_sequence_accuracy'], 3)}"
        )
        print(
            f"  throughput   {s['tokens_per_second']:.0f} tokens/s, {s['train_seconds']:.0f}s "
            f"training, {s['wall_seconds']:.0f}s in all"
        )
    if job.get("fine_tuned_model"):
        print(f"  adapter      {job['fine_tuned_model']}")


# --- tunedesk jobs ----------------------------------------------------------------------------


def _register_jobs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list, follow, inspect and cancel fine-tuning jobs")
    p.add_argument("--runs-dir", default=None, help="default: runs/ of the workspace")
    jsub = p.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)

    ls = jsub.add_parser("list", help="all jobs, newest first")
    ls.add_argument("--json", action="store_true", help="one job object per line")
    ls.set_defaults(handler=_jobs_list)

    show = jsub.add_parser("show", help="the job object (status.json) as JSON")
    show.add_argument("job_id", metavar="ID")
    show.set_defaults(handler=_jobs_show)

    follow = jsub.add_parser(
        "follow", help="print events and metrics as they come until the job ends (exit 0 if ok)"
    )
    follow.add_argument("job_id", metavar="ID")
    follow.add_argument("--interval", type=float, default=1.0, help="poll period in seconds")
    follow.add_argument("--json", action="store_true", help="print raw event lines")
    follow.set_defaults(handler=_jobs_follow)

    results = jsub.add_parser("results", help="metrics as CSV (OpenAI fine-tune results style)")
    results.add_argument("job_id", metavar="ID")
    results.add_argument("--out", type=Path, default=None, help="write to FILE (default stdout)")
    results.set_defaults(handler=_jobs_results)

    cancel = jsub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id", metavar="ID")
    cancel.set_defaults(handler=_jobs_cancel)


def _store(args: argparse.Namespace):
    from tunedesk.train.jobs import JobStore

    return JobStore(args.runs_dir)


def _get(args: argparse.Namespace):
    from tunedesk.train.jobs import JobNotFound

    try:
        return _store(args).get(args.job_id)
    except JobNotFound as exc:
        raise CommandError(str(exc)) from None


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _jobs_list(args: argparse.Namespace) -> int:
    jobs = [job.info() for job in _store(args).list()]
    if args.json:
        for info in jobs:
            print(json.dumps(info, ensure_ascii=False))
        return 0
    if not jobs:
        print("no jobs yet (start one with `tunedesk train`)")
        return 0
    print(f"{'ID':<18} {'STATUS':<10} {'CREATED':<19} {'STEP':>9} {'VAL LOSS':>8}  MODEL")
    for info in jobs:
        s = info.get("summary") or {}
        step = f"{s['step']}/{s['total_steps']}" if s else "-"
        print(
            f"{info['id']:<18} {info['status']:<10} {_when(info['created_at']):<19} "
            f"{step:>9} {_fmt(s.get('val_loss')):>8}  {info['model']}"
        )
    return 0


def _jobs_show(args: argparse.Namespace) -> int:
    print(json.dumps(_get(args).info(), indent=2, ensure_ascii=False))
    return 0


def _print_event(event: dict[str, Any], raw: bool) -> None:
    if raw:
        print(json.dumps(event, ensure_ascii=False), flush=True)
    else:
        print(f"{_when(event['created_at'])} [{event['level']}] {event['message']}", flush=True)


def _jobs_follow(args: argparse.Namespace) -> int:
    from tunedesk.train.jobs import TERMINAL

    job = _get(args)
    offset = 0
    while True:
        # Read the status before the events: once it is terminal, one more read of the
        # events is guaranteed to hold the last line.
        status = job.status
        events, offset = job.read_events(offset)
        for event in events:
            _print_event(event, args.json)
        if status in TERMINAL:
            break
        time.sleep(max(0.05, args.interval))
    events, offset = job.read_events(offset)
    for event in events:
        _print_event(event, args.json)
    print(f"{job.id}: {status}", file=sys.stderr)
    return 0 if status == "succeeded" else 1


def _jobs_results(args: argparse.Namespace) -> int:
    text = _get(args).results_csv()
    if args.out is None:
        sys.stdout.write(text)
    else:
        from tunedesk.io import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"wrote {text.count(chr(10)) - 1} rows to {args.out}", file=sys.stderr)
    return 0


def _jobs_cancel(args: argparse.Namespace) -> int:
    from tunedesk.train.jobs import JobError

    job = _get(args)
    try:
        _store(args).cancel(job.id)
    except JobError as exc:
        raise CommandError(str(exc)) from None
    status = job.status
    if status == "cancelling":
        print(f"{job.id}: cancelling (stops at the next step with a checkpoint)")
    else:
        print(f"{job.id}: {status}")
    return 0
