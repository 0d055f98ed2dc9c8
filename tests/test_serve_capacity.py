"""Capacity: a burst beyond running + queued gets 429 with Retry-After, and a client that walks
away mid-stream gives its slot back at once (capacity 1: the next request gets in)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from openai import OpenAI
from test_serve_support import build_tiny, cache_root, metric, serve

from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings

MSG = [{"role": "user", "content": "赎回要多久到账？"}]


@pytest.fixture(scope="module")
def server(pytestconfig, tmp_path_factory):
    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    settings = ServeSettings(max_running=1, max_queued=0, retry_after_s=2, cpu_threads=1)
    registry = ModelRegistry()
    registry.register("tiny", str(tiny))
    with serve(settings, registry) as srv:
        yield srv


def _running(server) -> float:
    return metric(httpx.get(f"{server.url}/metrics").text, "tunedesk_running_sequences")


def _wait_idle(server, timeout=15.0) -> None:
    # Generous: a loaded machine can be slow to notice; what proves the abort is the
    # aborted-requests counter each test checks, not this timing.
    deadline = time.monotonic() + timeout
    while _running(server) > 0:
        assert time.monotonic() < deadline, "the slot was never given back"
        time.sleep(0.02)


def test_burst_beyond_capacity_gets_429_with_retry_after(server):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 150, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(
                *[c.post("/v1/chat/completions", json=body) for _ in range(5)]
            )

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "2"
            err = r.json()["error"]
            assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_exceeded"
    _wait_idle(server)
    client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    # While a stream holds the only slot, a plain request is refused at once.
    streaming = {**body, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=streaming) as held:
        assert held.status_code == 200
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)


def test_disconnect_mid_stream_frees_the_slot(server):
    _wait_idle(server)
    before = metric(
        httpx.get(f"{server.url}/metrics").text, "tunedesk_aborted_requests_total", model="tiny"
    )
    body = {
        "model": "tiny",
        "messages": MSG,
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"role"' not in line:
                assert json.loads(line[6:])["choices"][0]["delta"]["content"]
                break  # one real token received: hang up
    _wait_idle(server)
    client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    ok = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    assert ok.choices[0].message.role == "assistant"
    text = httpx.get(f"{server.url}/metrics").text
    # Aborted, not finished: generation stopped long before its 1500 tokens.
    assert metric(text, "tunedesk_aborted_requests_total", model="tiny") == before + 1


def test_disconnect_while_waiting_for_a_non_streamed_answer_stops_generation(server):
    _wait_idle(server)
    url = f"{server.url}/metrics"
    before = metric(httpx.get(url).text, "tunedesk_aborted_requests_total", model="tiny")
    # Close to the tiny model's 2048-token context: the whole answer takes longer than the
    # latest hang-up below, however fast the engine gets.
    body = {"model": "tiny", "messages": MSG, "max_tokens": 2000, "ignore_eos": True}
    started = time.perf_counter()
    httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60).raise_for_status()
    whole = time.perf_counter() - started
    # Several hang-up moments: a cancellation racing a token's arrival once went unnoticed.
    for i, share in enumerate((0.2, 0.4, 0.6)):
        timeout = share * whole
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=timeout)
        _wait_idle(server)
        aborted = metric(httpx.get(url).text, "tunedesk_aborted_requests_total", model="tiny")
        assert aborted == before + i + 1
