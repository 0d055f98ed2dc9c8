"""vLLM's chat rendering options on the transformers engine, through a real server and the
official `openai` client: `continue_final_message` / `add_generation_prompt`, `documents`,
`chat_template_kwargs` and `reasoning_effort`. Each expected prompt comes from transformers'
own `apply_chat_template`, not from tunedesk's renderer; tests/test_vllm_cpu.py checks that
vLLM renders the same tokens."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI
from test_serve_support import build_tiny, cache_root, options_model, serve
from transformers import AutoTokenizer

from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings

ASK = [{"role": "user", "content": "医药基金申购费是多少？"}]
STARTED = [*ASK, {"role": "assistant", "content": "申购费"}]
GREEDY = {"max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def models(pytestconfig, tmp_path_factory):
    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    return {"tiny": tiny, "opts": options_model(tiny, tmp_path_factory.mktemp("opts"))}


@pytest.fixture(scope="module")
def client(models):
    registry = ModelRegistry()
    for name, path in models.items():
        registry.register(name, str(path))
    with serve(ServeSettings(cpu_threads=1), registry) as srv:
        yield OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizers(models):
    return {name: AutoTokenizer.from_pretrained(path) for name, path in models.items()}


def _oracle(tok, messages, **kwargs) -> list[int]:
    """transformers' own rendering of the prompt, tokenised as a server tokenises it."""
    kwargs.setdefault("add_generation_prompt", True)
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    return tok(text, add_special_tokens=False)["input_ids"]


def _chat(client, model, messages, **extra):
    return client.chat.completions.create(
        model=model, messages=messages, **GREEDY, extra_body={"ignore_eos": True, **extra}
    )


def test_continue_final_message_continues_the_assistant_text(client, tokenizers):
    """The answer goes on from "申购费" exactly as a raw completion of that prompt does."""
    options = {"continue_final_message": True, "add_generation_prompt": False}
    reply = _chat(client, "tiny", STARTED, **options)
    ids = _oracle(
        tokenizers["tiny"], STARTED, add_generation_prompt=False, continue_final_message=True
    )
    assert tokenizers["tiny"].decode(ids).endswith("assistant\n申购费")  # the turn left open
    assert reply.usage.prompt_tokens == len(ids)
    raw = client.completions.create(
        model="tiny", prompt=ids, **GREEDY, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].message.content == raw.choices[0].text
    assert reply.usage.completion_tokens == 6

    stream = client.chat.completions.create(
        model="tiny",
        messages=STARTED,
        stream=True,
        **GREEDY,
        extra_body={"ignore_eos": True, **options},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == raw.choices[0].text


def test_which_turn_the_prompt_opens(client, tokenizers):
    tok = tokenizers["tiny"]
    no_header = _chat(client, "tiny", ASK, add_generation_prompt=False)
    assert no_header.usage.prompt_tokens == len(_oracle(tok, ASK, add_generation_prompt=False))
    # A conversation may end with the assistant (OpenAI and vLLM take it): a new turn follows.
    again = _chat(client, "tiny", STARTED)
    assert again.usage.prompt_tokens == len(_oracle(tok, STARTED))
    assert again.usage.prompt_tokens > len(_oracle(tok, ASK))


def test_template_options_reach_a_template_that_reads_them(client, tokenizers):
    tok = tokenizers["opts"]
    plain = _chat(client, "opts", ASK).usage.prompt_tokens
    assert plain == len(_oracle(tok, ASK))
    off = _chat(client, "opts", ASK, chat_template_kwargs={"enable_thinking": False})
    assert off.usage.prompt_tokens == len(_oracle(tok, ASK, enable_thinking=False)) > plain
    # reasoning_effort goes to the template, and turns thinking off when it is "none".
    low = _chat(client, "opts", ASK, reasoning_effort="low").usage.prompt_tokens
    assert low == len(_oracle(tok, ASK, reasoning_effort="low", enable_thinking=True))
    none = _chat(client, "opts", ASK, reasoning_effort="none").usage.prompt_tokens
    assert none == len(_oracle(tok, ASK, reasoning_effort="none", enable_thinking=False))
    docs = [{"title": "费率表", "text": "医药 0.15%"}]
    with_docs = _chat(client, "opts", ASK, documents=docs).usage.prompt_tokens
    assert with_docs == len(_oracle(tok, ASK, documents=docs)) > plain


def test_template_kwargs_a_template_does_not_read_change_nothing(client):
    plain = _chat(client, "tiny", ASK)
    kwargs = {"enable_thinking": False, "anything": [1, 2]}
    other = _chat(client, "tiny", ASK, chat_template_kwargs=kwargs, reasoning_effort="none")
    assert other.usage.prompt_tokens == plain.usage.prompt_tokens
    assert other.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(
    ("messages", "extra", "param"),
    [
        (STARTED, {"continue_final_message": True}, "continue_final_message"),
        (ASK, {"continue_final_message": True, "add_generation_prompt": False}, "messages"),
        (ASK, {"add_generation_prompt": "no"}, "add_generation_prompt"),
        (ASK, {"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        (ASK, {"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
        (ASK, {"documents": ["just text"]}, "documents"),
    ],
)
def test_bad_options_are_400s_naming_the_field(client, messages, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, "opts", messages, **extra)
    assert err.value.status_code == 400 and err.value.body["param"] == param
