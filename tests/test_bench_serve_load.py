"""bench/serve_load.py: the ratio arithmetic its verdicts rest on, and one real (small) run of
its driver against `tunedesk serve`, so the benchmark can't rot unnoticed between the
occasions someone runs it in full."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "serve_load.py"


def _load():
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


def _level(c: int, tok_s: float, ttft_ms: float, lat_ms: float = 100.0) -> dict:
    return {
        "concurrency": c,
        "out_tok_s": tok_s,
        "ttft_p50_ms": ttft_ms,
        "latency_p50_ms": lat_ms,
    }


def test_targets_and_medians_over_repeated_runs() -> None:
    bench = _load()
    peer, gateway = bench.PEER, bench.GATEWAY
    assert bench.meets_target(peer, 1, 0.95, 1.05, 0.5)
    assert not bench.meets_target(peer, 1, 0.85, 1.0, 0.0)  # more than 10% slower than the peer
    assert bench.meets_target(peer, 8, 2.0, 0.5, -15.0)
    assert not bench.meets_target(peer, 8, 2.5, 0.51, -15.0)
    assert not bench.meets_target(peer, 32, 1.99, 0.3, -50.0)
    # Through a gateway: at most 3% fewer tokens/s and 5 ms more TTFT, at every level.
    assert bench.meets_target(gateway, 32, 0.97, 1.04, 4.0)
    assert not bench.meets_target(gateway, 32, 0.96, 1.0, 0.0)
    assert not bench.meets_target(gateway, 1, 1.0, 1.2, 5.5)

    direct = [_level(1, 300, 10), _level(32, 2000, 100)]
    runs = [
        bench.ratios([_level(1, 600, 7), _level(32, 4400, 45)], direct),  # c=32 met
        bench.ratios([_level(1, 600, 7), _level(32, 4400, 62)], direct),  # TTFT 0.62: not met
        bench.ratios([_level(1, 600, 7), _level(32, 4000, 48)], direct),  # met
    ]
    assert [r["met"] for r in runs[1]] == [True, False]
    assert runs[0][1]["ttft_added_ms"] == pytest.approx(-55.0)
    summary = {s["concurrency"]: s for s in bench.summarize_repeats(runs)}
    c32 = summary[32]
    assert c32["runs"] == 3 and c32["met_in_runs"] == 2
    assert c32["ttft_p50"] == pytest.approx(0.48)
    assert c32["ttft_p50_range"] == pytest.approx((0.45, 0.62))
    assert c32["tok_s"] == pytest.approx(2.2)
    assert c32["met"]  # judged on the medians
    assert summary[1]["met"] and summary[1]["met_in_runs"] == 3

    # Judged as a gateway: 2% fewer tokens/s and 3 ms more TTFT than the server it fronts
    # pass; 5% fewer tokens/s do not.
    gw = bench.ratios([_level(32, 1960, 103)], [_level(32, 2000, 100)], gateway)
    assert gw[0]["met"] and gw[0]["ttft_added_ms"] == pytest.approx(3.0)
    slow = bench.ratios([_level(32, 1900, 103)], [_level(32, 2000, 100)], gateway)
    assert not slow[0]["met"]


def _run_bench(tmp_path: Path, *args: str) -> tuple[str, dict]:
    """Run the benchmark script (8 tokens per request, one torch thread): stdout, JSON out."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--max-tokens", "8", "--cpu-threads", "1"]
        + ["--json-out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_server_ttfts_come_from_the_access_log_lines_after_the_level_began(tmp_path):
    sl = _load()
    log = tmp_path / "server.log"
    before = b'{"path": "/v1/chat/completions", "ttft_ms": 99.0}\n'
    log.write_bytes(
        before
        + b"INFO: uvicorn says hello\n[1, 2]\n{not json\n"
        + b'{"path": "/v1/chat/completions", "ttft_ms": 12.5}\n'
        + b'{"path": "/ready", "ttft_ms": null}\n'
        + b'{"path": "/v1/chat/completions", "ttft_ms": null, "error": "bad_request"}\n'
        + b'{"path": "/v1/chat/completions", "ttft_ms": 7}\n'
    )
    server = sl.Server("tunedesk", [], {}, "m", "/ready", 1, log)
    assert sl._server_ttfts(server, len(before)) == [0.0125, 0.007]
    assert sl._server_ttfts(sl.Server("peer", [], {}, "m", "/", 1, tmp_path / "none"), 0) == []


def test_driver_runs_against_a_real_server(tiny_base: Path, tmp_path: Path) -> None:
    stdout, data = _run_bench(
        tmp_path,
        "--model",
        str(tiny_base),
        "--no-peer",
        "--requests",
        "6",
        "--concurrency",
        "1",
        "3",
        "--client-transport",
        "aiohttp",  # the gateway test below drives through the default, httpx
    )
    assert data["args"]["client_transport"] == "aiohttp"
    levels = data["results"]["tunedesk"]
    assert [s["concurrency"] for s in levels] == [1, 3]
    for s in levels:
        assert s["requests_ok"] == 6 and s["errors"] == 0, s
        # ignore_eos is sent to tunedesk: every request generates exactly max_tokens.
        assert s["tokens_per_req"] == 8
        assert 0 < s["ttft_p50_ms"] <= s["latency_p50_ms"]
        # The server's own TTFT, from its access log: part of what the client measured.
        assert 0 < s["server_ttft_p50_ms"] < s["ttft_p50_ms"]
    assert "| tunedesk" in stdout


@pytest.mark.slow
def test_gateway_mode_measures_both_paths_and_stops_the_upstream(
    tiny_base: Path, tmp_path: Path
) -> None:
    stdout, data = _run_bench(
        tmp_path, "--engine", "upstream", "--model", str(tiny_base), "--requests", "4",
        "--concurrency", "2", "--repeat", "2",
    )  # fmt: skip
    assert data["compared"] == "gateway"
    assert len(data["runs"]) == 2
    for run in data["runs"]:
        for label in ("tunedesk-gateway", "direct"):
            (level,) = run[label]
            assert level["requests_ok"] == 4 and level["errors"] == 0, (label, level)
            assert level["tokens_per_req"] == 8
            assert level["server_cpu"] is not None and level["server_cpu"] >= 0
        # The gateway may relay 4 short requests in under one clock tick (10 ms) of its own CPU;
        # the direct path's server includes the upstream's engine, which never does.
        assert run["direct"][0]["server_cpu"] > 0
    assert [s["concurrency"] for s in data["summary"]] == [2]
    assert "TTFT added ms" in stdout
    # The upstream the bench started is gone with it.
    gateway_argv = data["servers"][0]["argv"]
    upstream = gateway_argv[gateway_argv.index("--upstream-url") + 1]
    port = int(upstream.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_gateway_mode_without_peer_measures_the_gateway_alone(
    tiny_base: Path, tmp_path: Path
) -> None:
    _, data = _run_bench(
        tmp_path, "--engine", "upstream", "--no-peer", "--model", str(tiny_base),
        "--requests", "2", "--concurrency", "1",
    )  # fmt: skip
    assert list(data["results"]) == ["tunedesk-gateway"]
    (level,) = data["results"]["tunedesk-gateway"]
    assert level["requests_ok"] == 2 and level["errors"] == 0
    # The upstream it started for the gateway is gone with it.
    gateway_argv = data["servers"][0]["argv"]
    upstream = gateway_argv[gateway_argv.index("--upstream-url") + 1]
    port = int(upstream.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
