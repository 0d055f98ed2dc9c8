"""Serving load: `tunedesk serve` vs a peer server on the same model, one server at a time.

CPU (default): tunedesk (transformers engine) vs `transformers serve --continuous-batching`.

    python bench/serve_load.py --requests 64                  # builds a tiny base if needed
    python bench/serve_load.py --model PATH/merged --requests 64

GPU (documented, not runnable on a CPU box): tunedesk's vLLM engine (which starts and proxies
a `vllm serve` child) vs `vllm serve` directly on the same model and the same vLLM arguments:

    python bench/serve_load.py --engine vllm --model Qwen/Qwen2.5-0.5B-Instruct \\
        --vllm-arg=--max-model-len=4096 --concurrency 1 8 32 128 --requests 256

Gateway cost anywhere (`--engine upstream`): `tunedesk serve --engine upstream` in front of an
OpenAI-compatible server vs that server directly. Without `--upstream-url` the upstream is a
`tunedesk serve` (transformers engine) on the model, started once for both measurements. The
vLLM engine forwards through the same proxy code, so this measures its per-chunk cost too.

Each server runs as a subprocess on 127.0.0.1 (its own process group, killed at the end, also
on error), is polled until ready and warmed up, then driven with the official AsyncOpenAI
client: streaming chat completions, temperature 0, `max_tokens` (default 64), `ignore_eos`
sent to tunedesk and vLLM (`transformers serve` answers 422 to it, so it is not sent there: it
may stop early on eos; the table shows mean output tokens per request). `--client-transport
aiohttp` gives the client the SDK's aiohttp transport (`openai.DefaultAioHttpClient`) instead
of its default httpx one: the same client code, ~25% less of the driver's CPU per token. Output tokens come from the final usage chunk (stream_options include_usage),
or from counting content chunks when a server sends no usage. Per concurrency level: req/s,
output tok/s, TTFT p50/p95, latency p50; then tunedesk/peer ratios.

Targets against `transformers serve` (c=8 and c=32): tunedesk >= 2x peer output tok/s and
<= 0.5x peer p50 TTFT; c=1: within 10% of the peer. Through a gateway (vllm, upstream): at
most 3% fewer output tok/s and at most 5 ms more p50 TTFT than the server it fronts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUESTIONS = ["申购费怎么收？", "赎回多久到账？", "风险等级是什么？", "适合定投吗？"]


@dataclass
class Server:
    label: str
    argv: list[str]
    env: dict[str, str]
    model_name: str  # the `model` field requests send
    ready_path: str  # polled until 200
    port: int
    log: Path
    extra_body: dict | None = None  # per-server request extras (ignore_eos where supported)
    host: str = "127.0.0.1"
    owned: bool = True
    """Started and stopped by this script (False: `--upstream-url`, or the upstream measured
    directly, which the gateway run owns)."""
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


@dataclass
class Level:
    concurrency: int
    sent: int = 0
    ok: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    output_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    first_error: str = ""
    driver_cpu: float = 0.0
    """CPU time the driver process used per second of the level (1.0 = one core busy)."""
    server_cpu: float | None = None
    """The same for the server's processes (tunedesk: HTTP process and engine process; a
    gateway: the gateway alone); None for a server the driver did not start."""
    server_ttft_s: list[float] = field(default_factory=list)
    """Time to first token as the server measured it (tunedesk's access log: from the
    request reaching the app to the first token), for the requests of this level; empty for
    a server without such a log. The gap to `ttft_s` is the client's side and the wire."""

    def summary(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "requests_ok": self.ok,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "req_s": self.ok / self.elapsed_s if self.elapsed_s else 0.0,
            "out_tok_s": self.output_tokens / self.elapsed_s if self.elapsed_s else 0.0,
            "tokens_per_req": self.output_tokens / self.ok if self.ok else 0.0,
            "ttft_p50_ms": _pct(self.ttft_s, 50) * 1000,
            "ttft_p95_ms": _pct(self.ttft_s, 95) * 1000,
            "latency_p50_ms": _pct(self.latency_s, 50) * 1000,
            "driver_cpu": round(self.driver_cpu, 2),
            "server_cpu": None if self.server_cpu is None else round(self.server_cpu, 2),
            "server_ttft_p50_ms": (
                _pct(self.server_ttft_s, 50) * 1000 if self.server_ttft_s else None
            ),
            "first_error": self.first_error,
        }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- server processes


def _base_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    return env


def _tunedesk_argv(
    args: argparse.Namespace, port: int, engine: str, model: str | None = None
) -> list[str]:
    """`tunedesk serve` as the benchmark runs it: the given engine on 127.0.0.1:port, a queue
    as long as a level, and the transformers engine's threads and device."""
    argv = [
        sys.executable, "-m", "tunedesk", "serve", "--engine", engine,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-queued", str(max(64, args.requests)),
    ]  # fmt: skip
    if model is not None:
        argv += ["--model", model, "--served-model-name", args.served_model_name]
    if args.max_running:
        argv += ["--max-running", str(args.max_running)]
    if engine == "transformers":
        if args.cpu_threads:
            argv += ["--cpu-threads", str(args.cpu_threads)]
        argv += ["--device", args.device or "cpu"]
    return argv


def build_upstream(args: argparse.Namespace, model: str, log_dir: Path) -> Server:
    """The server a gateway run fronts: `--upstream-url` as given (nothing started), or a
    tunedesk transformers-engine server on the model."""
    fixed = {"ignore_eos": True}
    if args.upstream_url:
        url = urlsplit(args.upstream_url)
        if url.scheme != "http" or not url.hostname or not url.port:
            raise SystemExit("--upstream-url: give it as http://HOST:PORT[/v1]")
        return Server(
            label="direct",
            argv=[],
            env={},
            model_name=args.served_model_name,
            ready_path="/v1/models",
            port=url.port,
            log=log_dir / "direct.log",
            extra_body=fixed,
            host=url.hostname,
            owned=False,
        )
    port = _free_port()
    return Server(
        label="direct",
        argv=_tunedesk_argv(args, port, "transformers", model),
        env=_base_env(args.cpu_threads),
        model_name=args.served_model_name,
        ready_path="/ready",
        port=port,
        log=log_dir / "direct.log",
        extra_body=fixed,
    )


def build_gateway(args: argparse.Namespace, upstream: Server, log_dir: Path) -> Server:
    port = _free_port()
    return Server(
        label="tunedesk-gateway",
        argv=_tunedesk_argv(args, port, "upstream") + ["--upstream-url", upstream.base_url],
        env=_base_env(None),
        model_name=args.served_model_name,
        ready_path="/ready",
        port=port,
        log=log_dir / "gateway.log",
        extra_body={"ignore_eos": True},
    )


def build_servers(args: argparse.Namespace, model: str, log_dir: Path) -> list[Server]:
    name = args.served_model_name
    env = _base_env(args.cpu_threads if args.engine == "transformers" else None)
    port = _free_port()
    td = _tunedesk_argv(args, port, args.engine, model)
    if args.engine == "vllm":
        if args.tensor_parallel_size:
            td += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
        td += [f"--vllm-arg={a}" for a in args.vllm_arg]
    fixed = {"ignore_eos": True}  # fixed-length outputs where the server supports it
    servers = [Server("tunedesk", td, env, name, "/ready", port, log_dir / "tunedesk.log", fixed)]
    if args.no_peer:
        return servers

    port = _free_port()
    if args.engine == "transformers":
        # `transformers serve` names the model by its path (or hub id); FORCE_MODEL preloads it.
        peer = [
            str(BIN / "transformers"), "serve", model,
            "--continuous-batching",
            "--host", "127.0.0.1", "--port", str(port),
            "--device", args.device or "cpu",
            "--log-level", "warning",
        ]  # fmt: skip
        if args.peer_cb_max_batch_tokens:
            peer += ["--cb-max-batch-tokens", str(args.peer_cb_max_batch_tokens)]
        servers.append(
            Server("transformers-serve-cb", peer, env, model, "/health", port, log_dir / "peer.log")
        )
    else:
        peer = [
            args.vllm_bin, "serve", model,
            "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", name,
            # As tunedesk starts its child: sampling defaults are OpenAI's, not the checkpoint's
            # generation_config.json (Qwen's asks for a repetition penalty, which costs a step).
            "--generation-config", "vllm",
        ]  # fmt: skip
        if args.tensor_parallel_size:
            peer += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
        peer += list(args.vllm_arg)
        servers.append(
            Server("vllm-direct", peer, env, name, "/health", port, log_dir / "peer.log", fixed)
        )
    return servers


def start(server: Server) -> None:
    if not server.owned:
        return
    fh = open(server.log, "wb")  # noqa: SIM115 - closed with the process
    server.proc = subprocess.Popen(
        server.argv,
        cwd=ROOT,
        env=server.env,
        stdin=subprocess.DEVNULL,
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group: the vLLM child dies with it
    )
    fh.close()


def stop(server: Server) -> None:
    if not server.owned:
        return
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _log_tail(server: Server, n: int = 25) -> str:
    try:
        lines = server.log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


async def wait_ready(server: Server, timeout: float) -> None:
    """Poll the readiness path, then send warm-up completions until one succeeds."""
    import httpx
    from openai import AsyncOpenAI

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0) as http:
        while True:
            if server.proc is not None and server.proc.poll() is not None:
                raise RuntimeError(f"{server.label} exited with {server.proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                r = await http.get(server.base_url.removesuffix("/v1") + server.ready_path)
                if r.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.label} not ready after {timeout:.0f}s")
            await asyncio.sleep(0.25)
    client = AsyncOpenAI(base_url=server.base_url, api_key="bench", max_retries=0, timeout=120)
    last: Exception | None = None
    for _ in range(3):  # warm-up: first request pays lazy loads, compiles, allocations
        try:
            stream = await client.chat.completions.create(
                model=server.model_name,
                messages=[{"role": "user", "content": "你好"}],
                max_tokens=8,
                temperature=0,
                stream=True,
            )
            async for _ in stream:
                pass
            await client.close()
            return
        except Exception as exc:  # noqa: BLE001 - reported below
            last = exc
            await asyncio.sleep(1)
    await client.close()
    raise RuntimeError(f"{server.label}: warm-up request failed: {last!r}")


# ---------------------------------------------------------------- load


async def _one(client, server: Server, max_tokens: int, i: int, level: Level) -> None:
    start = time.perf_counter()
    ttft = None
    usage_tokens = None
    chunks = 0
    try:
        stream = await client.chat.completions.create(
            model=server.model_name,
            messages=[{"role": "user", "content": f"第{i}个问题：{QUESTIONS[i % len(QUESTIONS)]}"}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=server.extra_body,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
            if chunk.usage:
                usage_tokens = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 - counted, first one shown
        level.errors += 1
        level.first_error = level.first_error or f"{type(exc).__name__}: {exc}"[:300]
        return
    level.ok += 1
    level.output_tokens += usage_tokens if usage_tokens is not None else chunks
    level.ttft_s.append(ttft if ttft is not None else time.perf_counter() - start)
    level.latency_s.append(time.perf_counter() - start)


def _http_client(transport: str):
    """The openai client's HTTP layer: its default (httpx), or its aiohttp transport
    (`openai.DefaultAioHttpClient`, the SDK's own option), which reads a stream for less CPU."""
    if transport == "aiohttp":
        from openai import DefaultAioHttpClient

        return DefaultAioHttpClient()
    return None


def _tree_cpu_s(server: Server) -> float | None:
    """CPU seconds (user + system) used so far by the server process and its descendants."""
    import psutil

    if server.proc is None or server.proc.poll() is not None:
        return None
    total = 0.0
    try:
        root = psutil.Process(server.proc.pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a child that just exited
                t = p.cpu_times()
                total += t.user + t.system
    except psutil.Error:
        return None
    return total


async def drive(server: Server, concurrency: int, args: argparse.Namespace) -> Level:
    from openai import AsyncOpenAI

    level = Level(concurrency)
    client = AsyncOpenAI(
        base_url=server.base_url,
        api_key="bench",
        max_retries=0,
        timeout=args.request_timeout,
        http_client=_http_client(args.client_transport),
        # Enough pooled connections for the level; the default pool (100) is fine up to 100.
    )
    counter = iter(range(args.requests))
    stop_at = time.monotonic() + args.level_timeout

    async def worker() -> None:
        for i in counter:  # shared iterator: each request index is taken once
            if time.monotonic() > stop_at:
                return
            level.sent += 1
            await _one(client, server, args.max_tokens, i, level)

    # The driver's own full GC passes (up to 56 ms here, with openai and httpx loaded) land
    # in whichever request's TTFT is being timed: keep them out, for both servers alike.
    gc.collect()
    gc.freeze()
    log_at = _log_size(server)
    start = time.perf_counter()
    cpu = time.process_time()
    server_cpu = _tree_cpu_s(server)
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    level.elapsed_s = time.perf_counter() - start
    # The driver shares the machine with the server: how busy it was says how much of the
    # measured latency is the client's own (both servers are driven by the same code).
    level.driver_cpu = (time.process_time() - cpu) / level.elapsed_s
    after = _tree_cpu_s(server)
    if server_cpu is not None and after is not None:
        level.server_cpu = (after - server_cpu) / level.elapsed_s
    await client.close()
    level.server_ttft_s = _server_ttfts(server, log_at)
    return level


def _log_size(server: Server) -> int:
    try:
        return server.log.stat().st_size
    except OSError:
        return 0


def _server_ttfts(server: Server, since: int) -> list[float]:
    """TTFTs of the chat completions tunedesk's access log recorded after byte `since` of
    the server's log (one JSON object per line; other servers log no such lines)."""
    try:
        with server.log.open("rb") as fh:
            fh.seek(since)
            data = fh.read()
    except OSError:
        return []
    out = []
    for line in data.splitlines():
        if not line.startswith(b"{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        ttft = record.get("ttft_ms")
        if record.get("path") == "/v1/chat/completions" and isinstance(ttft, (int, float)):
            out.append(ttft / 1000)
    return out


# ---------------------------------------------------------------- report


def _fmt_row(label: str, s: dict) -> str:
    return (
        f"| {label:<22} | {s['concurrency']:>3} | {s['requests_ok']:>4} | {s['errors']:>3} "
        f"| {s['req_s']:>7.2f} | {s['out_tok_s']:>8.1f} | {s['tokens_per_req']:>6.1f} "
        f"| {s['ttft_p50_ms']:>8.0f} | {s['ttft_p95_ms']:>8.0f} | {s['latency_p50_ms']:>8.0f} "
        f"| {s.get('driver_cpu', 0.0):>6.2f} | {_cpu(s.get('server_cpu'))} "
        f"| {_ms(s.get('server_ttft_p50_ms'))} |"
    )


def _ms(value: float | None) -> str:
    return f"{value:>8.0f}" if value is not None else f"{'-':>8}"


def _cpu(value: float | None) -> str:
    return f"{value:>6.2f}" if value is not None else f"{'-':>6}"


HEADER = (
    "| server                 |   c |   ok | err |   req/s |  out t/s | tok/rq "
    "| TTFT p50 | TTFT p95 |  lat p50 | driver | server | srv TTFT |\n"
    "|------------------------|----:|-----:|----:|--------:|---------:|-------:"
    "|---------:|---------:|---------:|-------:|-------:|---------:|"
)


PEER, GATEWAY = "peer", "gateway"
"""What a run compares: tunedesk against another server (`transformers serve`), or tunedesk's
gateway against the server it fronts (vLLM, or any upstream)."""


def meets_target(
    kind: str, concurrency: int, tok_s_ratio: float, ttft_ratio: float, ttft_added_ms: float
) -> bool:
    """The issue's targets. Against a peer: at c=1 within 10% of it; at c>=8 at least 2x its
    output tokens/s and at most 0.5x its p50 TTFT. Through a gateway: at most 3% fewer output
    tokens/s and at most 5 ms more p50 TTFT than the server it fronts, at every level."""
    if kind == GATEWAY:
        return tok_s_ratio >= 0.97 and ttft_added_ms <= 5.0
    if concurrency == 1:
        return tok_s_ratio >= 0.9 and ttft_ratio <= 1.1
    return tok_s_ratio >= 2.0 and ttft_ratio <= 0.5


def ratios(ours: list[dict], peer: list[dict], kind: str = PEER) -> list[dict]:
    """Per concurrency level: tunedesk/peer ratios of one paired run, and whether they meet
    the targets."""
    by_c = {s["concurrency"]: s for s in peer}
    out = []
    for s in ours:
        p = by_c.get(s["concurrency"])
        if not p or not p["out_tok_s"] or not p["ttft_p50_ms"] or not p["latency_p50_ms"]:
            continue
        tput = s["out_tok_s"] / p["out_tok_s"]
        ttft = s["ttft_p50_ms"] / p["ttft_p50_ms"]
        added = s["ttft_p50_ms"] - p["ttft_p50_ms"]
        out.append(
            {
                "concurrency": s["concurrency"],
                "tok_s": tput,
                "ttft_p50": ttft,
                "ttft_added_ms": added,
                "latency_p50": s["latency_p50_ms"] / p["latency_p50_ms"],
                "met": meets_target(kind, s["concurrency"], tput, ttft, added),
            }
        )
    return out


def _median(values: list[float]) -> float:
    return _pct(values, 50)


def summarize_repeats(runs: list[list[dict]], kind: str = PEER) -> list[dict]:
    """Several paired runs' ratios -> per level: the median of each ratio, its range, and in
    how many runs the targets were met. Targets are judged on the medians."""
    levels: dict[int, list[dict]] = {}
    for run in runs:
        for r in run:
            levels.setdefault(r["concurrency"], []).append(r)
    out = []
    for c, rs in sorted(levels.items()):
        tput = [r["tok_s"] for r in rs]
        ttft = [r["ttft_p50"] for r in rs]
        added = [r["ttft_added_ms"] for r in rs]
        med_tput, med_ttft, med_added = _median(tput), _median(ttft), _median(added)
        out.append(
            {
                "concurrency": c,
                "runs": len(rs),
                "tok_s": med_tput,
                "tok_s_range": (min(tput), max(tput)),
                "ttft_p50": med_ttft,
                "ttft_p50_range": (min(ttft), max(ttft)),
                "ttft_added_ms": med_added,
                "ttft_added_ms_range": (min(added), max(added)),
                "met_in_runs": sum(r["met"] for r in rs),
                "met": meets_target(kind, c, med_tput, med_ttft, med_added),
            }
        )
    return out


_TARGET_TEXT = {
    PEER: "target c>=8: tok/s >= 2.0, TTFT p50 <= 0.5; c=1: within 10%",
    GATEWAY: "target: tok/s >= 0.97, TTFT p50 at most 5 ms more",
}


def report(results: dict[str, list[dict]], labels: list[str], kind: str = PEER) -> None:
    print(
        "\nms for TTFT/latency; out t/s = output tokens/s over the level's wall time; "
        "srv TTFT = tunedesk's own p50 (its access log), the rest of TTFT p50 is the client's\n"
    )
    print(HEADER)
    for label in labels:
        for s in results.get(label, []):
            print(_fmt_row(label, s))
    if len(labels) < 2 or labels[1] not in results or labels[0] not in results:
        return
    print(f"\nratios {labels[0]}/{labels[1]} ({_TARGET_TEXT[kind]})\n")
    print("|   c | out tok/s ratio | TTFT p50 ratio | TTFT added ms | lat p50 ratio | target met |")
    print("|----:|----------------:|---------------:|--------------:|--------------:|:----------:|")
    for r in ratios(results[labels[0]], results[labels[1]], kind):
        print(
            f"| {r['concurrency']:>3} | {r['tok_s']:>15.2f} | {r['ttft_p50']:>14.2f} "
            f"| {r['ttft_added_ms']:>+13.1f} | {r['latency_p50']:>13.2f} "
            f"| {'yes' if r['met'] else 'no':^10} |"
        )


def report_repeats(summary: list[dict], n: int, kind: str = PEER) -> None:
    print(f"\nover {n} paired runs: median (range), targets judged on the medians")
    print(f"({_TARGET_TEXT[kind]})\n")
    print(
        "|   c | out tok/s ratio     | TTFT p50 ratio      | TTFT added ms         "
        "| met in runs | target met |"
    )
    print(
        "|----:|:--------------------|:--------------------|:----------------------"
        "|------------:|:----------:|"
    )
    for s in summary:
        lo, hi = s["tok_s_range"]
        tlo, thi = s["ttft_p50_range"]
        alo, ahi = s["ttft_added_ms_range"]
        tput = f"{s['tok_s']:.2f} ({lo:.2f}-{hi:.2f})"
        ttft = f"{s['ttft_p50']:.2f} ({tlo:.2f}-{thi:.2f})"
        added = f"{s['ttft_added_ms']:+.1f} ({alo:+.1f} to {ahi:+.1f})"
        print(
            f"| {s['concurrency']:>3} | {tput:<19} | {ttft:<19} | {added:<21} "
            f"| {s['met_in_runs']:>4} of {s['runs']:<3} | {'yes' if s['met'] else 'no':^10} |"
        )


# ---------------------------------------------------------------- main


def ensure_model(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    target = Path(tempfile.gettempdir()) / "tunedesk-serve-load" / "tiny-base"
    if not (target / "config.json").is_file():
        print(f"building the tiny base in {target} ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "tunedesk", "base", "build", "--out", str(target)]
            + ["--pretrain-steps", "0"],
            cwd=ROOT,
            check=True,
            timeout=600,
        )
    return str(target)


async def bench_server(server: Server, args: argparse.Namespace) -> list[dict]:
    what = " ".join(server.argv) if server.owned else f"already running at {server.base_url}"
    print(f"\n== {server.label}: {what}", flush=True)
    t0 = time.monotonic()
    start(server)
    try:
        await wait_ready(server, args.startup_timeout)
        print(f"   ready in {time.monotonic() - t0:.1f}s", flush=True)
        out = []
        for c in args.concurrency:
            level = await drive(server, c, args)
            s = level.summary()
            out.append(s)
            print("   " + _fmt_row(server.label, s), flush=True)
            if s["first_error"]:
                print(f"   first error: {s['first_error']}", flush=True)
        return out
    finally:
        stop(server)


async def main_async(args: argparse.Namespace) -> int:
    model = ensure_model(args)
    log_dir = Path(tempfile.mkdtemp(prefix="serve-load-logs-"))
    kind = GATEWAY if args.engine in ("vllm", "upstream") else PEER
    upstream: Server | None = None
    if args.engine == "upstream":
        upstream = build_upstream(args, model, log_dir)
        # Measured directly and through the gateway; started once (if it is ours) for both.
        servers = [build_gateway(args, upstream, log_dir)]
        if not args.no_peer:  # --no-peer: the gateway alone
            servers.append(replace(upstream, owned=False))
    else:
        servers = build_servers(args, model, log_dir)
    print(f"model {model}; logs in {log_dir}; {args.requests} requests per level, "
          f"max_tokens {args.max_tokens}, concurrency {args.concurrency}")  # fmt: skip
    try:
        return await _run_all(args, model, servers, kind, upstream)
    finally:
        if upstream is not None:
            stop(upstream)


async def _run_all(
    args: argparse.Namespace,
    model: str,
    servers: list[Server],
    kind: str,
    upstream: Server | None,
) -> int:
    if upstream is not None and upstream.owned:
        print(f"\n== upstream: {' '.join(upstream.argv)}", flush=True)
        start(upstream)
        await wait_ready(upstream, args.startup_timeout)
        for server in servers[1:]:  # measured directly too: its CPU counts; stopped at the end
            server.proc = upstream.proc
    labels = [s.label for s in servers]
    runs: list[dict[str, list[dict]]] = []
    failures: dict[str, str] = {}
    for i in range(args.repeat):
        if args.repeat > 1:
            print(f"\n######## paired run {i + 1} of {args.repeat}", flush=True)
        results: dict[str, list[dict]] = {}
        for server in servers:  # one at a time: they must not share the cores
            try:
                results[server.label] = await bench_server(server, args)
            except Exception as exc:  # noqa: BLE001 - reported, the other server still runs
                failures[server.label] = f"{exc}\n--- log tail ---\n{_log_tail(server)}"
                print(f"!! {server.label} could not be benchmarked: {exc}", flush=True)
        report(results, labels, kind)
        runs.append(results)
        if failures:
            break
    paired = [ratios(r[labels[0]], r[labels[1]], kind) for r in runs if len(r) == 2 == len(labels)]
    summary = summarize_repeats(paired, kind) if len(paired) > 1 else None
    if summary:
        report_repeats(summary, len(paired), kind)
    for label, why in failures.items():
        print(f"\n!! {label} FAILED: {why}")
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "model": model,
                    "compared": kind,
                    "results": runs[-1] if runs else {},
                    "runs": runs,
                    "summary": summary,
                    "failures": failures,
                    "servers": [
                        {"label": s.label, "argv": s.argv, "log": str(s.log)} for s in servers
                    ],
                },
                ensure_ascii=False,
                indent=2,
                default=str,
            )
        )
    return 1 if labels[0] in failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: build a tiny base)")
    p.add_argument(
        "--engine",
        choices=["transformers", "vllm", "upstream"],
        default="transformers",
        help="transformers: vs `transformers serve`; vllm, upstream: tunedesk's gateway vs the "
        "server it fronts",
    )
    p.add_argument(
        "--upstream-url",
        default=None,
        help="with --engine upstream: an OpenAI-compatible server already running (default: "
        "start a tunedesk transformers-engine server on --model); --served-model-name is the "
        "model name it serves",
    )
    p.add_argument("--served-model-name", default="bench")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch threads for both servers on CPU (tunedesk --cpu-threads, peer OMP_NUM_THREADS)",
    )
    p.add_argument("--device", default=None, help="transformers engine device (default cpu)")
    p.add_argument(
        "--max-running", type=int, default=None, help="tunedesk --max-running (its default 64)"
    )
    p.add_argument("--peer-cb-max-batch-tokens", type=int, default=None)
    p.add_argument(
        "--no-peer",
        action="store_true",
        help="benchmark tunedesk only (with --engine upstream: the gateway, not the upstream "
        "directly)",
    )
    p.add_argument("--vllm-bin", default="vllm", help="vllm executable for the direct peer")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--tensor-parallel-size", type=int, default=None)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument(
        "--level-timeout",
        type=float,
        default=600.0,
        help="stop sending new requests at a level after this many seconds",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="paired runs (tunedesk, then the peer) one after the other; with more than one, "
        "also the median ratios, their range and in how many runs each target was met",
    )
    p.add_argument(
        "--client-transport",
        choices=["httpx", "aiohttp"],
        default="httpx",
        help="the openai client's HTTP transport (both servers alike): httpx, its default, or "
        "aiohttp (openai.DefaultAioHttpClient)",
    )
    p.add_argument("--json-out", default=None, help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device is None and args.engine == "transformers":
        args.device = "cpu"
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
