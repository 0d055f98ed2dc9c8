"""bench/serve_load.py: the ratio arithmetic its verdicts rest on, and one real (small) run of
its driver against `tunedesk serve`, so the benchmark can't rot unnoticed between the
occasions someone runs it in full."""

from __future__ import annotations

import importlib.util
import json
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
    assert bench.meets_target(1, 0.95, 1.05)
    assert not bench.meets_target(1, 0.85, 1.0)  # more than 10% slower than the peer
    assert bench.meets_target(8, 2.0, 0.5)
    assert not bench.meets_target(8, 2.5, 0.51)
    assert not bench.meets_target(32, 1.99, 0.3)

    peer = [_level(1, 300, 10), _level(32, 2000, 100)]
    runs = [
        bench.ratios([_level(1, 600, 7), _level(32, 4400, 45)], peer),  # c=32 met
        bench.ratios([_level(1, 600, 7), _level(32, 4400, 62)], peer),  # TTFT 0.62: not met
        bench.ratios([_level(1, 600, 7), _level(32, 4000, 48)], peer),  # met
    ]
    assert [r["met"] for r in runs[1]] == [True, False]
    summary = {s["concurrency"]: s for s in bench.summarize_repeats(runs)}
    c32 = summary[32]
    assert c32["runs"] == 3 and c32["met_in_runs"] == 2
    assert c32["ttft_p50"] == pytest.approx(0.48)
    assert c32["ttft_p50_range"] == pytest.approx((0.45, 0.62))
    assert c32["tok_s"] == pytest.approx(2.2)
    assert c32["met"]  # judged on the medians
    assert summary[1]["met"] and summary[1]["met_in_runs"] == 3


@pytest.mark.slow
def test_driver_runs_against_a_real_server(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_base), "--no-peer"]
        + ["--requests", "6", "--concurrency", "1", "3", "--max-tokens", "8"]
        + ["--cpu-threads", "1", "--json-out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    levels = data["results"]["tunedesk"]
    assert [s["concurrency"] for s in levels] == [1, 3]
    for s in levels:
        assert s["requests_ok"] == 6 and s["errors"] == 0, s
        # ignore_eos is sent to tunedesk: every request generates exactly max_tokens.
        assert s["tokens_per_req"] == 8
        assert 0 < s["ttft_p50_ms"] <= s["latency_p50_ms"]
    assert "| tunedesk" in proc.stdout
