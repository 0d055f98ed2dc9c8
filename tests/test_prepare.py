"""`tunedesk prepare`: conformance data, line-numbered reports, cleaning, PII and splits."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tunedesk.train.prepare.normalize import normalize_text
from tunedesk.train.prepare.pii import find_pii, mask_pii
from tunedesk.train.prepare.pipeline import PrepareOptions, prepare

CONFORMANCE = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
needs_conformance = pytest.mark.skipif(
    not CONFORMANCE.exists(), reason=f"conformance data not found at {CONFORMANCE}"
)


def _json_len(path: Path) -> int:
    if path.suffix == ".jsonl":
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return len(json.loads(path.read_text(encoding="utf-8")))


@needs_conformance
@pytest.mark.parametrize(
    "name",
    [
        "llamafactory/alpaca_zh_demo.json",
        "llamafactory/alpaca_en_demo.json",
        "llamafactory/identity.json",
        "llamafactory/glaive_toolcall_zh_demo.json",
        "llamafactory/v1_sft_demo.jsonl",
        "openai-cookbook/toy_chat_fine_tuning.jsonl",
    ],
)
def test_every_conformance_file_prepares(name, tmp_path):
    path = CONFORMANCE / name
    result = prepare([path], tmp_path, PrepareOptions(min_examples=1))
    c = result.report["counts"]
    assert c["rows_read"] == _json_len(path)
    assert c["records"] == _json_len(path)
    written = sum(_json_len(tmp_path / f"{s}.jsonl") for s in ("train", "val", "test"))
    assert written == c["kept"] > 0
    assert json.loads((tmp_path / "report.json").read_text())["counts"]["kept"] == c["kept"]


@needs_conformance
def test_llamafactory_registry_loads_its_present_datasets(tmp_path):
    result = prepare([CONFORMANCE / "llamafactory" / "dataset_info.json"], None)
    expected = sum(
        _json_len(CONFORMANCE / "llamafactory" / n)
        for n in (
            "identity.json",
            "alpaca_en_demo.json",
            "alpaca_zh_demo.json",
            "glaive_toolcall_zh_demo.json",
        )
    )
    assert result.report["counts"]["records"] == expected


@needs_conformance
def test_toy_chat_bad_records_reported_by_line(tmp_path):
    path = CONFORMANCE / "openai-cookbook" / "toy_chat_fine_tuning.jsonl"
    result = prepare([path], tmp_path)
    errors = {(p["line"], p["code"]) for p in result.report["problems"] if p["severity"] == "error"}
    assert (4, "no_user_turn") in errors
    assert (5, "too_long") in errors
    assert {line for line, _ in errors} == {4, 5}
    assert result.report["counts"]["kept"] == 3
    located = [p["location"] for p in result.report["problems"] if p["severity"] == "error"]
    assert f"{path}:4" in located and f"{path}:5" in located


@needs_conformance
def test_placeholders_warned(tmp_path):
    result = prepare([CONFORMANCE / "llamafactory" / "identity.json"], None)
    placeholders = [p for p in result.report["problems"] if p["code"] == "placeholder"]
    assert placeholders and all(p["line"] for p in placeholders)
    assert "{{name}}" in placeholders[0]["message"]


def _qa(prompt: str, completion: str, **extra) -> str:
    return json.dumps({"prompt": prompt, "completion": completion, **extra}, ensure_ascii=False)


def _planted_dataset(tmp_path: Path) -> tuple[Path, list[str]]:
    rng = random.Random(0)
    pool = [chr(c) for c in range(0x4E00, 0x4E00 + 800)]
    lines = []
    for _i in range(300):
        # Random text: unrelated rows, so the only near-duplicates are the planted ones.
        q = "".join(rng.choice(pool) for _ in range(20))
        a = "".join(rng.choice(pool) for _ in range(40))
        lines.append(_qa(f"{q}？", f"{a}。"))
    planted = [
        "请问启明新能源混合A的申购费率是多少？我准备投资十万元左右，想了解清楚一点再决定。",
        "请问启明新能源混合A的申购费率是多少?我准备投资十万元左右,想了解清楚一点再决定。",
        "请问启明新能源混合A的申购费率是多少？我准备投资十万元左右，想了解清楚一些再决定。",
    ]
    answer = "启明新能源混合A申购金额100万元以下的费率为1.5%，100万元到500万元为1.2%，500万元以上每笔1000元。"
    for q in planted:
        lines.append(_qa(q, answer))
    path = tmp_path / "planted.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, planted


def _where(splits: dict, needle: str) -> set[str]:
    return {
        name
        for name, rows in splits.items()
        for row in rows
        if needle in row["messages"][0]["content"]
    }


def test_split_is_deterministic_and_near_duplicates_stay_together(tmp_path):
    path, planted = _planted_dataset(tmp_path)
    a = prepare([path], tmp_path / "a", PrepareOptions(seed=7))
    prepare([path], tmp_path / "b", PrepareOptions(seed=7))
    for s in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{s}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{s}.jsonl"
        ).read_bytes()
    sizes = a.report["counts"]["splits"]
    assert sizes["train"] + sizes["val"] + sizes["test"] == 303
    assert 0.75 < sizes["train"] / 303 < 0.85 and sizes["val"] > 20 and sizes["test"] > 20
    assert a.report["counts"]["near_duplicate_clusters"] >= 1
    # All three planted near-duplicates (punctuation and one word changed) in exactly one split.
    assert len(_where(a.splits, "启明新能源混合A")) == 1
    found = sum(
        1
        for rows in a.splits.values()
        for r in rows
        if "启明新能源混合A" in r["messages"][0]["content"]
    )
    assert found == 3
    # A different seed deals differently, still leak-free.
    c = prepare([path], None, PrepareOptions(seed=8))
    assert c.splits != a.splits
    assert len(_where(c.splits, "启明新能源混合A")) == 1


def test_near_duplicates_can_be_removed(tmp_path):
    path, _ = _planted_dataset(tmp_path)
    result = prepare([path], None, PrepareOptions(near_dup="remove"))
    assert result.report["counts"]["near_duplicates_removed"] == 2
    assert result.report["counts"]["kept"] == 301


def test_group_field_keeps_a_group_in_one_split(tmp_path):
    lines = [
        _qa(
            f"问题{i}：基金{i % 40}怎么样{i}？",
            f"回答{i}：这只基金的情况是{i * 7}。",
            group=f"fund:{i % 40}",
        )
        for i in range(400)
    ]
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    result = prepare([path], None)
    home: dict[str, set[str]] = {}
    for name, rows in result.splits.items():
        for row in rows:
            home.setdefault(row["meta"]["group"], set()).add(name)
    assert len(home) == 40 and all(len(v) == 1 for v in home.values())
    assert {n for v in home.values() for n in v} == {"train", "val", "test"}


def test_exact_duplicates_and_conflicts(tmp_path):
    lines = [_qa("赎回多久到账？", "一般T+1到账。")] * 3 + [_qa("赎回多久到账？", "T+3到账。")]
    lines += [_qa(f"问题{i}", f"答案{i}") for i in range(10)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    result = prepare([path], None)
    c = result.report["counts"]
    assert c["exact_duplicates_removed"] == 2
    assert c["conflicting_prompts"] == 1
    conflict = [p for p in result.report["problems"] if p["code"] == "conflicting_answers"][0]
    assert f"{path}:1" in conflict["message"] and f"{path}:4" in conflict["message"]
    assert any(p["code"] == "few_examples" for p in result.report["problems"])


def test_pii_found_in_planted_examples():
    text = (
        "我的手机号是13812345678，身份证号11010519491231002X，"
        "银行卡6222021234567890128，邮箱 zhang.san@example.com，订单号20240101123456。"
    )
    kinds = [h.kind for h in find_pii(text)]
    assert kinds == ["mobile", "id_card", "bank_card", "email"]
    masked = mask_pii(text)
    assert "13812345678" not in masked and "[手机号]" in masked and "[身份证号]" in masked
    assert "[银行卡号]" in masked and "[邮箱]" in masked
    assert "20240101123456" in masked  # an order number is not a bank card (fails Luhn)
    # A wrong ID checksum is not an ID card.
    assert [h.kind for h in find_pii("身份证110105194912310021")] == []


def test_pii_reported_and_masked_by_prepare(tmp_path):
    lines = [_qa("帮我查下账户，电话13912345678", "好的，已为您查询。")]
    lines += [_qa(f"问题{i}", f"答案{i}") for i in range(5)]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    result = prepare([path], tmp_path / "out", PrepareOptions(mask_pii=True))
    assert result.report["counts"]["pii"]["mobile"] == 1
    hit = [p for p in result.report["problems"] if p["code"] == "pii"][0]
    assert hit["line"] == 1 and hit["field"] == "messages[0].content"
    out = "".join((tmp_path / "out" / f"{s}.jsonl").read_text() for s in ("train", "val", "test"))
    assert "13912345678" not in out and "[手机号]" in out


def test_normalisation_keeps_chinese_punctuation():
    assert normalize_text("  基金，收益？（R3）……ＡＢＣ１２３  \r\n\r\n\r\n下一行\u200b ") == (
        "基金，收益？（R3）……ABC123\n\n下一行"
    )
    assert normalize_text("a\u3000\u00a0 b\t\tc") == "a b c"


def test_legacy_prompt_suffix_normalised(tmp_path):
    lines = [_qa(f"基金{i}的费率是多少 ->", f" 费率为{i}%。\n") for i in range(20)]
    path = tmp_path / "legacy.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    rows = [r for rows in prepare([path], None).splits.values() for r in rows]
    assert all(not r["messages"][0]["content"].endswith("->") for r in rows)
    assert all(r["messages"][1]["content"] == r["messages"][1]["content"].strip() for r in rows)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunedesk.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_bad_input_is_a_clear_message_not_a_traceback(tmp_path):
    missing = _cli("prepare", "nope.jsonl", "--out", "o", cwd=tmp_path)
    assert missing.returncode == 2
    assert "nope.jsonl" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"\nnot json\n{"completion": ""}\n')
    bad = _cli("prepare", "bad.jsonl", "--out", "o", cwd=tmp_path)
    assert bad.returncode == 1, bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout
    assert "bad.jsonl:2" in bad.stdout
    assert "nothing usable" in bad.stderr
    (tmp_path / "x.csv").write_text("foo,bar\n1,2\n")
    csv = _cli("prepare", "x.csv", "--out", "o", cwd=tmp_path)
    assert csv.returncode == 2 and "x.csv" in csv.stderr and "Traceback" not in csv.stderr


def test_cli_prepares_sample_data(tmp_path):
    assert _cli("data", "sample", "--out", "qa.jsonl", cwd=tmp_path).returncode == 0

    def split(*flags: str) -> dict[str, list[dict]]:
        out = "prepared" + "".join(flags).replace("-", "_")
        done = _cli("prepare", "qa.jsonl", "--out", out, *flags, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        report = json.loads((tmp_path / out / "report.json").read_text())
        assert report["counts"]["kept"] >= 3000
        return {
            name: [
                json.loads(x) for x in (tmp_path / out / f"{name}.jsonl").read_text().splitlines()
            ]
            for name in ("train", "val", "test")
        }

    def keys(rows: list[dict], field: str) -> set[str]:
        return {r["meta"][field] for r in rows}

    # As a customer's export is split (the demo's): no test question is a training question,
    # yet test questions do share templates with training ones (the phrasing key is the
    # sample's, looked up by the source line prepare records).
    default = split()
    train_questions = {r["messages"][0]["content"] for r in default["train"]}
    assert not any(r["messages"][0]["content"] in train_questions for r in default["test"])
    sample = (tmp_path / "qa.jsonl").read_text(encoding="utf-8").splitlines()

    def phrasings(rows: list[dict]) -> set[str]:
        lines = (int(r["meta"]["source"].rsplit(":", 1)[1]) for r in rows)
        return {json.loads(sample[n - 1])["phrasing"] for n in lines}

    assert phrasings(default["test"]) & phrasings(default["train"])
    # Held out by family: funds and phrasing families the fine-tune never saw.
    strict = split("--group-field", "family")
    test_families = keys(strict["test"], "family")
    assert any(f.startswith("fund:") for f in test_families)
    assert any(f.startswith("tpl:") for f in test_families)
    assert not test_families & keys(strict["train"], "family")
    # Held out by phrasing: every test question is worded by a template training never used.
    by_phrasing = split("--group-field", "phrasing")
    assert not keys(by_phrasing["test"], "phrasing") & keys(by_phrasing["train"], "phrasing")
    # A misspelt field is an error that names the flag, not a silent ungrouped split.
    typo = _cli("prepare", "qa.jsonl", "--out", "typo", "--group-field", "famliy", cwd=tmp_path)
    assert typo.returncode == 2 and "--group-field 'famliy'" in typo.stderr
    assert "family" in typo.stderr and not (tmp_path / "typo").exists()


def test_same_answer_to_different_questions_is_not_a_near_duplicate():
    from tunedesk.train.prepare.dedup import near_duplicate_examples

    answer = (
        "管理费是支付给基金管理人、用于投资管理的费用，按年费率计算，每日按前一日基金资产净值计提，"
        "从基金资产中直接扣除，已经体现在每日公布的净值里，不需要您另外支付。"
    )

    def conv(q: str, a: str = answer) -> list[dict]:
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    clusters = near_duplicate_examples(
        [
            conv("管理费是怎么扣的"),
            conv("基金的管理费收多少？"),
            conv("请问管理费是怎么扣的？"),  # the first, reworded at the edges: the same question
            conv("我准备投资十万元左右，想了解清楚一点再决定，管理费是多少？"),
            conv("我准备投资十万元左右，想了解清楚一些再决定，管理费是多少？"),
        ]
    ).tolist()
    # One FAQ answer, several phrasings: they may go to different splits (held-out phrasings).
    assert clusters[0] != clusters[1] and clusters[1] != clusters[3]
    # A word changed in a long question, same answer: a near-duplicate.
    assert clusters[3] == clusters[4]


def test_sample_data_holds_out_phrasings_not_whole_intents(tmp_path):
    from tunedesk.train.sample_data import generate_pairs

    path = tmp_path / "fund_qa.jsonl"
    path.write_text(
        "\n".join(json.dumps(p, ensure_ascii=False) for p in generate_pairs(3200)) + "\n",
        encoding="utf-8",
    )
    result = prepare([path], None, PrepareOptions(group_field="family"))

    def intents(split: str) -> set[str]:
        return {
            r["meta"]["family"].rsplit(":", 1)[0]
            for r in result.splits[split]
            if r["meta"]["family"].startswith("tpl:")
        }

    test, train = intents("test"), intents("train")
    assert test, "the test split has template questions"
    # Every intent tested is one training taught, in other phrasings.
    assert test <= train, f"intents never seen in training: {sorted(test - train)}"
