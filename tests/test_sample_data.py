"""Tests for the deterministic fund customer-service sample data."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import pytest

from tunedesk.train.sample_data import (
    _PREFIXES,
    CAVEAT,
    FUNDS,
    domain_corpus,
    generate_pairs,
    write_sample,
)

FORBIDDEN = ("保本", "稳赚", "保证收益")
TOPICS = {
    "fees",
    "fund_types",
    "timing",
    "risk",
    "dca_dividend",
    "account",
    "fund_facts",
    "recommend",
    "out_of_domain",
}
MGMT_FEE = re.compile(r"管理费(?:率)?为每年(\d+\.\d+)%")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return generate_pairs()


def test_default_count_and_schema(rows):
    assert len(rows) >= 3000
    for r in rows:
        assert set(r) == {"prompt", "completion", "topic", "family", "phrasing"}
        assert all(isinstance(v, str) and v for v in r.values())


def test_exact_n():
    assert len(generate_pairs(n=123, seed=4)) == 123
    assert generate_pairs(n=0) == []


def test_deterministic_per_seed(rows):
    assert generate_pairs() == rows
    assert generate_pairs(seed=1) != rows
    assert domain_corpus() == domain_corpus()
    assert domain_corpus(seed=2) != domain_corpus()


def test_every_topic_present(rows):
    assert {r["topic"] for r in rows} == TOPICS


def test_fund_facts_agree_on_management_fee(rows):
    fees_by_fund: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r["topic"] == "fund_facts":
            fees_by_fund[r["family"]].update(MGMT_FEE.findall(r["completion"]))
    # Enough funds mention a fee for the check to mean something.
    assert len(fees_by_fund) >= 30
    for group, fees in fees_by_fund.items():
        assert len(fees) <= 1, (group, fees)
    # And the value quoted is the fund's own fact-sheet value.
    sheet = {f"fund:{f.code}": f"{f.mgmt_fee:.2f}" for f in FUNDS}
    for group, fees in fees_by_fund.items():
        assert fees <= {sheet[group]}, (group, fees)


def test_fund_fact_families_are_one_fund(rows):
    codes = {f.code: f.name for f in FUNDS}
    for r in rows:
        if r["topic"] == "fund_facts":
            code = r["family"].removeprefix("fund:")
            assert code in codes
            assert code in r["completion"] or codes[code] in r["completion"]


def test_caveat_on_recommendations_only(rows):
    recommend = [r for r in rows if r["topic"] == "recommend"]
    assert recommend
    assert all(r["completion"].endswith(CAVEAT) for r in recommend)
    procedural = [r for r in rows if r["topic"] in {"account", "timing", "fees", "fund_facts"}]
    assert procedural
    assert not any(CAVEAT in r["completion"] for r in procedural)


def test_no_forbidden_claims(rows):
    for r in rows:
        for word in FORBIDDEN:
            assert word not in r["completion"], r
    for doc in domain_corpus():
        assert not any(word in doc for word in FORBIDDEN), doc


def test_out_of_domain_share(rows):
    ood = [r for r in rows if r["topic"] == "out_of_domain"]
    assert 0.05 <= len(ood) / len(rows) <= 0.12
    assert all(r["family"].startswith("ood:") for r in ood)
    assert len({r["family"] for r in ood}) >= 4
    assert all("基金" in r["completion"] for r in ood)


def test_families_and_phrasings(rows):
    counts = Counter(r["family"] for r in rows)
    assert len(counts) >= 80
    assert max(counts.values()) <= 0.03 * len(rows)
    phrasings = Counter(r["phrasing"] for r in rows)
    assert len(phrasings) >= 2 * len(counts)
    for r in rows:
        prefix = {"fund_facts": "fund:", "out_of_domain": "ood:"}.get(r["topic"], "tpl:")
        assert r["family"].startswith(prefix), r
        if prefix == "tpl:":  # a template family's phrasings are named under it
            assert r["phrasing"].startswith(r["family"] + ":"), r
    # One phrasing is one template: account questions have no slots, so once the greeting and
    # the closing particle are stripped, all questions of one phrasing are the same words.
    greetings = sorted((p for p in _PREFIXES if p), key=len, reverse=True)
    cores: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r["topic"] == "account":
            q = next(
                (r["prompt"][len(g) :] for g in greetings if r["prompt"].startswith(g)), r["prompt"]
            )
            cores[r["phrasing"]].add(q.rstrip("？?。呀啊呢"))
    assert len(cores) >= 20 and all(len(c) == 1 for c in cores.values())


def test_few_exact_duplicates(rows):
    pairs = Counter((r["prompt"], r["completion"]) for r in rows)
    duplicates = sum(c - 1 for c in pairs.values())
    assert duplicates < 0.01 * len(rows)


def test_answer_lengths(rows):
    lengths = [len(r["completion"]) for r in rows]
    in_range = sum(40 <= n <= 250 for n in lengths)
    assert in_range >= 0.95 * len(rows)


def test_domain_corpus_is_prose():
    docs = domain_corpus(n_docs=300)
    assert len(docs) == 300
    assert all(50 <= len(d) <= 300 for d in docs)
    # Plain paragraphs, not question/answer pairs.
    assert not any("？" in d or "?" in d for d in docs)
    text = "".join(domain_corpus())
    # It shares the fictional funds' facts with the Q&A answers.
    assert sum(f.code in text and f.manager in text for f in FUNDS) >= 35


def test_write_sample(tmp_path):
    out = tmp_path / "sub" / "sample.jsonl"
    assert write_sample(out, n=200, seed=3) == 200
    raw = out.read_text(encoding="utf-8")
    assert "基金" in raw  # ensure_ascii=False: Chinese is written as-is, not \uXXXX
    assert "\\u" not in raw
    lines = raw.splitlines()
    assert len(lines) == 200
    parsed = [json.loads(line) for line in lines]
    assert parsed == generate_pairs(n=200, seed=3)
    assert not list(tmp_path.glob("sub/.*.tmp"))
