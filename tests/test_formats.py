"""Loading SFT data files in many formats into canonical records (train/prepare/formats.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunedesk.train.prepare.formats import FORMATS, FormatError, load_file

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
LF = SHARED / "llamafactory"
COOKBOOK = SHARED / "openai-cookbook"

needs_conformance = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"conformance data not found at {SHARED}"
)


def _errors(result):
    return [p for p in result.problems if p.severity == "error"]


def _count_array(path: Path) -> int:
    return len(json.loads(path.read_text(encoding="utf-8")))


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").split("\n") if line.strip())


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Conformance data


@needs_conformance
@pytest.mark.parametrize(
    ("rel", "fmt", "counter"),
    [
        ("llamafactory/alpaca_zh_demo.json", "alpaca", _count_array),
        ("llamafactory/alpaca_en_demo.json", "alpaca", _count_array),
        ("llamafactory/identity.json", "alpaca", _count_array),
        ("llamafactory/glaive_toolcall_zh_demo.json", "sharegpt", _count_array),
        ("llamafactory/v1_sft_demo.jsonl", "chat", _count_lines),
        ("openai-cookbook/toy_chat_fine_tuning.jsonl", "chat", _count_lines),
    ],
)
def test_conformance_file_loads_every_record(rel, fmt, counter):
    path = SHARED / rel
    expected = counter(path)
    result = load_file(path)
    assert result.format == fmt
    assert _errors(result) == []
    assert len(result.records) == expected
    assert result.rows_read == expected
    for record in result.records:
        assert record.messages
        assert all(isinstance(m["content"], str) for m in record.messages)
        assert {m["role"] for m in record.messages} <= {"system", "user", "assistant", "tool"}


@needs_conformance
def test_alpaca_zh_demo_has_1000_records():
    assert len(load_file(LF / "alpaca_zh_demo.json").records) == 1000


@needs_conformance
def test_alpaca_records_become_user_then_assistant():
    path = LF / "alpaca_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    records = load_file(path).records
    with_input = next(i for i, r in enumerate(raw) if r["input"])
    msgs = records[with_input].messages
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[0]["content"] == raw[with_input]["instruction"] + "\n\n" + raw[with_input]["input"]
    assert msgs[1]["content"] == raw[with_input]["output"]
    without_input = next(i for i, r in enumerate(raw) if not r["input"])
    assert records[without_input].messages[0]["content"] == raw[without_input]["instruction"]


@needs_conformance
def test_toy_chat_records_carry_their_line_numbers():
    path = COOKBOOK / "toy_chat_fine_tuning.jsonl"
    result = load_file(path)
    n = _count_lines(path)
    assert [r.line for r in result.records] == list(range(1, n + 1))
    # records 4 and 5 are structurally bad, but converting them is not this module's concern
    assert [m["role"] for m in result.records[3].messages] == ["system", "assistant"]
    assert result.records[4].location() == f"{path}:5"


@needs_conformance
def test_glaive_toolcall_becomes_tool_calls_and_tool_turns():
    path = LF / "glaive_toolcall_zh_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    result = load_file(path)
    n_calls = sum(t["from"] == "function_call" for r in raw for t in r["conversations"])
    n_obs = sum(t["from"] == "observation" for r in raw for t in r["conversations"])
    calls = [(m, c) for r in result.records for m in r.messages for c in m.get("tool_calls", [])]
    tool_turns = [m for r in result.records for m in r.messages if m["role"] == "tool"]
    assert len(calls) == n_calls > 0
    assert len(tool_turns) == n_obs > 0
    for message, call in calls:
        assert message["role"] == "assistant"
        assert call["type"] == "function"
        assert isinstance(call["function"]["name"], str)
        assert isinstance(call["function"]["arguments"], str)
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
    first = result.records[0]
    expected_args = json.loads(raw[0]["conversations"][1]["value"])["arguments"]
    call = first.messages[1]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == expected_args
    assert first.messages[2]["role"] == "tool"
    assert first.messages[2]["tool_call_id"] == call["id"]
    assert first.messages[2]["name"] == call["function"]["name"]
    with_tools = 0
    for record, row in zip(result.records, raw, strict=True):
        declared = json.loads(row["tools"]) if row["tools"] else []
        if not declared:
            assert record.tools is None
            continue
        with_tools += 1
        assert isinstance(record.tools, list)
        assert len(record.tools) == len(declared)
        assert [t["function"]["name"] for t in record.tools] == [t["name"] for t in declared]
    assert with_tools > 0


@needs_conformance
def test_v1_sft_loss_weight_maps_to_weight():
    result = load_file(LF / "v1_sft_demo.jsonl")
    for record in result.records:
        for message in record.messages:
            if message["role"] == "assistant":
                assert message["weight"] == 1  # loss_weight 1.0
            else:
                assert "weight" not in message  # loss_weight on user turns is ignored
    assert result.records[0].messages[0]["content"] == "hi"


@needs_conformance
def test_dataset_info_registry_loads_present_datasets_and_warns_for_missing():
    registry_path = LF / "dataset_info.json"
    registry = json.loads(registry_path.read_text(encoding="utf-8"))
    present = {
        name: _count_array(LF / entry["file_name"])
        for name, entry in registry.items()
        if "file_name" in entry and (LF / entry["file_name"]).is_file()
    }
    assert {"alpaca_zh_demo", "glaive_toolcall_zh_demo"} <= set(present)
    result = load_file(registry_path)
    assert result.format == "llamafactory_registry"
    assert _errors(result) == []
    assert len(result.records) == sum(present.values())
    per_dataset: dict[str, int] = {}
    for record in result.records:
        per_dataset[record.meta["dataset"]] = per_dataset.get(record.meta["dataset"], 0) + 1
    assert per_dataset == present
    glaive = [r for r in result.records if r.meta["dataset"] == "glaive_toolcall_zh_demo"]
    assert glaive[0].file.endswith("glaive_toolcall_zh_demo.json")
    assert glaive[0].line == 2
    assert any("tool_calls" in m for m in glaive[0].messages)
    warned = {p.field: p for p in result.problems if p.severity == "warning"}
    assert warned["glaive_toolcall_en_demo"].code == "missing_file"
    assert warned["glaive_toolcall_en_demo"].line is not None
    assert warned["mllm_demo"].code == "unsupported_dataset"
    assert warned["dpo_en_demo"].code == "unsupported_dataset"


# ----------------------------------------------------------------------------------------------
# Line numbers and JSON containers


def test_json_array_records_know_their_starting_line(tmp_path):
    text = (
        "[\n"
        '  {"instruction": "a", "output": "b"},\n'  # line 2
        "\n"
        "  {\n"  # line 4
        '    "instruction": "multi\\nline",\n'
        '    "output": "x"\n'
        "  },"
        '  {"instruction": "c", "output": "d"}\n'  # line 7, same line as the previous close
        "]\n"
    )
    result = load_file(_write(tmp_path, "data.json", text))
    assert result.format == "alpaca"
    assert [r.line for r in result.records] == [2, 4, 7]
    assert result.records[1].messages[0]["content"] == "multi\nline"


def test_json_array_syntax_error_is_format_error_with_location(tmp_path):
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n'
    path = _write(tmp_path, "broken.json", text)
    with pytest.raises(FormatError, match=r"broken\.json:3:\d+"):
        load_file(path)


def test_json_array_non_object_element_is_error(tmp_path):
    text = '[\n  {"instruction": "a", "output": "b"},\n  "oops"\n]'
    result = load_file(_write(tmp_path, "data.json", text))
    assert len(result.records) == 1
    assert [(p.code, p.line) for p in result.problems] == [("not_object", 3)]


def test_jsonl_broken_line_is_reported_and_others_load(tmp_path):
    lines = [
        '{"prompt": "p1", "completion": "c1"}',
        "",
        '{"prompt": "p2", "completion": ',
        '{"prompt": "p3", "completion": "c3"}',
    ]
    path = _write(tmp_path, "data.jsonl", "\n".join(lines) + "\n")
    result = load_file(path)
    assert [r.line for r in result.records] == [1, 4]
    assert result.rows_read == 3
    (problem,) = result.problems
    assert (problem.severity, problem.code, problem.line) == ("error", "bad_json", 3)
    assert "column" in problem.message
    assert problem.location() == f"{path}:3"


def test_pretty_printed_single_object_json(tmp_path):
    text = '\n{\n  "messages": [\n    {"role": "user", "content": "hi"}\n  ]\n}\n'
    result = load_file(_write(tmp_path, "one.json", text))
    assert result.format == "chat"
    assert [r.line for r in result.records] == [2]


# ----------------------------------------------------------------------------------------------
# Format conversions


def test_prompt_completion_legacy_conventions_are_normalised(tmp_path):
    rows = [
        {"prompt": "What is 2+2? ->", "completion": " 4\n", "group": "math"},
        {"prompt": "Capital of France? ->", "completion": " Paris\n"},
        {"prompt": "Colour of the sky? ->", "completion": " Blue\n", "system": "Be brief."},
    ]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    result = load_file(_write(tmp_path, "legacy.jsonl", text))
    assert result.format == "prompt_completion"
    assert _errors(result) == []
    first, _, third = result.records
    assert first.messages == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert first.meta == {"group": "math"}
    assert third.messages[0] == {"role": "system", "content": "Be brief."}


def test_prompt_completion_stop_marker_and_separator(tmp_path):
    rows = [
        {"prompt": f"Question {i}\n\n###\n\n", "completion": f" Answer {i} END"} for i in range(5)
    ]
    result = load_file(_write(tmp_path, "stop.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert result.records[0].messages == [
        {"role": "user", "content": "Question 0"},
        {"role": "assistant", "content": "Answer 0"},
    ]


def test_prompt_completion_without_common_separator_keeps_prompts(tmp_path):
    rows = [
        {"prompt": "A ->", "completion": "x"},
        {"prompt": "B?", "completion": "y"},
        {"prompt": "C?", "completion": "z"},
    ]
    result = load_file(_write(tmp_path, "mixed.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert [r.messages[0]["content"] for r in result.records] == ["A ->", "B?", "C?"]


def test_chat_weights_typed_parts_tools_and_roles(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "sys"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "value": "b"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": {"x": 1}},
                    }
                ],
                "weight": 0,
            },
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "assistant", "content": "done", "loss_weight": 0.0},
        ],
        "tools": json.dumps([{"type": "function", "function": {"name": "f"}}]),
        "id": 7,
    }
    result = load_file(_write(tmp_path, "chat.jsonl", json.dumps(row)))
    assert _errors(result) == []
    (record,) = result.records
    msgs = record.messages
    assert msgs[1] == {"role": "user", "content": "a\nb"}  # joined as serving joins parts
    assert msgs[2]["content"] == "" and msgs[2]["weight"] == 0
    assert json.loads(msgs[2]["tool_calls"][0]["function"]["arguments"]) == {"x": 1}
    assert msgs[3] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    assert msgs[4] == {"role": "assistant", "content": "done", "weight": 0}
    # The shape vLLM renders a request's tools in (absent description/parameters as null),
    # so a tool trains as either engine serves it.
    function = {"name": "f", "description": None, "parameters": None}
    assert record.tools == [{"type": "function", "function": function}]
    assert record.meta == {"id": 7}


def test_chat_unknown_role_is_error_naming_the_field(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}]},
    ]
    result = load_file(_write(tmp_path, "chat.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert len(result.records) == 1
    (problem,) = result.problems
    assert (problem.code, problem.line, problem.field) == ("bad_role", 2, "messages[0].role")
    assert "messages[0].role" in problem.message


def test_chat_developer_and_system_turns_merge_first_as_served(tmp_path):
    """A developer turn is a system turn; with another system turn both become one first
    turn, as a request with them is served (and rendered by vLLM). Without a developer turn
    nothing moves: validation refuses a late system turn, as serving does."""
    merged = {
        "messages": [
            {"role": "developer", "content": "只答基金。"},
            {"role": "user", "content": "申购费？"},
            {"role": "system", "content": "礼貌。"},
            {"role": "assistant", "content": "按费率收取。"},
        ]
    }
    late = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "system", "content": "s"},
            {"role": "assistant", "content": "a"},
        ]
    }
    rows = "\n".join(json.dumps(r, ensure_ascii=False) for r in (merged, late))
    result = load_file(_write(tmp_path, "chat.jsonl", rows))
    first, second = result.records
    assert first.messages == [
        {"role": "system", "content": "只答基金。\n\n礼貌。"},
        {"role": "user", "content": "申购费？"},
        {"role": "assistant", "content": "按费率收取。"},
    ]
    assert [(p.code, p.line) for p in result.problems] == [("merged_system_turns", 1)]
    assert second.messages == late["messages"]  # left for validation to refuse, by line


def test_alpaca_history_and_system(tmp_path):
    row = {
        "instruction": "q2",
        "input": "",
        "output": "a2",
        "system": "sys",
        "history": [["q1", "a1"]],
    }
    result = load_file(_write(tmp_path, "a.json", json.dumps([row])))
    assert [(m["role"], m["content"]) for m in result.records[0].messages] == [
        ("system", "sys"),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
    ]


def test_alpaca_missing_output_is_error(tmp_path):
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q"}]
    result = load_file(_write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert len(result.records) == 1
    (problem,) = result.problems
    assert (problem.code, problem.line, problem.field) == ("missing_field", 2, "output")


def test_sharegpt_bad_tools_and_bad_function_call_are_errors(tmp_path):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad_tools = {**good, "tools": "[{not json"}
    bad_call = {
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": "call f please"},
        ]
    }
    text = "\n".join(json.dumps(r) for r in (good, bad_tools, bad_call))
    result = load_file(_write(tmp_path, "s.jsonl", text))
    assert len(result.records) == 1
    assert result.records[0].tools is None
    assert [(p.code, p.line) for p in result.problems] == [("bad_tools", 2), ("bad_tool_call", 3)]


def test_call_arguments_that_are_not_a_json_object_are_errors_naming_the_field(tmp_path):
    def chat(arguments):
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
        messages = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ]
        return json.dumps({"messages": messages})

    rows = [chat('{"x":1}'), chat("x=1"), chat("[1, 2]"), chat(""), chat(None)]
    result = load_file(_write(tmp_path, "calls.jsonl", "\n".join(rows)))
    assert [(p.code, p.line, p.field) for p in result.problems] == [
        ("bad_tool_call", 2, "messages[1].tool_calls[0].function.arguments"),
        ("bad_tool_call", 3, "messages[1].tool_calls[0].function.arguments"),
    ]
    assert "not valid JSON" in result.problems[0].message
    assert "JSON object" in result.problems[1].message
    args = [r.messages[1]["tool_calls"][0]["function"]["arguments"] for r in result.records]
    assert args == ['{"x":1}', "{}", "{}"]  # kept as written; empty means no arguments


def test_mismatched_record_in_auto_detected_file(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}, {"messages": [{"role": "user", "content": "x"}]}]
    result = load_file(_write(tmp_path, "m.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert result.format == "prompt_completion"
    assert [(p.code, p.line) for p in result.problems] == [("format_mismatch", 2)]


def test_unrecognised_records_are_unknown_format(tmp_path):
    result = load_file(_write(tmp_path, "u.jsonl", '{"foo": 1}\n{"bar": 2}\n'))
    assert result.records == []
    assert result.format == "unknown"
    assert [(p.code, p.line) for p in result.problems] == [
        ("unknown_format", 1),
        ("unknown_format", 2),
    ]


# ----------------------------------------------------------------------------------------------
# CSV


def test_csv_chinese_headers_with_quoted_multiline_answer(tmp_path):
    text = '问题,答案,类别\n如何开户？,"第一步：下载应用。\n第二步：实名认证。",账户\n\n费率多少？,0.5%,费用\n'
    result = load_file(_write(tmp_path, "faq.csv", text))
    assert result.format == "csv"
    assert _errors(result) == []
    first, second = result.records
    assert first.line == 2 and second.line == 5
    assert first.messages == [
        {"role": "user", "content": "如何开户？"},
        {"role": "assistant", "content": "第一步：下载应用。\n第二步：实名认证。"},
    ]
    assert first.meta == {"类别": "账户"}


def test_tsv_with_explicit_columns(tmp_path):
    text = "id\tq_text\ta_text\tsys\n1\tHi?\tHello.\tBe nice.\n"
    path = _write(tmp_path, "faq.tsv", text)
    result = load_file(path, question_col="q_text", answer_col="a_text", system_col="sys")
    assert result.records[0].messages == [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert result.records[0].meta == {"id": "1"}


def test_csv_without_question_answer_columns_is_format_error(tmp_path):
    with pytest.raises(FormatError, match="faq.csv"):
        load_file(_write(tmp_path, "faq.csv", "foo,bar\n1,2\n"))


# ----------------------------------------------------------------------------------------------
# Explicit format and whole-file failures


def test_explicit_format_overrides_detection(tmp_path):
    row = {"instruction": "i", "output": "o", "prompt": "p ->", "completion": " c\n"}
    path = _write(tmp_path, "both.jsonl", json.dumps(row) + "\n")
    assert load_file(path).format == "alpaca"
    result = load_file(path, "prompt_completion")
    assert result.format == "prompt_completion"
    assert result.records[0].messages == [
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "c"},
    ]
    assert result.records[0].meta == {"instruction": "i", "output": "o"}


def test_explicit_record_format_on_csv(tmp_path):
    path = _write(tmp_path, "a.csv", "instruction,input,output\nTranslate,bonjour,hello\n")
    result = load_file(path, "alpaca")
    assert result.format == "alpaca"
    assert result.records[0].messages[0]["content"] == "Translate\n\nbonjour"
    assert result.records[0].line == 2


def test_explicit_csv_format_on_other_extension(tmp_path):
    path = _write(tmp_path, "faq.txt", "question,answer\nq,a\n")
    assert load_file(path, "csv").records[0].messages[1] == {"role": "assistant", "content": "a"}


def test_missing_file_is_format_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FormatError, match="nope.jsonl"):
        load_file(missing)


def test_unknown_format_name_is_format_error(tmp_path):
    path = _write(tmp_path, "x.jsonl", '{"prompt": "p", "completion": "c"}\n')
    with pytest.raises(FormatError, match="x.jsonl"):
        load_file(path, "yaml")
    assert "csv" in FORMATS


def test_not_json_and_undecodable_are_format_errors(tmp_path):
    with pytest.raises(FormatError, match="t.json"):
        load_file(_write(tmp_path, "t.json", "hello world\n"))
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(FormatError, match="b.jsonl"):
        load_file(bad)
