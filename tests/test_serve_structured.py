"""Structured outputs end to end: a real server with the tiny model, the official `openai`
client's `parse()` and vLLM's `structured_outputs` extension, and their 400s."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field
from test_serve_support import build_tiny, cache_root, serve

from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings

MSG = [{"role": "user", "content": "申购费是多少？"}]
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}


class Advice(BaseModel):
    risk: Literal["低", "中", "高"]
    fee_percent: int = Field(ge=0, le=5)
    funds: list[str] = Field(max_length=2)


@pytest.fixture(scope="module")
def server(pytestconfig, tmp_path_factory):
    registry = ModelRegistry()
    registry.register("tiny", str(build_tiny(cache_root(pytestconfig, tmp_path_factory))))
    with serve(ServeSettings(cpu_threads=1, max_n=4), registry) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def test_sdk_parse_returns_the_pydantic_model_and_the_stream_says_the_same(client):
    # The tiny model is untrained: with JSON's optional whitespace allowed (vLLM's default
    # too) its greedy answer runs on in whitespace, so ask for compact JSON, as vLLM allows.
    done = client.chat.completions.parse(
        model="tiny",
        messages=MSG,
        response_format=Advice,
        temperature=0,
        max_tokens=120,
        extra_body=COMPACT,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Advice)
    assert Advice.model_validate_json(choice.message.content) == choice.message.parsed
    assert done.usage.completion_tokens < 120

    stream = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "Advice", "schema": Advice.model_json_schema()},
        },
        temperature=0,
        max_tokens=120,
        extra_body=COMPACT,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
        choice.message.content
    )


def test_every_sampled_choice_holds_to_its_regex_choice_or_grammar(client):
    constraints = [
        ({"regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        ({"choice": ["是的", "不是", "要看情况"]}, lambda t: t in {"是的", "不是", "要看情况"}),
        ({"grammar": 'start: "R" ("1" | "2" | "3") "级"'}, lambda t: t in {"R1级", "R2级", "R3级"}),
    ]
    for constraint, holds in constraints:
        # n > 1: each choice has its own grammar state in the same batch.
        done = client.chat.completions.create(
            model="tiny",
            messages=MSG,
            n=4,
            temperature=1.5,
            seed=11,
            max_tokens=30,
            extra_body={"structured_outputs": constraint},
        )
        for c in done.choices:
            assert c.finish_reason == "stop", (constraint, c.message.content)
            assert holds(c.message.content), (constraint, c.message.content)
        if "regex" in constraint:  # a hot temperature samples, so the choices differ
            assert len({c.message.content for c in done.choices}) > 1


def test_json_object_stops_as_valid_json_even_with_free_whitespace(client):
    done = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        n=4,
        temperature=1.0,
        seed=1,
        max_tokens=200,
        response_format={"type": "json_object"},
    )
    stopped = [c.message.content for c in done.choices if c.finish_reason == "stop"]
    assert stopped, [c.message.content for c in done.choices]
    for text in stopped:
        assert isinstance(json.loads(text), dict)
    for c in done.choices:  # cut off by max_tokens: still the start of a JSON object
        assert c.message.content.startswith("{")


def test_completions_logprobs_offer_only_what_the_grammar_allows(client):
    done = client.completions.create(
        model="tiny",
        prompt="基金代码是",
        max_tokens=20,
        temperature=1.0,
        seed=5,
        logprobs=5,
        extra_body={"structured_outputs": {"regex": "[0-9]{6}"}},
    )
    choice = done.choices[0]
    assert re.fullmatch("[0-9]{6}", choice.text) and choice.finish_reason == "stop"
    # As vLLM reports them: the model's distribution after the grammar's mask.
    for top in choice.logprobs.top_logprobs:
        assert top and all(key.isdigit() for key in top), top


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"choice": "yes"}}, "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": 'start: "a" b'}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": ["regex"]}, "structured_outputs"),
        (
            {"structured_outputs": {"structural_tag": "{}"}},
            "structured_outputs.structural_tag",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
        ),
    ],
)
def test_a_bad_constraint_is_a_400_naming_its_field(server, extra, param):
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "tiny", "messages": MSG, "max_tokens": 5, **extra},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", param), err


def test_a_grammar_only_the_models_vocabulary_can_refuse_is_a_400_from_the_engine(server):
    # Valid Lark, checked without the vocabulary on the way in; the engine process, which
    # holds the vocabulary, finds no such special token and refuses the request, not a 500.
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": MSG,
            "max_tokens": 5,
            "structured_outputs": {"grammar": "start: <|no_such_token|>"},
        },
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "no_such_token" in err["message"], err
    # The engine serves on.
    ok = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "tiny", "messages": MSG, "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200
