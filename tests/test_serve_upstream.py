"""The upstream engine: a tunedesk gateway in front of a second, real tunedesk server. The
gateway forwards the client's bytes and streams the upstream's bytes back."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI
from test_serve_support import build_tiny, cache_root, metric, nan_model, serve, sse_events

from tunedesk.serve.app import create_app
from tunedesk.serve.engines.factory import build_engine
from tunedesk.serve.engines.proxy import ProxyEngine
from tunedesk.serve.engines.upstreams import normalise_base_url
from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings
from tunedesk.serve.testing import ServerThread

MSG = [{"role": "user", "content": "基金定投怎么收费？"}]


@pytest.fixture(scope="module")
def servers(pytestconfig, tmp_path_factory):
    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    registry = ModelRegistry()
    registry.register("tiny", str(tiny))
    backend_settings = ServeSettings(
        api_keys=["sk-backend"], public_metrics=True, max_running=4, cpu_threads=1
    )
    with serve(backend_settings, registry) as backend:
        gateway_settings = ServeSettings(
            engine="upstream",
            upstream_url=backend.base_url,
            upstream_api_key="sk-backend",
            api_keys=["sk-gateway"],
            public_metrics=True,  # scraped without a key below
        )
        with serve(gateway_settings, ModelRegistry()) as gateway:
            yield backend, gateway


def _counts(usage) -> tuple[int, int, int]:
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def test_gateway_answers_like_the_upstream(servers):
    backend, gateway = servers
    direct = OpenAI(base_url=backend.base_url, api_key="sk-backend", max_retries=0)
    via = OpenAI(base_url=gateway.base_url, api_key="sk-gateway", max_retries=0)
    kw = dict(model="tiny", messages=MSG, max_tokens=20, temperature=0)
    a = direct.chat.completions.create(**kw)
    b = via.chat.completions.create(**kw)
    assert b.choices[0].message.content == a.choices[0].message.content
    assert _counts(b.usage) == _counts(a.usage)
    # The same prompt a second time: the upstream's prefix cache had it, and the gateway
    # relays the upstream's usage as it is.
    assert b.usage.prompt_tokens_details.cached_tokens > 0
    chunks = list(
        via.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == a.choices[0].message.content
    )
    assert _counts(chunks[-1].usage) == _counts(a.usage)
    assert [m.id for m in via.models.list()] == [m.id for m in direct.models.list()]
    assert via.models.retrieve("tiny") == direct.models.retrieve("tiny")
    with pytest.raises(openai.NotFoundError):
        via.models.retrieve("nope")
    c = via.completions.create(model="tiny", prompt="question ->", max_tokens=3, temperature=0)
    assert (
        c.choices[0].text
        == direct.completions.create(
            model="tiny", prompt="question ->", max_tokens=3, temperature=0
        )
        .choices[0]
        .text
    )


def test_gateway_keeps_its_own_keys_and_passes_upstream_errors(servers):
    backend, gateway = servers
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=gateway.base_url, api_key="sk-backend", max_retries=0).models.list()
    via = OpenAI(base_url=gateway.base_url, api_key="sk-gateway", max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        via.chat.completions.create(model="nope", messages=MSG)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        via.chat.completions.create(model="tiny", messages=MSG, max_tokens=10**6)
    r = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": "tiny", "messages": MSG, "max_tokens": 2, "stream": True},
        headers={"Authorization": "Bearer sk-gateway"},
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert events[-1] == "[DONE]" and json.loads(events[0])["model"] == "tiny"
    text = httpx.get(f"{gateway.url}/metrics").text
    assert metric(text, "tunedesk_requests_total", route="/v1/chat/completions", status="200") >= 1
    assert metric(text, "tunedesk_time_to_first_token_seconds_count", model="tiny") >= 1


def test_gateway_with_unreachable_upstream_is_503_and_not_ready():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(engine="upstream", upstream_url=f"http://127.0.0.1:{port}/v1")
    app = create_app(settings, build_engine(settings, ModelRegistry()))
    with ServerThread(app) as gw:
        assert httpx.get(f"{gw.url}/ready").status_code == 503
        assert httpx.get(f"{gw.url}/health").status_code == 200
        r = httpx.post(f"{gw.base_url}/chat/completions", json={"model": "tiny", "messages": MSG})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


def test_a_client_leaving_mid_stream_stops_the_upstream_generating(servers):
    backend, gateway = servers
    metrics_url = f"{backend.url}/metrics"
    before = metric(httpx.get(metrics_url).text, "tunedesk_aborted_requests_total", model="tiny")
    body = {"model": "tiny", "messages": MSG, "max_tokens": 480, "ignore_eos": True, "stream": True}
    headers = {"Authorization": "Bearer sk-gateway"}
    url = f"{gateway.base_url}/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content":"' in line and '"role"' not in line:
                break  # one real token relayed: hang up
    # The gateway closes its upstream connection, so the backend aborts instead of generating
    # the remaining ~480 tokens for nobody.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(metrics_url).text
        if metric(text, "tunedesk_aborted_requests_total", model="tiny") == before + 1:
            break
        time.sleep(0.05)
    assert metric(text, "tunedesk_aborted_requests_total", model="tiny") == before + 1
    # And the gateway's pooled connections still work for the next request.
    via = OpenAI(base_url=gateway.base_url, api_key="sk-gateway", max_retries=0)
    for _ in range(3):
        assert via.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).usage


def test_upstream_url_may_carry_a_path_prefix():
    assert normalise_base_url("http://h:8000/v1/") == "http://h:8000"
    assert normalise_base_url("http://h:8000") == "http://h:8000"
    # Behind a reverse proxy's prefix: requests go to http://h/llm/v1/..., the prefix kept.
    assert normalise_base_url("http://h/llm/v1") == "http://h/llm"


def test_streamed_tokens_are_counted_whether_or_not_the_client_asked_for_usage(servers):
    backend, gateway = servers
    via = OpenAI(base_url=gateway.base_url, api_key="sk-gateway", max_retries=0)
    kw = dict(model="tiny", messages=MSG, max_tokens=6, temperature=0)
    expected = OpenAI(
        base_url=backend.base_url, api_key="sk-backend", max_retries=0
    ).chat.completions.create(**kw)

    def completion_tokens() -> float:
        text = httpx.get(f"{gateway.url}/metrics").text
        return metric(text, "tunedesk_completion_tokens_total", model="tiny")

    before = completion_tokens()
    plain = list(via.chat.completions.create(**kw, stream=True))
    # The gateway asked upstream for usage on the client's behalf and kept that event back.
    assert all(c.choices and c.usage is None for c in plain)
    text = "".join(c.choices[0].delta.content or "" for c in plain)
    assert text == expected.choices[0].message.content
    assert completion_tokens() == before + expected.usage.completion_tokens

    with_usage = list(
        via.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert with_usage[-1].usage == expected.usage and not with_usage[-1].choices
    assert completion_tokens() == before + 2 * expected.usage.completion_tokens


_STREAM_KW = {"model": "tiny", "messages": MSG, "max_tokens": 200, "stream": True}


def _requests_served(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return metric(text, "tunedesk_requests_total", route="/v1/chat/completions", status="200")


def test_replicas_share_the_load_and_one_that_is_down_is_skipped(pytestconfig, tmp_path_factory):
    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    registry = ModelRegistry()
    registry.register("tiny", str(tiny))
    with socket.socket() as s:  # a replica that is down: nothing listens on its port
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    one = ServeSettings(api_keys=["sk-backend"], public_metrics=True, max_running=4, cpu_threads=1)
    with serve(one, registry) as r1, serve(one, registry) as r2:
        gateway_settings = ServeSettings(
            engine="upstream",
            upstream_url=[dead, r1.base_url, r2.base_url],
            upstream_api_key="sk-backend",
        )
        engine = build_engine(gateway_settings, ModelRegistry())
        with serve(gateway_settings, ModelRegistry(), engine=engine) as gateway:
            ready = httpx.get(f"{gateway.url}/ready")
            assert ready.status_code == 200 and "2 of 3 upstreams ready" in ready.text
            # Forget what the readiness probe learnt: requests must find the dead one out.
            dead_replica = engine.pool.upstreams[0]
            engine.pool.mark_up(dead_replica)
            via = OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
            before = _requests_served(r1), _requests_served(r2)
            for _ in range(8):
                reply = via.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
                assert reply.choices[0].message.content is not None
            served = _requests_served(r1) - before[0], _requests_served(r2) - before[1]
            assert sum(served) == 8 and min(served) >= 3, served
            # A stream read to the end and one the client leaves: both give their place back.
            assert list(via.chat.completions.create(**_STREAM_KW))
            with httpx.stream(
                "POST", f"{gateway.base_url}/chat/completions", json=_STREAM_KW, timeout=60
            ) as r:
                next(r.iter_lines())
            assert dead_replica.last_error == "ClientConnectorError"  # tried, refused, skipped

            def open_on_replicas(text: str) -> float:
                urls = [u.url for u in engine.pool.upstreams]
                return sum(metric(text, "tunedesk_upstream_in_flight", upstream=u) for u in urls)

            deadline = time.monotonic() + 10  # until the gateway has seen the hang-up
            while open_on_replicas(text := httpx.get(f"{gateway.url}/metrics").text):
                assert time.monotonic() < deadline, "a request never gave its place back"
                time.sleep(0.05)
            dead_url = dead.removesuffix("/v1")
            assert metric(text, "tunedesk_upstream_connect_failures_total", upstream=dead_url) >= 1
            live = r1.base_url.removesuffix("/v1")
            assert f'tunedesk_upstream_in_flight{{upstream="{live}"}}' in text
        # Every replica down: 503 in OpenAI's shape, and not ready.
        down = ServeSettings(engine="upstream", upstream_url=[dead, dead.replace("/v1", "")])
        with ServerThread(create_app(down, build_engine(down, ModelRegistry()))) as gateway:
            assert httpx.get(f"{gateway.url}/ready").status_code == 503
            r = httpx.post(
                f"{gateway.base_url}/chat/completions", json={"model": "tiny", "messages": MSG}
            )
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
            assert "No upstream server is reachable (2 tried)" in r.json()["error"]["message"]


def test_a_replica_whose_engine_fails_every_request_is_taken_out_of_rotation(
    pytestconfig, tmp_path_factory
):
    """Two real replicas serve "tiny"; one's weights make NaN, so its engine fails every
    request with a 500 while its HTTP server stays up (connections and /ready can't tell).
    Its 500s are passed on until it has answered 5 in a row, then it is out of rotation."""
    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    good, sick = ModelRegistry(), ModelRegistry()
    good.register("tiny", str(tiny))
    sick.register("tiny", str(nan_model(tiny, tmp_path_factory.mktemp("sick") / "nan")))
    one = ServeSettings(max_running=4, cpu_threads=1)
    with serve(one, good) as r1, serve(one, sick) as r2:
        settings = ServeSettings(engine="upstream", upstream_url=[r1.base_url, r2.base_url])
        engine = build_engine(settings, ModelRegistry())
        with serve(settings, ModelRegistry(), engine=engine) as gateway:
            statuses = []
            for _ in range(20):  # one at a time: with nothing in flight, replicas take turns
                r = httpx.post(
                    f"{gateway.base_url}/chat/completions",
                    json={"model": "tiny", "messages": MSG, "max_tokens": 2},
                    timeout=60,
                )
                statuses.append(r.status_code)
                if r.status_code == 500:
                    assert "non-finite" in r.json()["error"]["message"]  # the replica's own
            assert statuses.count(500) == 5 and statuses[-10:] == [200] * 10, statuses
            text = httpx.get(f"{gateway.url}/metrics").text
            sick_url = r2.base_url.removesuffix("/v1")
            assert metric(text, "tunedesk_upstream_ejections_total", upstream=sick_url) == 1
            assert engine.pool.upstreams[1].last_error.startswith("answered 500")


def test_a_replica_that_accepts_no_connection_in_time_is_skipped(servers):
    backend, _ = servers
    # A listener whose accept queue is full: the kernel drops further connection attempts,
    # as a hung or unplugged host would, so connecting times out instead of being refused.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(0)
    port = hung.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    settings = ServeSettings(engine="upstream", upstream_url=[f"http://127.0.0.1:{port}"])
    engine = ProxyEngine(
        ModelRegistry(),
        [f"http://127.0.0.1:{port}", backend.base_url],
        api_key="sk-backend",
        connect_timeout_s=0.5,
    )
    try:
        with serve(settings, ModelRegistry(), engine=engine) as gateway:
            hung_replica = engine.pool.upstreams[0]
            engine.pool.mark_up(hung_replica)  # unknown until a request finds out
            via = OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
            for _ in range(4):
                assert via.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).usage
            assert hung_replica.last_error == "ConnectionTimeoutError"
            text = httpx.get(f"{gateway.url}/metrics").text
            failures = metric(
                text, "tunedesk_upstream_connect_failures_total", upstream=hung_replica.url
            )
            assert failures == 1  # then skipped while marked down
            # /ready answers from the last check and refreshes in the background: a replica
            # that takes its whole connect timeout (0.5 s here) never makes /ready wait for it.
            time.sleep(1.1)
            started = time.monotonic()
            assert httpx.get(f"{gateway.url}/ready").status_code == 200
            assert time.monotonic() - started < 0.45
    finally:
        for s in [*fillers, hung]:
            s.close()


class _DyingUpstream:
    """An upstream that starts a stream and then drops the connection mid-answer, as a
    crashing server does. A raw socket, because no real server here can be made to crash at
    that moment on purpose."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            with conn:
                conn.recv(65536)  # the request (small enough for one read)
                event = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                    + f"{len(event):x}\r\n".encode()
                    + event
                    + b"\r\n"
                )
                time.sleep(0.2)  # then gone, without the chunked body's end

    def close(self) -> None:
        self.sock.close()


def test_an_upstream_dying_mid_stream_ends_the_stream_with_an_error_event():
    upstream = _DyingUpstream()
    settings = ServeSettings(engine="upstream", upstream_url=upstream.url, upstream_usage=False)
    try:
        with ServerThread(create_app(settings, build_engine(settings, ModelRegistry()))) as gw:
            r = httpx.post(
                f"{gw.base_url}/chat/completions",
                json={"model": "tiny", "messages": MSG, "stream": True},
                timeout=30,
            )
            assert r.status_code == 200  # the stream had started
            events = sse_events(r.content)
            assert json.loads(events[0])["choices"][0]["delta"]["content"] == "hi"
            error = json.loads(events[1])["error"]
            assert error["code"] == "upstream_error" and error["type"] == "server_error"
            assert "broke off" in error["message"]
            assert events[2:] == ["[DONE]"]
    finally:
        upstream.close()


@pytest.mark.parametrize("salted", [False, True])
def test_cache_salt_keeps_gateway_keys_apart_in_the_upstream_prefix_cache(servers, salted):
    """Behind a gateway every caller reaches the upstream with the gateway's one key, so the
    upstream's prefix cache is shared by all of them, and a hit's speed would tell one what
    another asked. With `--upstream-cache-salt` (always on for the vLLM engine) each gateway
    key's requests carry a salt of their own, and share nothing."""
    backend, _ = servers
    system = (
        f"salted={salted}: "
        + "你是基金公司的客服助手，回答简洁准确，给出具体费率，不确定时请咨询人工客服。" * 2
    )
    settings = ServeSettings(
        engine="upstream",
        upstream_url=backend.base_url,
        upstream_api_key="sk-backend",
        api_keys=["sk-one", "sk-two"],
        upstream_cache_salt=salted,
    )
    kw = dict(
        model="tiny",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "申购费？"}],
        max_tokens=2,
        temperature=0,
    )
    with serve(settings, ModelRegistry()) as gateway:
        one, two = (
            OpenAI(base_url=gateway.base_url, api_key=k, max_retries=0)
            for k in ("sk-one", "sk-two")
        )
        first = one.chat.completions.create(**kw).usage.prompt_tokens_details.cached_tokens
        again = one.chat.completions.create(**kw).usage.prompt_tokens_details.cached_tokens
        other = two.chat.completions.create(**kw).usage.prompt_tokens_details.cached_tokens
        # A client's own salt narrows its key's sharing further.
        own = one.chat.completions.create(**kw, extra_body={"cache_salt": "session-7"})
        auth = {"Authorization": "Bearer sk-one"}
        gateway_metrics = httpx.get(f"{gateway.url}/metrics", headers=auth).text
    assert first == 0 and again >= 32  # one key's repeats hit either way
    # The gateway counts what the upstream reported it saved.
    assert metric(gateway_metrics, "tunedesk_cached_prompt_tokens_total", model="tiny") >= again
    if salted:
        assert other == 0 and own.usage.prompt_tokens_details.cached_tokens == 0
    else:
        assert other == again  # the second key hits what the first one sent


def test_the_gateway_drops_the_field_only_tunedesk_knows():
    """`cache_share_system` (the widget's) means nothing to vLLM or OpenAI, which may refuse
    an unknown field: the gateway leaves it out and forwards the rest as sent."""
    from tunedesk.serve.auth import ANONYMOUS
    from tunedesk.serve.context import RequestContext
    from tunedesk.serve.engines.base import ApiCall
    from tunedesk.serve.engines.proxy import ProxyEngine
    from tunedesk.serve.protocol import ChatCompletionRequest

    sent = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "申购费？"}],
        "cache_salt": "visitor-1",
        "cache_share_system": True,
    }
    raw = json.dumps(sent, ensure_ascii=False).encode("utf-8")
    call = ApiCall(
        body=ChatCompletionRequest.model_validate_json(raw),
        raw=raw,
        http=None,
        ctx=RequestContext(request_id="t"),
        key=ANONYMOUS,
        deadline=0.0,
    )
    for salt_by_key in (False, True):
        engine = ProxyEngine(ModelRegistry(), "http://127.0.0.1:9", salt_by_key=salt_by_key)
        body, _ = engine._upstream_body(call)
        forwarded = json.loads(body)
        assert "cache_share_system" not in forwarded
        assert forwarded["cache_salt"] == "visitor-1"  # open server: the client's, as sent
        assert forwarded["messages"] == sent["messages"]


def test_retrieving_a_model_from_an_upstream_whose_list_is_not_json_is_502():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotOpenAI(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = b"<html>a proxy's login page</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), NotOpenAI)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{upstream.server_port}/v1"
    settings = ServeSettings(engine="upstream", upstream_url=url, upstream_usage=False)
    try:
        with ServerThread(create_app(settings, build_engine(settings, ModelRegistry()))) as gw:
            client = OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
            with pytest.raises(openai.APIStatusError) as exc:
                client.models.retrieve("tiny")
            assert exc.value.status_code == 502 and "model list" in exc.value.message
    finally:
        upstream.shutdown()
