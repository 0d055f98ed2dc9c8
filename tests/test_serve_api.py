"""The OpenAI-compatible API end to end: a real uvicorn server on 127.0.0.1 with the tiny model,
called with the official `openai` client (and raw httpx where the client hides the wire)."""

from __future__ import annotations

import json
import logging
import time

import httpx
import openai
import pytest
from openai import OpenAI
from test_serve_support import (
    build_tiny,
    cache_root,
    corrupt_model,
    metric,
    nan_model,
    serve,
    sse_events,
)

from tunedesk.serve.auth import KeyStore
from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings

KEY = "sk-test-full"
WIDGET_KEY = "sk-test-widget"
ORIGIN = "http://widget.example"
MSG = [{"role": "user", "content": "申购费是多少？"}]


@pytest.fixture(scope="module")
def server(pytestconfig, tmp_path_factory):
    root = cache_root(pytestconfig, tmp_path_factory)
    tiny = build_tiny(root)
    scratch = tmp_path_factory.mktemp("api")
    keyfile = scratch / "keys"
    keyfile.write_text(f"{KEY}\n{WIDGET_KEY} name=widget scopes=chat models=tiny\n")
    settings = ServeSettings(
        api_key_file=keyfile,
        cors_origins=[ORIGIN],
        max_running=4,
        max_queued=8,
        max_body_bytes=20_000,
        max_n=4,
        max_tokens_cap=1000,
        cpu_threads=1,
    )
    registry = ModelRegistry()
    registry.register("tiny", str(tiny))
    registry.register("tiny-nan", str(nan_model(tiny, scratch / "nan")))
    registry.register("tiny-broken", str(corrupt_model(tiny, scratch / "broken")))
    keys = KeyStore.load([], keyfile)
    with serve(settings, registry, keys=keys) as srv:
        srv.registry = registry
        srv.tiny = tiny
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)


def _post(server, path, body=None, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}", **kw.pop("headers", {})}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60, **kw)


def _error(response, status):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# --- happy paths ------------------------------------------------------------------------


def test_chat_completion_shape_and_usage(server, client):
    from transformers import AutoTokenizer

    from tunedesk.chat_format import encode_prompt

    r = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    # The prompt is the training rendering of the conversation, token for token.
    tok = AutoTokenizer.from_pretrained(server.tiny)
    assert r.usage.prompt_tokens == len(encode_prompt(tok, MSG))


def test_developer_turns_become_one_system_turn_first_as_vllm_renders_them(server, client):
    """OpenAI's `developer` role is the system turn. Mixed with a system message, the turns
    merge into one first system turn, as vLLM merges them (the vLLM engine must get the same
    prompt); two system turns without a developer one stay an error, as there."""
    from transformers import AutoTokenizer

    from tunedesk.chat_format import encode_prompt

    tok = AutoTokenizer.from_pretrained(server.tiny)
    mixed = [
        {"role": "developer", "content": "只回答基金问题。"},
        {"role": "user", "content": "你好"},
        {"role": "system", "content": "语气礼貌。"},
        {"role": "user", "content": "申购费是多少？"},
    ]
    r = client.chat.completions.create(model="tiny", messages=mixed, max_tokens=1)
    as_rendered = [
        {"role": "system", "content": "只回答基金问题。\n\n语气礼貌。"},
        {"role": "user", "content": "你好"},
        {"role": "user", "content": "申购费是多少？"},
    ]
    assert r.usage.prompt_tokens == len(encode_prompt(tok, as_rendered))
    alone = [{"role": "developer", "content": "只回答基金问题。"}, *MSG]
    r = client.chat.completions.create(model="tiny", messages=alone, max_tokens=1)
    assert r.usage.prompt_tokens == len(encode_prompt(tok, [{**alone[0], "role": "system"}, *MSG]))
    with pytest.raises(openai.BadRequestError, match="system message is only allowed first"):
        client.chat.completions.create(
            model="tiny", messages=[*MSG, {"role": "system", "content": "x"}], max_tokens=1
        )


def test_stream_at_temperature_zero_reassembles_to_the_same_text(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=40, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [full.choices[0].finish_reason]
    # include_usage: every chunk but the last has usage null; the last has no choices.
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_stream_without_include_usage_has_no_usage_chunk(server):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": True}
    events = sse_events(_post(server, "/v1/chat/completions", body).content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_stop_sequences_cut_stream_and_non_stream_alike(client):
    kw = dict(
        model="tiny", messages=MSG, max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    stop = text[5:8]
    cut = client.chat.completions.create(**kw, stop=[stop, "never-there"])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]


def test_n_choices_with_seed_are_distinct_and_reproducible(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=12, temperature=1.0, seed=11, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    streamed = client.chat.completions.create(**kw, stream=True)
    texts = ["", ""]
    for c in streamed:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in a.choices]


def test_vllm_sampling_extensions_are_honoured_or_refused(server, client):
    """vLLM's top_k / min_p / repetition_penalty work here as on `--engine vllm`; its other
    generation options are a 400 naming them, not an answer that quietly differs."""
    greedy = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=12, temperature=0
    )
    hot = dict(model="tiny", messages=MSG, max_tokens=12, temperature=1.5, seed=5)
    # top_k 1 (or min_p 1) leaves one token to draw, whatever the temperature: greedy.
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.chat.completions.create(**hot, extra_body=extra)
        assert r.choices[0].message.content == greedy.choices[0].message.content, extra
    r = client.completions.create(
        model="tiny",
        prompt="申购 ->",
        max_tokens=8,
        temperature=1.5,
        seed=5,
        extra_body={"top_k": 1},
    )
    assert (
        r.choices[0].text
        == client.completions.create(model="tiny", prompt="申购 ->", max_tokens=8, temperature=0)
        .choices[0]
        .text
    )
    # A strong repetition penalty changes a greedy answer (it penalises the prompt's tokens).
    kw = dict(model="tiny", messages=MSG, max_tokens=24, temperature=0)
    r = client.chat.completions.create(**kw, extra_body={"repetition_penalty": 2.0})
    assert (
        r.choices[0].message.content
        != client.chat.completions.create(**kw).choices[0].message.content
    )
    # Values that change nothing pass; the options themselves are refused by name.
    client.chat.completions.create(
        **kw, extra_body={"min_tokens": 0, "top_k": -1, "stop_token_ids": []}
    )
    for name, value in (
        ("min_tokens", 4),
        ("guided_json", {"type": "object"}),
        ("skip_special_tokens", False),
        ("return_token_ids", True),
    ):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(**kw, extra_body={name: value})
        assert exc.value.body["param"] == name and "--engine vllm" in exc.value.message
    err = _error(_post(server, "/v1/chat/completions", {**kw, "messages": MSG, "top_k": -2}), 400)
    assert err["param"] == "top_k"


def _model_logprobs(tiny, prompt_ids, vocab):
    """log_softmax of the next token after `prompt_ids`, from the transformers forward, over
    the tokenizer's vocabulary (the embedding's padding rows past it are never sampled)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1, :vocab]
    return torch.log_softmax(logits.float(), dim=-1)


def test_chat_logprobs_are_the_models_own_and_stream_as_they_answer(server, client):
    from transformers import AutoTokenizer

    from tunedesk.chat_format import encode_prompt

    kw = dict(model="tiny", messages=MSG, max_tokens=10, logprobs=True, top_logprobs=3)
    greedy = dict(kw, temperature=0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**greedy)
    (choice,) = r.choices
    entries = choice.logprobs.content
    assert len(entries) == r.usage.completion_tokens == 10
    for e in entries:
        assert len(e.top_logprobs) == 3
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        # Greedy takes the likeliest token.
        assert (e.token, e.logprob) == (e.top_logprobs[0].token, e.top_logprobs[0].logprob)
    # The tokens' bytes join into the answer, Chinese characters cut between tokens included.
    assert b"".join(bytes(e.bytes) for e in entries).decode() == choice.message.content
    # The first token's logprobs are the model's own distribution after the prompt.
    tok = AutoTokenizer.from_pretrained(server.tiny)
    expected = _model_logprobs(server.tiny, encode_prompt(tok, MSG), len(tok))
    top = expected.topk(3)
    assert [t.logprob for t in entries[0].top_logprobs] == pytest.approx(
        top.values.tolist(), abs=1e-4
    )
    assert [t.token for t in entries[0].top_logprobs] == [tok.decode([i]) for i in top.indices]
    # Streamed: every token's chunk carries its logprobs, the same ones.
    streamed = [
        e
        for c in client.chat.completions.create(**greedy, stream=True)
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    # Sampled hot, the logprob of what was drawn is still the model's (vLLM's raw logprobs),
    # not the temperature's.
    hot = client.chat.completions.create(**kw, temperature=1.8, seed=3, extra_body={"top_k": 5})
    first = hot.choices[0].logprobs.content[0]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    # The wire JSON validates against the SDK's own types (the client above only constructs
    # them, unvalidated).
    from openai.types.chat import ChatCompletion

    wire = _post(server, "/v1/chat/completions", {**kw, "temperature": 0, "messages": MSG})
    assert ChatCompletion.model_validate(wire.json()).choices[0].logprobs.content
    # Without logprobs there are none.
    plain = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completions_logprobs_in_the_legacy_shape(server, client):
    kw = dict(model="tiny", prompt="申购 ->", max_tokens=8, temperature=0, logprobs=2)
    kw["extra_body"] = {"ignore_eos": True}
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == value  # the sampled token is always there, greedy or not
        assert 1 <= len(top) <= 3 and max(top.values()) == value
    streamed = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    parts = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == lp.tokens
    assert sum((p.text_offset for p in parts), []) == lp.text_offset
    from openai.types import Completion

    wire = _post(server, "/v1/completions", {k: v for k, v in kw.items() if k != "extra_body"})
    assert Completion.model_validate(wire.json()).choices[0].logprobs.tokens


def test_echo_with_logprobs_scores_a_prompt_as_evaluation_harnesses_ask(server, client):
    """lm-evaluation-harness's `local-completions` scores a multiple-choice answer with
    `echo`, `logprobs: 1` and `max_tokens: 1` over token ids, reading the prompt's logprobs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.tiny)
    context, answer = tok.encode("申购费是多少？"), tok.encode("基金的申购费")
    ids = context + answer
    body = dict(model="tiny", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    r = client.completions.create(**body, seed=1234)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(tok.decode(ids))
    assert len(lp.tokens) == len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # Each prompt token's logprob given the ones before it, against the model's forward.
    model = AutoModelForCausalLM.from_pretrained(server.tiny, dtype=torch.float32)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :, : len(tok)]
    ref = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(ref.tolist(), abs=1e-4)
    # The token after the prompt is the greedy one.
    last = torch.log_softmax(logits[-1], -1).max()
    assert lp.token_logprobs[-1] == pytest.approx(float(last), abs=1e-4)
    # What the harness computes from it: the answer's log-likelihood and whether it is greedy.
    span = slice(len(context), -1)
    greedy = all(
        t == max(top.values())
        for t, top in zip(lp.token_logprobs[span], lp.top_logprobs[span], strict=True)
    )
    argmax = torch.log_softmax(logits, -1).argmax(-1)[len(context) - 1 : len(ids) - 1]
    assert sum(lp.token_logprobs[span]) == pytest.approx(
        float(ref[len(context) - 1 :].sum()), abs=1e-3
    )
    assert greedy == (argmax.tolist() == answer)
    # Streamed: the prompt leads the first chunk, with its logprobs.
    chunks = list(client.completions.create(**body, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((p.tokens for p in streamed), []) == lp.tokens
    assert sum((p.text_offset for p in streamed), []) == lp.text_offset
    # (The echoed prompt's first token has null logprobs, as OpenAI's and vLLM's do, though
    # the SDK's type for them says float: the client above reads them all the same.)
    # Without logprobs, echo is the prompt's text in front of the answer; a string prompt
    # comes back as sent.
    plain = client.completions.create(model="tiny", prompt="申购 ->", echo=True, max_tokens=3)
    assert plain.choices[0].text.startswith("申购 ->") and plain.choices[0].logprobs is None
    assert len(plain.choices[0].text) > len("申购 ->")


def test_logit_bias_steers_sampling_and_names_bad_keys(server, client):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.tiny)
    (fund,) = tok.encode("基金")
    kw = dict(model="tiny", messages=MSG, max_tokens=4, temperature=0)
    kw["extra_body"] = {"ignore_eos": True}
    r = client.chat.completions.create(**kw, logit_bias={str(fund): 100})
    assert r.choices[0].message.content == "基金" * 4
    greedy = client.chat.completions.create(**kw, logprobs=True)
    first = greedy.choices[0].logprobs.content[0].token
    (first_id,) = tok.encode(first)
    banned = client.chat.completions.create(**kw, logprobs=True, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.content[0].token != first
    r = client.completions.create(
        model="tiny", prompt="申购 ->", max_tokens=3, temperature=0, logit_bias={str(fund): 100}
    )
    assert r.choices[0].text == "基金" * 3
    raw = {"model": "tiny", "messages": MSG, "max_tokens": 2}
    for bias, why in (({"abc": 1}, "token id"), ({"999999": 1}, "token id"), ({"5": 101}, "")):
        err = _error(_post(server, "/v1/chat/completions", {**raw, "logit_bias": bias}), 400)
        assert err["param"].startswith("logit_bias") and why in err["message"], err
    err = _error(_post(server, "/v1/chat/completions", {**raw, "top_logprobs": 2}), 400)
    assert err["param"] == "top_logprobs" and "logprobs" in err["message"]
    err = _error(
        _post(server, "/v1/chat/completions", {**raw, "logprobs": True, "top_logprobs": 21}), 400
    )
    assert err["param"] == "top_logprobs"
    err = _error(
        _post(server, "/v1/completions", {"model": "tiny", "prompt": "a", "logprobs": 30}), 400
    )
    assert err["param"] == "logprobs"


def test_completions_raw_prompt_and_stream(client):
    r = client.completions.create(model="tiny", prompt="question ->", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    streamed = client.completions.create(
        model="tiny", prompt="question ->", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    several = client.completions.create(model="tiny", prompt=["a", "申购"], max_tokens=2, n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]


def test_models_lists_every_served_model_and_runtime_registration(server, client):
    ids = {m.id for m in client.models.list()}
    assert {"tiny", "tiny-nan", "tiny-broken"} <= ids
    name = "ft:tiny:faq:ftjob-test1"
    server.registry.register(name, str(server.tiny), parent="tiny")
    try:
        models = {m.id: m for m in client.models.list()}
        assert name in models and models[name].parent == "tiny"
        # The SDK's retrieve: the same card as in the list, for names with ":" too.
        card = client.models.retrieve(name)
        assert card.model_dump() == models[name].model_dump()
        r = client.chat.completions.create(model=name, messages=MSG, max_tokens=2)
        assert r.model == name and r.usage.completion_tokens >= 1
    finally:
        server.registry.unregister(name)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name, messages=MSG, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve(name)
    assert exc.value.code == "model_not_found" and exc.value.body["param"] == "model"


def test_retrieve_a_model_whose_name_has_a_slash(server, client):
    """Hub-style names (org/name) are served as they are; the route must not split them."""
    name = "acme/tiny-faq"
    server.registry.register(name, str(server.tiny), parent="tiny")
    try:
        card = client.models.retrieve(name)
        assert card.id == name and card.parent == "tiny" and card.object == "model"
        assert client.models.retrieve("tiny").id == "tiny"
    finally:
        server.registry.unregister(name)


# --- auth -------------------------------------------------------------------------------


def test_auth_failures_are_401_in_openai_shape_and_health_stays_open(server):
    for key in (None, "sk-wrong"):
        bad = OpenAI(base_url=server.base_url, api_key=key or "x", max_retries=0)
        if key is None:
            r = httpx.post(f"{server.base_url}/chat/completions", json={"model": "tiny"})
        else:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
            r = httpx.get(f"{server.base_url}/models", headers={"Authorization": f"Bearer {key}"})
        err = _error(r, 401)
        assert err["type"] == "invalid_request_error" and "sk-wrong" not in r.text
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_metrics_need_a_key_with_the_metrics_scope(server):
    """A server a widget talks to is public; its metrics name models and traffic."""
    url = f"{server.url}/metrics"
    _error(httpx.get(url), 401)
    _error(httpx.get(url, headers={"Authorization": "Bearer sk-wrong"}), 401)
    err = _error(httpx.get(url, headers={"Authorization": f"Bearer {WIDGET_KEY}"}), 403)
    assert "metrics" in err["message"]
    ok = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and "tunedesk_requests_total" in ok.text


def test_widget_key_limited_to_chat_on_named_models(server):
    widget = OpenAI(base_url=server.base_url, api_key=WIDGET_KEY, max_retries=0)
    assert widget.chat.completions.create(model="tiny", messages=MSG, max_tokens=1).choices
    with pytest.raises(openai.NotFoundError):
        widget.chat.completions.create(model="tiny-nan", messages=MSG, max_tokens=1)
    with pytest.raises(openai.PermissionDeniedError):
        widget.completions.create(model="tiny", prompt="x", max_tokens=1)
    with pytest.raises(openai.PermissionDeniedError):
        widget.models.retrieve("tiny")


# --- errors -----------------------------------------------------------------------------


def test_bad_json_and_bad_fields_are_400_naming_the_param(server):
    r = httpx.post(
        f"{server.base_url}/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert _error(r, 400)["code"] == "invalid_json"
    err = _error(
        _post(server, "/v1/chat/completions", {"model": "tiny", "messages": MSG, "temperature": 5}),
        400,
    )
    assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
    bad_role = [{"role": "wizard", "content": "hi"}]
    err = _error(
        _post(server, "/v1/chat/completions", {"model": "tiny", "messages": bad_role}), 400
    )
    assert err["param"] == "messages[0].role"
    err = _error(_post(server, "/v1/chat/completions", {"model": "tiny"}), 400)
    assert err["param"] == "messages"
    err = _error(
        _post(server, "/v1/chat/completions", {"model": "tiny", "messages": MSG, "n": 9}), 400
    )
    assert err["param"] == "n"
    tools = [{"type": "function", "function": {"name": "f"}}, {"type": "retrieval"}]
    err = _error(
        _post(server, "/v1/chat/completions", {"model": "tiny", "messages": MSG, "tools": tools}),
        400,
    )
    assert err["param"] == "tools[1].type"  # more in test_serve_tools.py


def test_a_field_of_several_types_is_named_once_with_the_error_of_its_value(server):
    """`stop` is a string or a list and `prompt` four types: pydantic fails each type under a
    location naming it (stop.str, stop.list[str]). The client gets the field's own name and
    the problem of the type the value had."""
    chat = {"model": "tiny", "messages": MSG}
    cases = [
        ("/v1/chat/completions", {**chat, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ("/v1/chat/completions", {**chat, "stop": 7}, "stop", "valid string or a valid list"),
        (
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "user", "content": 3}]},
            "messages[0].content",
            "valid string or a valid list",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": [[1], [2.5]]}, "prompt[1][0]", "integer"),
    ]
    for path, body, param, words in cases:
        err = _error(_post(server, path, body), 400)
        assert err["param"] == param, (body, err)
        assert words in err["message"] and "list[" not in err["message"], err
        assert "more problem" not in err["message"]
    err = _error(_post(server, "/v1/chat/completions", {**chat, "seed": "x", "top_p": 0}), 400)
    assert err["message"].endswith("(and 1 more problem)"), err


def test_context_length_and_max_tokens_limits(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5000)
    assert exc.value.body["param"] == "max_tokens"
    long = [{"role": "user", "content": "申购费 " * 1500}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=long, max_tokens=10)
    assert exc.value.code == "context_length_exceeded"


def test_unknown_model_and_route_are_404(server, client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=MSG)
    assert exc.value.code == "model_not_found" and exc.value.body["param"] == "model"
    err = _error(httpx.get(f"{server.url}/v1/nothing-here"), 404)
    assert "nothing-here" in err["message"]


def test_body_too_large_is_413_by_header_and_by_stream(server):
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 30_000}]}
    assert (
        _error(_post(server, "/v1/chat/completions", big), 413)["type"] == "invalid_request_error"
    )

    def chunks():  # no Content-Length: the size is only known while reading
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    r = httpx.post(
        f"{server.base_url}/chat/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    _error(r, 413)


def test_model_that_fails_to_load_is_503_and_server_survives(server, client):
    for _ in range(2):  # the failure is remembered, not retried on every request
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="tiny-broken", messages=MSG, max_tokens=2)
        assert exc.value.status_code == 503
        assert exc.value.body["type"] == "server_error"
    assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=1).choices


def test_model_producing_nan_is_500_and_mid_stream_error_chunk(server, client):
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="tiny-nan", messages=MSG, max_tokens=4)
    assert exc.value.body["code"] == "engine_error"
    body = {"model": "tiny-nan", "messages": MSG, "max_tokens": 4, "stream": True}
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200  # the stream had started: the error travels in-band
    events = sse_events(r.content)
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    err = json.loads(events[-2])["error"]
    assert set(err) == {"message", "type", "param", "code"} and "non-finite" in err["message"]
    assert events[-1] == "[DONE]"
    assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=1).choices


# --- browser, metrics, logs -------------------------------------------------------------


def test_cors_preflight_allows_only_listed_origins(server):
    headers = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    ok = httpx.options(f"{server.base_url}/chat/completions", headers={**headers, "Origin": ORIGIN})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = httpx.options(
        f"{server.base_url}/chat/completions", headers={**headers, "Origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers


def test_metrics_expose_latency_histograms_counters_and_queue(server, client):
    client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=4, extra_body={"ignore_eos": True}
    )
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in (
        "tunedesk_time_to_first_token_seconds_bucket",
        "tunedesk_time_per_output_token_seconds_bucket",
        "tunedesk_request_duration_seconds_bucket",
    ):
        assert name in text
    assert metric(text, "tunedesk_time_to_first_token_seconds_count", model="tiny") >= 1
    assert metric(text, "tunedesk_time_per_output_token_seconds_count", model="tiny") >= 3
    assert metric(text, "tunedesk_completion_tokens_total", model="tiny") >= 4
    assert metric(text, "tunedesk_prompt_tokens_total", model="tiny") > 0
    assert metric(text, "tunedesk_requests_total", route="/v1/chat/completions", status="200") >= 1
    assert "tunedesk_queue_depth 0.0" in text


def test_access_log_is_one_json_line_without_content_or_key(server, caplog):
    caplog.set_level(logging.INFO, logger="tunedesk.serve.access")
    secret_question = "我的账户密码是多少"
    r = _post(
        server,
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": secret_question}],
            "max_tokens": 2,
        },
        headers={"X-Request-Id": "req-log-test"},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-log-test"
    deadline = time.monotonic() + 5
    lines: list[dict] = []
    while not lines and time.monotonic() < deadline:  # written as the response completes
        lines = [
            json.loads(rec.getMessage())
            for rec in caplog.records
            if rec.name == "tunedesk.serve.access" and "req-log-test" in rec.getMessage()
        ]
        time.sleep(0.02)
    (line,) = lines
    assert line["status"] == 200 and line["model"] == "tiny" and line["key"] == "keys:1"
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] >= 1
    assert line["latency_ms"] >= line["ttft_ms"] > 0
    assert secret_question not in caplog.text and KEY not in caplog.text
