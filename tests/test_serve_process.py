"""The engine process: the model generates in a child of the server (process.py).

A real server on 127.0.0.1 with the tiny model; the child is found through the loaded model's
`EngineProcess` and killed from outside, as the OOM killer or a segfault would.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import openai
import pytest
from openai import OpenAI
from test_serve_support import build_tiny, cache_root, serve

from tunedesk.serve.engines.local.process import EngineProcess
from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings

MSG = [{"role": "user", "content": "申购费是多少？"}]


def _settings(**kw) -> ServeSettings:
    return ServeSettings(cpu_threads=1, max_running=4, **kw)


def _engine(server) -> EngineProcess:
    lm = server.app.state.tunedesk.engine.local.loaded("tiny")
    assert isinstance(lm.batcher, EngineProcess)
    return lm.batcher


def test_generation_runs_in_a_child_that_the_server_owns(pytestconfig, tmp_path_factory):
    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    registry = ModelRegistry()
    registry.register("tiny", str(tiny))
    with serve(_settings(), registry) as server:
        engine = _engine(server)
        child = engine._proc.pid
        assert child != os.getpid() and engine._proc.is_alive()
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        out = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5)
        assert out.usage.completion_tokens == 5
    # Server stopped: the child is gone too (no orphan holding the model's memory).
    deadline = time.monotonic() + 10
    while engine._proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine._proc.is_alive()


def test_a_killed_engine_fails_open_streams_and_the_server_reports_it(
    pytestconfig, tmp_path_factory
):
    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    registry = ModelRegistry()
    registry.register("tiny", str(tiny))
    with serve(_settings(), registry) as server:
        engine = _engine(server)
        body = {
            "model": "tiny",
            "messages": MSG,
            "max_tokens": 2000,
            "ignore_eos": True,
            "stream": True,
        }
        events = []
        with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    os.kill(engine._proc.pid, signal.SIGKILL)  # mid-stream
        # The stream ended with an in-band error chunk, then [DONE]; not a hang.
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "engine process exited" in error["message"]
        # Not ready any more, and new requests get 503 in OpenAI's shape; /health still lives.
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 503 and "worker stopped" in ready.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health").status_code == 200
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as exc:
            client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        assert exc.value.status_code == 503


def test_in_process_mode_still_serves(pytestconfig, tmp_path_factory):
    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    registry = ModelRegistry()
    registry.register("tiny", str(tiny))
    with serve(_settings(engine_process=False), registry) as server:
        lm = server.app.state.tunedesk.engine.local.loaded("tiny")
        assert not isinstance(lm.batcher, EngineProcess)
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="tiny", messages=MSG, max_tokens=8, temperature=0, stream=True
            )
            if c.choices
        )
        whole = client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=8, temperature=0
        )
        assert streamed == whole.choices[0].message.content
