"""Tool calling end to end on the transformers engine: a real server with the tiny model and
the official `openai` client (`parse()` with pydantic tools, streams), the template's
`<tool_call>` format read back into `tool_calls`, conversations with tool turns rendered as
training renders them, and the 400s."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field
from test_serve_support import build_tiny, cache_root, serve

from tunedesk.chat_format import encode_prompt, normalize_tools
from tunedesk.serve.engines.local.tools import ToolStream, parse_calls
from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings

MSG = [{"role": "user", "content": "医药基金申购费是多少？"}]


class FundFee(BaseModel):
    """申购费率"""

    model_config = ConfigDict(extra="forbid")
    fund: Literal["医药", "消费", "白酒"]


class LookupOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")
    order_id: str = Field(pattern=r"^[A-Z]-[0-9]{2}$")
    count: int = Field(ge=1, le=9)


TOOLS = [openai.pydantic_function_tool(FundFee), openai.pydantic_function_tool(LookupOrder)]
PARSERS = {"FundFee": FundFee, "LookupOrder": LookupOrder}
ASK = dict(model="tiny", messages=MSG, tools=TOOLS)


@pytest.fixture(scope="module")
def tiny(pytestconfig, tmp_path_factory):
    return build_tiny(cache_root(pytestconfig, tmp_path_factory))


@pytest.fixture(scope="module")
def server(tiny):
    registry = ModelRegistry()
    registry.register("tiny", str(tiny))
    with serve(ServeSettings(cpu_threads=1, max_n=4), registry) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def _forced(text: str) -> dict:
    """vLLM's `structured_outputs` holding the answer to exactly `text` (a regex of it)."""
    special = set(r"\.^$*+?{}[]|()")
    return {"structured_outputs": {"regex": "".join("\\" + c if c in special else c for c in text)}}


def _streamed(stream) -> tuple[str, list[tuple[str, str]], str | None]:
    """A stream's content, its calls as (name, arguments) and its finish reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            calls[call.index] = (call.function.name, call.function.arguments)
            assert call.id.startswith("call_") and call.type == "function"
        finish = choice.finish_reason or finish
    return content, [calls[k] for k in sorted(calls)], finish


def test_sdk_parse_with_a_named_tool_gives_the_pydantic_arguments_and_the_stream_agrees(client):
    named = {"type": "function", "function": {"name": "LookupOrder"}}
    kwargs = dict(ASK, tool_choice=named, temperature=0, max_tokens=200)
    done = client.chat.completions.parse(**kwargs)
    choice = done.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's (and vLLM's) reason for a named call
    [call] = choice.message.tool_calls
    assert call.function.name == "LookupOrder" and call.id.startswith("call_")
    assert isinstance(call.function.parsed_arguments, LookupOrder)
    assert LookupOrder.model_validate_json(call.function.arguments) == (
        call.function.parsed_arguments
    )
    assert not choice.message.content
    # Written as the training data writes calls: tojson's separators.
    args = json.loads(call.function.arguments)
    assert call.function.arguments == json.dumps(args, ensure_ascii=False)

    stream = client.chat.completions.create(**kwargs, stream=True)
    assert _streamed(stream) == ("", [("LookupOrder", call.function.arguments)], "stop")


def test_required_makes_every_sampled_choice_call_a_listed_tool(client):
    done = client.chat.completions.create(
        **ASK, tool_choice="required", temperature=1.5, seed=7, n=4, max_tokens=300
    )
    assert len(done.choices) == 4
    for choice in done.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            PARSERS[call.function.name].model_validate_json(call.function.arguments)


def test_parallel_tool_calls_false_allows_one_call(client):
    done = client.chat.completions.create(
        **ASK,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.5,
        seed=11,
        n=4,
        max_tokens=300,
    )
    assert [len(c.message.tool_calls) for c in done.choices] == [1, 1, 1, 1]


def test_auto_reads_the_templates_call_blocks_out_of_the_answer(client):
    call = '{"name": "FundFee", "arguments": {"fund": "医药"}}'
    answer = f"好的，我查一下。\n<tool_call>\n{call}\n</tool_call>"
    kwargs = dict(ASK, temperature=0, max_tokens=200)
    done = client.chat.completions.create(**kwargs, extra_body=_forced(answer))
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "好的，我查一下。\n"
    [got] = choice.message.tool_calls
    assert (got.function.name, json.loads(got.function.arguments)) == ("FundFee", {"fund": "医药"})
    stream = client.chat.completions.create(**kwargs, extra_body=_forced(answer), stream=True)
    assert _streamed(stream) == (
        "好的，我查一下。\n",
        [("FundFee", got.function.arguments)],
        "tool_calls",
    )

    # A block that is not JSON stays text, as vLLM's hermes parser leaves it.
    broken = "<tool_call>\n{name: FundFee}\n</tool_call>"
    done = client.chat.completions.create(**kwargs, extra_body=_forced(broken))
    assert done.choices[0].message.content == broken
    assert not done.choices[0].message.tool_calls and done.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(**kwargs, extra_body=_forced(broken), stream=True)
    assert _streamed(stream) == (broken, [], "stop")

    # tool_choice none: the tools are in the prompt, nothing is read as a call.
    done = client.chat.completions.create(**kwargs, tool_choice="none", extra_body=_forced(answer))
    assert done.choices[0].message.content == answer and not done.choices[0].message.tool_calls


def test_a_conversation_with_tool_turns_renders_as_training_renders_it(client, tiny):
    from transformers import AutoTokenizer

    first = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "FundFee"}},
        temperature=0,
        max_tokens=100,
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *MSG,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "0.15%"},
    ]
    reply = client.chat.completions.create(
        model="tiny", messages=history, tools=TOOLS, max_tokens=4, temperature=0
    )
    # The same conversation as a training row (prepare's shape: arguments as an object).
    trained = [
        *MSG,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": json.loads(call.function.arguments),
                    },
                }
            ],
        },
        {"role": "tool", "content": "0.15%"},
    ]
    tok = AutoTokenizer.from_pretrained(tiny)
    prompt = encode_prompt(tok, trained, normalize_tools(TOOLS))
    assert reply.usage.prompt_tokens == len(prompt)
    text = tok.decode(prompt)
    assert "<tool_response>\n0.15%\n</tool_response>" in text
    assert f'<tool_call>\n{{"name": "FundFee", "arguments": {call.function.arguments}}}' in text
    assert '"name": "LookupOrder"' in text  # the tools are listed in the system turn


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"description": "x"}}]},
            "tools[0].function.name",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        (
            {"tools": [{"type": "function", "function": {"name": "has space"}}]},
            "tools[0].function.name",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools[0].function.parameters",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        (
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "nonsense"}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_bad_tools_are_400s_naming_the_field(server, extra, param):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 4, **extra}
    r = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_parse_calls_and_the_stream_splitter_agree_on_every_split():
    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    texts = [
        "no call here, just <tool talk",
        "先说一句\n" + call,
        call + "\n" + call.replace('"f"', '"g"'),
        "text then an unterminated <tool_call>\n" + '{"name": "f", "arguments": {}}',
        "text then " + call.replace('{"name"', "{name"),  # broken: all text
        "ends with a partial marker <tool_",
    ]
    for text in texts:
        content, calls = parse_calls(text)
        for cut in range(len(text) + 1):  # every way of splitting the answer in two deltas
            stream = ToolStream()
            sent = stream.feed(text[:cut]) + stream.feed(text[cut:])
            rest, streamed = stream.finish()
            assert sent + rest == (content or ""), (text, cut)
            strip = [(c["function"]["name"], c["function"]["arguments"]) for c in streamed]
            assert strip == [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    held = ToolStream()  # a possible start of a call waits until it is one or isn't
    assert held.feed("ends with <tool_") == "ends with "
    assert held.feed("tip") == "<tool_tip"
    assert held.feed(" and <tool_call>") == " and "
    assert parse_calls(texts[1])[0] == "先说一句\n"
    assert [c["function"]["name"] for c in parse_calls(texts[2])[1]] == ["f", "g"]
    assert parse_calls(texts[3])[1][0]["function"]["arguments"] == "{}"
    assert parse_calls(texts[4]) == (texts[4], [])


def test_an_answer_without_calls_has_no_tool_calls_key(server):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 2, "tools": TOOLS}
    message = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30).json()
    message = message["choices"][0]["message"]
    assert message["role"] == "assistant" and "tool_calls" not in message  # as OpenAI's
