"""tunedesk eval: metric functions, the domain rubric, gates, --model specs and the HTML report.

Everything here is pure Python (no model is loaded), so it runs in a couple of seconds.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import sacrebleu

from tunedesk.eval import metrics as M
from tunedesk.eval.gates import GateError, evaluate_gates, parse_gate, validate_gates
from tunedesk.eval.report import render_report
from tunedesk.eval.rubric import (
    DEFAULT_RUBRIC_PATH,
    Rubric,
    RubricError,
    RubricSample,
    load_rubric,
    rubric_rates,
)
from tunedesk.eval.runner import METRIC_KEYS
from tunedesk.eval.specs import SpecError, read_job_curves, resolve, resolve_all, split_label
from tunedesk.train.sample_data import CAVEAT, generate_pairs

REPO = Path(__file__).resolve().parents[1]

# --- exact match ----------------------------------------------------------------------------


def test_normalize_full_width_punctuation_and_case():
    # NFKC turns full-width Ｔ＋１．５％ into T+1.5%; lowercasing gives t; every punctuation
    # mark (，。“”（）！ and ASCII + %) and the spaces go; the decimal point between digits stays.
    assert M.normalize_answer("Ｔ＋１日到账，约１．５％。") == "t1日到账约1.5"
    assert M.normalize_answer("T+1日 到账 约1.5%") == "t1日到账约1.5"
    assert M.exact_match("“货币基金”（R1）！", "货币基金 r1") == 1.0
    assert M.exact_match("申购费：１．５０％。", "申购费:1.50%") == 1.0
    assert M.exact_match("《基金合同》、招募说明书", "基金合同招募说明书") == 1.0


def test_exact_match_keeps_decimal_points_and_words():
    assert M.exact_match("申购费1.5%", "申购费15%") == 0.0  # 1.5 is not 15
    assert M.exact_match("C类", "A类") == 0.0
    assert M.exact_match("", "") == 1.0


# --- char F1 (CMRC-2018 tokens, multiset overlap) ---------------------------------------------


def test_char_tokens_cmrc_segmentation():
    # CJK characters one by one; ASCII words and numbers whole (lowercased); punctuation gone.
    assert M.char_tokens("申购费为1.5%") == ["申", "购", "费", "为", "1.5"]
    assert M.char_tokens("QDII基金，T+1日") == ["qdii", "基", "金", "t", "1", "日"]
    assert M.char_tokens("R4（中高风险）") == ["r4", "中", "高", "风", "险"]
    assert M.char_tokens("。，！") == []


def test_char_f1_hand_computed_fee_rate():
    # pred "申购费为1.5%" -> [申, 购, 费, 为, 1.5]   (5 tokens; % is punctuation)
    # ref  "申购费是1.5%" -> [申, 购, 费, 是, 1.5]   (5 tokens)
    # overlap (multiset): 申 购 费 1.5 = 4
    # P = 4/5 = 0.8, R = 4/5 = 0.8, F1 = 2 * 0.8 * 0.8 / 1.6 = 0.8
    p, r, f = M.char_prf("申购费为1.5%", "申购费是1.5%")
    assert (p, r) == pytest.approx((0.8, 0.8))
    assert f == pytest.approx(0.8)


def test_char_f1_hand_computed_repeated_tokens():
    # pred "基金基金QDII" -> [基, 金, 基, 金, qdii]  (5 tokens)
    # ref  "QDII基金"     -> [qdii, 基, 金]          (3 tokens)
    # overlap counts min(pred, ref) per token: 基 min(2,1)=1, 金 1, qdii 1 -> 3
    # P = 3/5 = 0.6, R = 3/3 = 1.0, F1 = 2 * 0.6 * 1.0 / 1.6 = 0.75
    p, r, f = M.char_prf("基金基金QDII", "QDII基金")
    assert (p, r, f) == pytest.approx((0.6, 1.0, 0.75))


def test_char_f1_edge_cases():
    assert M.char_f1("", "") == 1.0
    assert M.char_f1("", "有内容") == 0.0
    assert M.char_f1("完全不同", "毫无关系") == 0.0
    assert M.char_f1("一模一样。", "一模一样") == 1.0


# --- ROUGE-L on characters ------------------------------------------------------------------


def test_rouge_l_hand_computed_word_order():
    # normalised pred "赎回t1日到账" = 赎 回 t 1 日 到 账 (7 chars)
    # normalised ref  "t1日赎回到账" = t 1 日 赎 回 到 账 (7 chars)
    # LCS = t 1 日 到 账 (5) (赎 回 到 账 is only 4); P = R = 5/7, F = 5/7
    assert M.rouge_l("赎回T+1日到账", "T+1日赎回到账") == pytest.approx(5 / 7)
    # char F1 ignores order: both have the same bag of tokens.
    assert M.char_f1("赎回T+1日到账", "T+1日赎回到账") == pytest.approx(1.0)


def test_rouge_l_hand_computed_fee_rate():
    # "申购费为1.5" vs "申购费是1.5" (7 chars each after normalising; "." stays inside 1.5):
    # LCS = 申 购 费 1 . 5 = 6; P = R = 6/7; F = 6/7
    assert M.rouge_l("申购费为1.5%", "申购费是1.5%") == pytest.approx(6 / 7)
    assert M.lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example
    assert M.rouge_l("", "") == 1.0 and M.rouge_l("甲", "") == 0.0


def test_fast_lcs_agrees_with_the_dynamic_programme():
    import random

    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("申购费是为1.5ab") for _ in range(rng.randint(0, 40)))
        b = "".join(rng.choice("申购费是为1.5ab") for _ in range(rng.randint(0, 90)))
        assert M.lcs_length(a, b) == M.lcs_length_dp(a, b)


def test_length_ratio():
    assert M.length_ratio("申购费为1.5%", "申购费是1.5%。") == pytest.approx(8 / 9)
    assert M.length_ratio("a b", "ab") == 1.0  # whitespace does not count
    assert M.length_ratio("x", "") is None


# --- BLEU / chrF agree with sacrebleu ---------------------------------------------------------

PREDS = ["申购费为1.5%，赎回费按持有时间收取。", "货币基金T+1日到账。", "不知道"]
REFS = [
    "申购费是1.5%，赎回费按持有期限收取。",
    "货币基金普通赎回T+1日到账。",
    "基金分红有两种方式。",
]


def test_bleu_matches_sacrebleu():
    direct = sacrebleu.corpus_bleu(PREDS, [REFS], tokenize="zh").score
    assert M.corpus_bleu(PREDS, REFS) == pytest.approx(direct)
    for p, r in zip(PREDS, REFS, strict=True):
        assert M.sentence_bleu(p, r) == pytest.approx(
            sacrebleu.sentence_bleu(p, [r], tokenize="zh").score
        )
    assert M.sentence_bleu(REFS[0], REFS[0]) == pytest.approx(100.0)


def test_chrf_matches_sacrebleu():
    assert M.corpus_chrf(PREDS, REFS) == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score)
    for p, r in zip(PREDS, REFS, strict=True):
        assert M.sentence_chrf(p, r) == pytest.approx(sacrebleu.sentence_chrf(p, [r]).score)


def test_sample_scores_and_helpers():
    s = M.sample_scores("申购费为1.5%", "申购费是1.5%")
    assert s["em"] == 0.0 and s["char_f1"] == pytest.approx(0.8)
    assert set(s) == {
        "em",
        "char_f1",
        "char_precision",
        "char_recall",
        "rouge_l",
        "bleu",
        "chrf",
        "length_ratio",
    }
    assert M.mean([1.0, None, 0.0]) == 0.5 and M.mean([None]) is None
    assert M.percentile([1, 2, 3, 4], 50) == 2.5 and M.percentile([5.0], 95) == 5.0


# --- rubric ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rubric() -> Rubric:
    return load_rubric()


def _forbid(rubric: Rubric):
    return next(c for c in rubric.checks if c.type == "forbid")


@pytest.mark.parametrize(
    ("text", "passes"),
    [
        ("我们不保证收益，请理性投资。", True),
        ("没有保本的基金，所有基金都有风险。", True),
        ("基金公司和销售机构都不能承诺保本。", True),
        ("本基金并非保本产品。", True),
        ("没有稳赚不赔的基金。", True),
        ("保本是不可能的。", True),
        ("这只基金保本保息，放心买。", False),
        ("买这只基金稳赚。", False),
        ("本产品保证收益8%。", False),
        ("虽然不保证收益，但保本。", False),  # the negation belongs to the first clause
        ("它不仅保本还稳赚。", False),  # 不仅 is not a negation
        ("这只基金特别稳赚。", False),  # 特别 contains 别 but does not negate
    ],
)
def test_forbidden_claims_handle_negation(rubric, text, passes):
    check = _forbid(rubric)
    assert rubric.check_one(check, RubricSample("q", "r"), text) is passes


def test_forbidden_claims_list_negated_occurrences(rubric):
    claims = rubric.claims(_forbid(rubric), "不保证收益，但稳赚不赔")
    assert [(c.term, c.negated) for c in claims] == [("保证收益", True), ("稳赚不赔", False)]


def test_caveat_required_when_reference_carries_it(rubric):
    advice = RubricSample("新手买什么基金好", "建议从指数基金开始定投。" + CAVEAT, "recommend")
    assert rubric.check(advice, "建议从指数基金开始定投。" + CAVEAT)["compliance_caveat"] is True
    # punctuation variants still count: ASCII comma, no full stop
    assert (
        rubric.check(advice, "建议定投。以上仅供参考,不构成投资建议")["compliance_caveat"] is True
    )
    assert rubric.check(advice, "建议从指数基金开始定投。")["compliance_caveat"] is False
    # the reference alone makes it apply, even without a topic
    no_topic = RubricSample("随便问问", "可以考虑。" + CAVEAT)
    assert rubric.check(no_topic, "可以考虑。")["compliance_caveat"] is False
    # a plain advice question applies too
    asked = RubricSample("推荐一只稳健的基金", "可以看看债券基金。")
    assert rubric.check(asked, "可以看看债券基金。")["compliance_caveat"] is False
    fact = RubricSample("货币基金多久到账", "T+1日到账。", "timing")
    assert rubric.check(fact, "T+1日到账。")["compliance_caveat"] is None


def test_out_of_domain_refusal(rubric):
    refusal = "抱歉，我是基金客服助手，只能解答基金投资相关的问题。"
    by_topic = RubricSample("今天天气怎么样", "不知道", "out_of_domain")
    by_reference = RubricSample("推荐几道家常菜", refusal)  # no meta.topic: the reference says it
    for sample in (by_topic, by_reference):
        result = rubric.check(sample, refusal)
        assert result["ood_refusal"] is True and result["in_domain_answered"] is None
        assert rubric.check(sample, "番茄炒蛋很好做。")["ood_refusal"] is False
    in_domain = RubricSample("怎么开户", "在APP中注册即可。", "account")
    assert rubric.check(in_domain, refusal) == {
        "compliance_caveat": None,
        "no_forbidden_claims": True,
        "ood_refusal": None,
        "in_domain_answered": False,  # an over-refusal
    }
    assert rubric.check(in_domain, "")["in_domain_answered"] is False


def test_reference_answers_pass_the_default_rubric(rubric):
    # An honest rubric gives the references themselves 100% on every check.
    pairs = generate_pairs(800)
    results = [
        rubric.check(RubricSample(p["prompt"], p["completion"], p["topic"]), p["completion"])
        for p in pairs
    ]
    rates = rubric_rates(rubric.checks, results)
    assert {k: v["rate"] for k, v in rates.items()} == {
        "compliance_caveat": 1.0,
        "no_forbidden_claims": 1.0,
        "ood_refusal": 1.0,
        "in_domain_answered": 1.0,
    }
    assert rates["ood_refusal"]["applicable"] == sum(p["topic"] == "out_of_domain" for p in pairs)


def test_rubric_rates_skip_inapplicable():
    from tunedesk.eval.rubric import Check

    checks = [Check("a", "answer", "A"), Check("b", "refuse", "B")]
    rates = rubric_rates(checks, [{"a": True, "b": None}, {"a": False, "b": None}])
    assert rates["a"] == {"label": "A", "rate": 0.5, "passed": 1, "applicable": 2}
    assert rates["b"]["rate"] is None and rates["b"]["applicable"] == 0


def test_shipped_rubric_copies_agree():
    assert (REPO / "configs" / "rubric-fund.yaml").read_text(encoding="utf-8") == (
        DEFAULT_RUBRIC_PATH.read_text(encoding="utf-8")
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"checks": [{"name": "x", "type": "nope"}]}, "type must be one of"),
        ({"checks": [{"name": "x", "type": "require"}]}, "needs `phrases`"),
        ({"checks": [{"name": "x", "type": "refuse"}]}, "refusal_patterns"),
        (
            {"checks": [{"name": "x", "type": "forbid", "terms": ["a"], "applies_if": {"x": 1}}]},
            "unknown condition",
        ),
        ({"refusal_patterns": ["("]}, "bad regular expression"),
    ],
)
def test_bad_rubrics_are_rejected(raw, message):
    with pytest.raises(RubricError, match=re.escape(message)):
        Rubric.from_dict(raw, source="r.yaml")


# --- gates ----------------------------------------------------------------------------------


def test_parse_gates():
    g = parse_gate("char_f1=0.4", "under")
    assert (g.model, g.metric, g.threshold, g.op) == (None, "char_f1", 0.4, "under")
    g = parse_gate("ft:exact_match=0.25", "under")
    assert (g.model, g.metric) == ("ft", "em")
    assert parse_gate("rubric.no_forbidden_claims=1", "under").metric == "no_forbidden_claims"
    for bad in ("char_f1", "char_f1=abc", "=1", "a:b:c=1"):
        with pytest.raises(GateError):
            parse_gate(bad, "under")


def test_gates_evaluate_on_the_last_model_by_default():
    models = [
        {"label": "base", "metrics": {"char_f1": 0.2, "loss": 2.0}, "rubric": {}},
        {
            "label": "ft",
            "metrics": {"char_f1": 0.5, "loss": None},
            "rubric": {"no_forbidden_claims": {"rate": 0.9}},
        },
    ]
    gates = [
        parse_gate("char_f1=0.4", "under"),  # ft 0.5 >= 0.4: pass
        parse_gate("base:char_f1=0.4", "under"),  # base 0.2 < 0.4: fail
        parse_gate("no_forbidden_claims=1", "under"),  # 0.9 < 1: fail
        parse_gate("base:loss=2.5", "over"),  # 2.0 <= 2.5: pass
        parse_gate("loss=2.5", "over"),  # not measured for ft: fail
    ]
    validate_gates(gates, ["base", "ft"], set(METRIC_KEYS) | {"no_forbidden_claims"})
    results = evaluate_gates(gates, models)
    assert [r["passed"] for r in results] == [True, False, False, True, False]
    assert results[1]["message"] == "base: char_f1 = 0.2 < 0.4 (--fail-under base:char_f1=0.4)"
    assert "not measured" in results[4]["message"]
    with pytest.raises(GateError, match="no model labelled"):
        validate_gates([parse_gate("x:em=1", "under")], ["base"], set(METRIC_KEYS))
    with pytest.raises(GateError, match="unknown metric"):
        validate_gates([parse_gate("bleu4=1", "under")], ["base"], set(METRIC_KEYS))


# --- --model specs --------------------------------------------------------------------------


def test_endpoint_specs():
    s = resolve("http://127.0.0.1:8000/v1#fund-bot")
    assert (s.kind, s.base_url, s.endpoint_model, s.label) == (
        "endpoint",
        "http://127.0.0.1:8000/v1",
        "fund-bot",
        "fund-bot",
    )
    s = resolve("served=https://host/v1/")
    assert (s.label, s.base_url, s.endpoint_model) == ("served", "https://host/v1", None)
    assert split_label("http://h/v1?a=b") == (None, "http://h/v1?a=b")


def _fake_model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_job_and_path_specs(tmp_path):
    runs, models = tmp_path / "runs", tmp_path / "models"
    (runs / "ftjob-1").mkdir(parents=True)
    (runs / "ftjob-1" / "config.yaml").write_text("base_model: x\n")
    with pytest.raises(SpecError, match="tunedesk merge ftjob-1"):
        resolve("ftjob-1", runs_dir=runs, models_dir=models)
    merged = _fake_model(models / "ftjob-1-merged")
    s = resolve("ftjob-1", runs_dir=runs, models_dir=models)
    assert (s.kind, s.label, s.job_id, Path(s.path)) == ("local", "ftjob-1", "ftjob-1", merged)
    s = resolve(f"ft={merged}", runs_dir=runs, models_dir=models)  # the merged folder: job found
    assert (s.label, s.job_id) == ("ft", "ftjob-1")
    other = _fake_model(tmp_path / "plain")
    s = resolve(str(other), runs_dir=runs, models_dir=models)
    assert (s.label, s.job_id) == ("plain", None)
    with pytest.raises(SpecError, match="not a model folder"):
        resolve("no-such-thing", runs_dir=runs, models_dir=models)
    specs = resolve_all([str(other), str(other)], runs_dir=runs, models_dir=models)
    assert [s.label for s in specs] == ["plain", "plain-2"]
    with pytest.raises(SpecError, match="used twice"):
        resolve_all([f"a={other}", f"a={other}"], runs_dir=runs, models_dir=models)


def test_job_curves(tmp_path):
    run = tmp_path / "ftjob-2"
    run.mkdir()
    (run / "config.yaml").write_text("base_model: Qwen/Qwen2.5-0.5B-Instruct\n")
    lines = [
        {"step": 1, "split": "train", "loss": 3.0, "token_accuracy": 0.1},
        {"step": 2, "split": "train", "loss": 2.0},
        {"step": 2, "split": "val", "loss": 2.5},
        {"step": 2, "split": "train", "loss": 1.9},  # re-logged after a resume: last wins
    ]
    (run / "metrics.jsonl").write_text(
        "\n".join(json.dumps(x) for x in lines) + '\n{"step": 3, "spl'  # torn last line
    )
    curves = read_job_curves(run)
    assert curves["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert curves["series"]["loss"] == {"train": [(1, 3.0), (2, 1.9)], "val": [(2, 2.5)]}
    assert curves["series"]["token_accuracy"] == {"train": [(1, 0.1)]}
    assert read_job_curves(tmp_path / "nothing") is None


# --- report ---------------------------------------------------------------------------------

VOID = {"meta", "br", "img", "input", "link", "hr", "wbr", "col", "source"}
SVG_LEAF = {"line", "rect", "circle", "polyline", "path"}


class _Checker(HTMLParser):
    """Collects ids/classes, external references and tag-nesting errors."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.classes: list[str] = []
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if a.get("id"):
            self.ids.append(a["id"])
        self.classes += (a.get("class") or "").split()
        for key in ("src", "href", "xlink:href"):
            if a.get(key) and not a[key].startswith(("#", "data:")):
                self.external.append(a[key])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()


def check_html(html: str) -> _Checker:
    checker = _Checker()
    checker.feed(html)
    checker.close()
    assert checker.errors == [], checker.errors[:5]
    assert checker.stack == [], checker.stack
    assert checker.external == []
    assert "<script" not in html and "@import" not in html and "url(" not in html
    assert len(checker.ids) == len(set(checker.ids)), "duplicate ids"
    return checker


def _summary(with_gates: bool = True) -> tuple[dict, list[dict]]:
    def model(label: str, f1: float, loss: float | None) -> dict:
        metrics = dict.fromkeys(METRIC_KEYS)
        metrics.update(
            em=f1 / 2,
            char_f1=f1,
            rouge_l=f1 * 0.9,
            bleu=f1 * 50,
            chrf=f1 * 60,
            length_ratio=1.1,
            loss=loss,
            latency_s=0.5,
            tokens_per_s=100.0,
        )
        return {
            "label": label,
            "kind": "local",
            "path": f"/m/{label}",
            "spec": label,
            "n": 2,
            "metrics": metrics,
            "rubric": {
                "no_forbidden_claims": {
                    "label": "No claims",
                    "rate": f1,
                    "passed": 1,
                    "applicable": 2,
                }
            },
            "by_topic": {"fees": {"n": 1, "char_f1": f1}, "risk": {"n": 1, "char_f1": f1 / 2}},
        }

    summary = {
        "n": 2,
        "data": "test.jsonl",
        "created": "now",
        "settings": {"max_tokens": 8, "batch_size": 2, "concurrency": 1},
        "rubric": {
            "name": "r",
            "source": "r.yaml",
            "description": "d",
            "checks": [{"name": "no_forbidden_claims", "label": "No claims", "type": "forbid"}],
        },
        "models": [model("base", 0.2, 3.0), model("ft", 0.6, 1.5)],
        "gates": [
            {
                "gate": "--fail-under char_f1=0.4",
                "passed": True,
                "message": "ft: char_f1 = 0.6 >= 0.4",
            }
        ]
        if with_gates
        else [],
    }
    rows = []
    for i, (q, ref) in enumerate([("申购费是多少？", "申购费为1.50%。"), ("<b>x</b>", "参考")]):
        rows.append(
            {
                "index": i,
                "question": q,
                "reference": ref,
                "meta": {"topic": "fees"},
                "prompt": [{"role": "user", "content": q}],
                "answers": {"base": "<script>alert(1)</script>", "ft": "申购费为1.50%。"},
                "scores": {
                    "base": {
                        "char_f1": 0.0,
                        "rouge_l": 0.0,
                        "em": 0.0,
                        "rubric": {"no_forbidden_claims": False},
                    },
                    "ft": {
                        "char_f1": 1.0 - i,
                        "rouge_l": 1.0,
                        "em": 1.0,
                        "rubric": {"no_forbidden_claims": True},
                    },
                },
            }
        )
    return summary, rows


def test_report_is_self_contained_and_escaped():
    summary, rows = _summary()
    curves = {
        "ft": {
            "job_id": "ftjob-9",
            "base_model": "b",
            "series": {
                "loss": {
                    "train": [(s, 3.0 / s) for s in range(1, 40)],
                    "val": [(10, 0.5), (20, 0.4)],
                },
            },
        }
    }
    html = render_report(summary, rows, curves, worst=5)
    checker = check_html(html)
    for hook in ("models-table", "loss-curves", "worst-samples", "gates", "charts"):
        assert hook in checker.ids
    assert checker.classes.count("chart") >= 5 and checker.tags.count("svg") >= 5
    assert (
        "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    )
    assert "&lt;b&gt;x&lt;/b&gt;" in html
    # the worst sample of the last model (ft) comes first: record 2 (char F1 0) before record 1
    worst = html[html.index('id="worst-samples"') :]
    assert worst.index("test record 2") < worst.index("test record 1")
    # best per metric highlighted: ft has the higher char F1 and the lower loss
    table = html[html.index('id="models-table"') : html.index("</table>")]
    char_row = table[table.index("Char F1") :].split("</tr>")[0]
    assert re.search(r'class="num best">0\.600', char_row)
    loss_row = table[table.index("Answer loss") :].split("</tr>")[0]
    assert re.search(r'class="num best">1\.500', loss_row)


def test_report_without_job_has_no_loss_curves():
    summary, rows = _summary(with_gates=False)
    html = render_report(summary, rows, {}, worst=1)
    checker = check_html(html)
    assert "loss-curves" not in checker.ids and "gates" not in checker.ids
    assert "worst-samples" in checker.ids and "No gates set" in html
