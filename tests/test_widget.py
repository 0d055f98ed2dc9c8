"""The customer-service widget in a real browser, and what a public widget key may do."""

from __future__ import annotations

import http.server
import threading
from functools import partial

import openai
import pytest
from _chromium import chromium_page
from openai import OpenAI
from test_serve_support import build_tiny, cache_root, serve

from tunedesk.serve.auth import KeyStore
from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings

FULL_KEY = "sk-full-widget-tests"
PAGE_KEY = "wk-page-key"  # used by the browser pages
TIGHT_KEY = "wk-tight-key"  # 2 requests a minute
QUESTION = "货币基金赎回多久到账？"


class _Site:
    """A stand-in customer web site on its own origin (another port)."""

    def __init__(self, root) -> None:
        self.root = root
        handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def write(self, name: str, text: str) -> None:
        (self.root / name).write_text(text, encoding="utf-8")

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    allowed = _Site(tmp_path_factory.mktemp("allowed-site"))
    other = _Site(tmp_path_factory.mktemp("other-site"))
    yield allowed, other
    allowed.close()
    other.close()


@pytest.fixture(scope="module")
def server(pytestconfig, tmp_path_factory, sites):
    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    keyfile = tmp_path_factory.mktemp("keys") / "keys"
    keyfile.write_text(
        f"{FULL_KEY}\n"
        f"{PAGE_KEY} name=page scopes=chat models=tiny rate=120/min\n"
        f"{TIGHT_KEY} name=tight scopes=chat models=tiny rate=2/min\n"
    )
    settings = ServeSettings(
        api_key_file=keyfile,
        cors_origins=[sites[0].origin],
        widget_demo_key=PAGE_KEY,
        served_model_name="tiny",
        cpu_threads=1,
    )
    registry = ModelRegistry()
    registry.register("tiny", str(tiny))
    registry.register("other", str(tiny))
    with serve(settings, registry, keys=KeyStore.load([], keyfile)) as srv:
        yield srv


def _chat_in_widget(page) -> str:
    """Open the bubble, ask, and wait for the streamed answer to finish."""
    page.wait_for_function("window.tunedeskWidget !== undefined")
    page.evaluate("window.tunedeskWidget.open()")
    widget = page.locator("#tunedesk-widget")
    widget.locator("input").fill(QUESTION)
    widget.locator("button.send").click()
    answer = widget.locator(".msg.assistant.done")
    answer.wait_for(timeout=60_000)
    assert widget.locator(".msg.user").inner_text() == QUESTION
    return answer.inner_text()


def test_demo_page_streams_an_answer(server):
    with chromium_page() as page:
        streamed = []
        page.on(
            "response",
            lambda r: (
                streamed.append(r.headers.get("content-type", ""))
                if r.url.endswith("/v1/chat/completions")
                else None
            ),
        )
        page.goto(f"{server.url}/widget/demo")
        answer = _chat_in_widget(page)
        assert answer.strip() and "⚠" not in answer
        assert streamed and streamed[0].startswith("text/event-stream")
        assert page.console_errors == []


def test_widget_works_cross_origin_from_an_allowed_site(server, sites):
    allowed, other = sites
    tag = (
        f'<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">'
        f"<h1>Customer site</h1>"
        f'<script src="{server.url}/widget.js" data-model="tiny" data-key="{PAGE_KEY}"></script>'
    )
    for site in sites:
        site.write("index.html", tag)
    with chromium_page() as page:
        page.goto(f"{allowed.origin}/index.html")
        answer = _chat_in_widget(page)
        assert answer.strip() and "⚠" not in answer
    with chromium_page() as page:
        page.goto(f"{other.origin}/index.html")
        answer = _chat_in_widget(page)
        assert "⚠" in answer  # the browser blocks the response: the origin is not allowed


def test_widget_key_can_only_chat_with_its_models(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key=PAGE_KEY, max_retries=0)
    ok = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=8
    )
    assert ok.choices[0].message is not None
    with pytest.raises(openai.PermissionDeniedError):
        client.models.list()
    with pytest.raises(openai.PermissionDeniedError):
        client.completions.create(model="tiny", prompt="申购费 ->", max_tokens=4)
    # Like OpenAI, a model the key may not use is reported as not found to it.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    # The full key still does everything.
    full = OpenAI(base_url=f"{server.url}/v1", api_key=FULL_KEY, max_retries=0)
    assert {m.id for m in full.models.list().data} >= {"tiny", "other"}


def test_widget_key_is_rate_limited(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key=TIGHT_KEY, max_retries=0)
    msg = [{"role": "user", "content": QUESTION}]
    for _ in range(2):
        client.chat.completions.create(model="tiny", messages=msg, max_tokens=4)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="tiny", messages=msg, max_tokens=4)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.response.json()["error"]["code"] == "rate_limit_exceeded"


def test_each_page_view_sends_its_own_cache_salt(server):
    """The widget's visitors share one key: a salt per page view keeps each conversation out
    of the others' prefix cache, and `cache_share_system` keeps the system prompt shared."""
    bodies = []
    for _ in range(2):
        with chromium_page() as page:
            page.on(
                "request",
                lambda r: (
                    bodies.append(r.post_data_json)
                    if r.url.endswith("/v1/chat/completions") and r.method == "POST"
                    else None
                ),
            )
            page.goto(f"{server.url}/widget/demo")
            assert "⚠" not in _chat_in_widget(page)
    salts = [b["cache_salt"] for b in bodies]
    assert len(salts) == 2 and salts[0] != salts[1]
    assert all(len(s) == 32 and int(s, 16) >= 0 for s in salts)
    assert all(b["cache_share_system"] is True for b in bodies)
