"""report.html: one self-contained page (inline CSS and SVG, no scripts, no external requests).

Stable hooks for browser checks: `#models-table`, `.chart` (every chart figure), `#loss-curves`
(only when a model came from a training job with metrics), `#worst-samples`, `#gates`.
Every piece of text from the data or a model is HTML-escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

from tunedesk.eval.charts import Line, Series, bar_chart, color, ema, line_chart
from tunedesk.eval.runner import METRICS, MetricInfo

_INFO = {m.key: m for m in METRICS}
_FAMILIES = (
    ("overlap", "Answer overlap", "Share of the reference recovered (0-1, higher is better)"),
    ("sacrebleu", "BLEU-4 and chrF", "sacrebleu corpus scores (0-100, tokenize=zh for BLEU)"),
    ("rubric", "Domain rubric", "Pass rate of each check over the answers it applies to"),
    ("length", "Answer length", "Answer characters / reference characters (1.0 = same length)"),
    ("loss", "Loss on reference answers", "Mean cross-entropy per answer token (lower is better)"),
    ("latency", "Latency per answer", "Seconds (lower is better)"),
    ("throughput", "Throughput", "Output tokens per second over the whole run"),
)
_GROUPS = (
    ("Answer quality", ("em", "char_f1", "char_precision", "char_recall", "rouge_l")),
    ("sacreBLEU (0-100)", ("bleu", "sentence_bleu", "chrf", "sentence_chrf")),
    ("Length", ("length_ratio",)),
    ("Loss on reference answers", ("loss", "perplexity")),
    (
        "Speed",
        ("latency_s", "latency_p50_s", "latency_p95_s", "tokens_per_s", "output_tokens"),
    ),
    ("Health", ("truncated", "error_rate")),
)

CSS = """
:root{--bg:#f5f6fa;--card:#fff;--ink:#1f2430;--muted:#667085;--line:#e4e7ec;--soft:#f8f9fc;
--accent:#3b5bdb;--good:#0b8a5e;--good-bg:#e6f7ef;--warn:#b25e00;--warn-bg:#fff4e0;
--bad:#c92a2a;--bad-bg:#fdecec;--best:#edf2ff}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.6 -apple-system,
BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,"PingFang SC","Hiragino Sans GB",
"Microsoft YaHei","Noto Sans CJK SC","Source Han Sans SC","WenQuanYi Micro Hei",sans-serif}
.wrap{max-width:1200px;margin:0 auto;padding:0 24px}
header.hero{background:linear-gradient(120deg,#19224a 0%,#2f4ac0 60%,#4c6ef5 100%);color:#fff;
padding:30px 0 26px}
.brand{font-size:12px;letter-spacing:.12em;text-transform:uppercase;opacity:.75}
h1{margin:4px 0 6px;font-size:28px;font-weight:650;letter-spacing:-.01em}
.hero .meta{margin:0;opacity:.85;font-size:13px}
.hero .meta span+span:before{content:"·";margin:0 8px;opacity:.6}
.banner{display:inline-flex;align-items:center;gap:8px;margin-top:14px;padding:6px 12px;
border-radius:999px;font-weight:600;font-size:13px}
.banner.pass{background:rgba(12,166,120,.22);border:1px solid rgba(150,242,215,.55)}
.banner.fail{background:rgba(224,49,49,.28);border:1px solid rgba(255,168,168,.6)}
.banner.none{background:rgba(255,255,255,.12);border:1px solid rgba(255,255,255,.3)}
nav.toc{position:sticky;top:0;z-index:5;background:rgba(255,255,255,.92);
backdrop-filter:blur(6px);border-bottom:1px solid var(--line)}
nav.toc .wrap{display:flex;gap:18px;overflow-x:auto;white-space:nowrap}
nav.toc a{color:var(--muted);text-decoration:none;font-size:13px;padding:10px 0;
border-bottom:2px solid transparent}
nav.toc a:hover{color:var(--ink);border-bottom-color:var(--accent)}
main{padding:22px 0 40px}
section{margin:0 0 26px}
h2{font-size:18px;margin:0 0 4px;font-weight:650}
.sub{color:var(--muted);margin:0 0 14px;font-size:13px}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;
box-shadow:0 1px 2px rgba(16,24,40,.04)}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(250px,1fr));gap:14px}
.kpi{padding:16px 18px;border-top:4px solid var(--c)}
.kpi .name{display:flex;align-items:center;gap:8px;font-weight:650;font-size:15px}
.kpi .src{color:var(--muted);font-size:12px;overflow:hidden;text-overflow:ellipsis;
white-space:nowrap}
.kpi .big{font-size:34px;font-weight:700;letter-spacing:-.02em;margin:6px 0 0;
font-variant-numeric:tabular-nums}
.kpi .big small{font-size:13px;font-weight:500;color:var(--muted);margin-left:6px;
letter-spacing:0}
.kpi dl{display:grid;grid-template-columns:1fr 1fr;gap:2px 14px;margin:10px 0 0;font-size:12.5px}
.kpi dt{color:var(--muted)}
.kpi dd{margin:0;text-align:right;font-variant-numeric:tabular-nums;font-weight:600}
.swatch{display:inline-block;width:10px;height:10px;border-radius:3px;background:var(--c);
flex:none}
.table-wrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:7px 14px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{position:sticky;top:0;background:var(--soft);font-weight:650;white-space:nowrap}
thead th .swatch{margin-right:6px}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.group th{background:var(--soft);color:var(--muted);font-size:11.5px;text-transform:uppercase;
letter-spacing:.06em;font-weight:650;padding-top:10px}
td.metric{white-space:nowrap}
td.metric .hint{display:block;color:var(--muted);font-size:11.5px}
td.best{background:var(--best);font-weight:700;color:#1c3fae}
td.best:after{content:"\\2605";margin-left:6px;font-size:10px;color:#4263eb}
td.na{color:#b0b7c3}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:14px}
figure.chart{margin:0;padding:14px 16px 8px}
figure.chart figcaption{font-weight:650;font-size:14px}
figure.chart figcaption small{display:block;font-weight:400;color:var(--muted);font-size:12px}
figure.chart svg{width:100%;height:auto;display:block;margin-top:4px}
.legend{display:flex;flex-wrap:wrap;gap:6px 14px;margin:8px 0 0;font-size:12px;color:var(--ink)}
.legend span{display:inline-flex;align-items:center;gap:6px}
.legend i{display:inline-block;width:14px;height:3px;border-radius:2px;background:var(--c)}
.legend i.dash{background:repeating-linear-gradient(90deg,var(--c) 0 5px,transparent 5px 8px)}
.legend i.faint{opacity:.35}
.legend i.box{width:10px;height:10px;border-radius:3px}
.gates{padding:6px 0}
.gates li{list-style:none;padding:6px 16px;display:flex;gap:10px;align-items:baseline}
.gates ul{margin:0;padding:0}
.ok{color:var(--good);font-weight:700}.ko{color:var(--bad);font-weight:700}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;
background:var(--soft);border:1px solid var(--line);border-radius:4px;padding:0 4px}
.sample{padding:0;margin:0 0 14px;overflow:hidden}
.sample>header{display:flex;flex-wrap:wrap;align-items:center;gap:8px;padding:10px 16px;
background:var(--soft);border-bottom:1px solid var(--line);font-size:12.5px}
.rank{font-weight:700;color:var(--muted)}
.tag{background:#eef2ff;color:#3b5bdb;border-radius:999px;padding:1px 8px;font-size:12px}
.pill{border-radius:999px;padding:1px 8px;font-size:12px;font-weight:600;
font-variant-numeric:tabular-nums;white-space:nowrap}
.pill.good{background:var(--good-bg);color:var(--good)}
.pill.mid{background:var(--warn-bg);color:var(--warn)}
.pill.poor{background:var(--bad-bg);color:var(--bad)}
.pill.flag{background:var(--bad-bg);color:var(--bad);font-weight:500}
.k .pill{text-transform:none;letter-spacing:0}
.qa{display:grid;grid-template-columns:1fr 1fr;gap:0}
.qa>.block{border-bottom:1px solid var(--line)}
.qa>.block.q{border-right:1px solid var(--line)}
.answers{grid-column:1/-1;display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr))}
.block{padding:10px 16px 12px}
.answers .block{border-left:3px solid var(--c);border-right:1px solid var(--line)}
.block .k{display:flex;flex-wrap:wrap;align-items:center;gap:6px;font-size:11.5px;
color:var(--muted);text-transform:uppercase;letter-spacing:.05em;font-weight:650;
margin-bottom:4px}
.block .k .lbl{color:var(--ink);text-transform:none;letter-spacing:0;font-size:13px}
.block .v{white-space:pre-wrap;word-break:break-word;overflow-wrap:anywhere;font-size:14.5px;
line-height:1.75}
.block.ref .v{color:#24502f}
.empty{color:var(--muted);font-style:italic}
details.turns{padding:8px 16px;border-bottom:1px solid var(--line);font-size:13px}
details.turns summary{cursor:pointer;color:var(--muted)}
details.defs{padding:12px 16px}
details.defs summary{cursor:pointer;font-weight:650}
dl.defs{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;font-size:13px}
dl.defs dt{font-weight:650}
dl.defs dd{margin:0;color:#344054}
footer{color:var(--muted);font-size:12px;padding:0 0 30px}
@media (max-width:720px){.qa{grid-template-columns:1fr}.qa>.block.q{border-right:0}
.charts{grid-template-columns:1fr}h1{font-size:22px}}
@media print{nav.toc{display:none}header.hero{background:#19224a;-webkit-print-color-adjust:exact;
print-color-adjust:exact}.card{break-inside:avoid}}
"""

DEFINITIONS = (
    (
        "Exact match",
        "1 if the answer equals the reference after NFKC, lowercasing and removing "
        "punctuation (CJK and ASCII) and whitespace; a decimal point inside a number is kept.",
    ),
    (
        "Char F1",
        "CMRC-2018 tokens (each CJK character, each ASCII word or number; punctuation "
        "dropped); precision, recall and F1 of their multiset overlap with the reference.",
    ),
    ("ROUGE-L (char)", "F1 of the longest common subsequence of the normalised characters."),
    (
        "BLEU-4",
        "sacrebleu, tokenize=zh; corpus score pools n-grams over the set, sentence mean "
        "averages smoothed per-answer scores (0-100).",
    ),
    ("chrF", "sacrebleu chrF (character 6-grams, beta=2), corpus and sentence mean (0-100)."),
    ("Length ratio", "answer characters / reference characters, whitespace excluded."),
    (
        "Answer loss",
        "local models: mean cross-entropy over the reference answer's tokens "
        "(token-weighted over the set, chat template as in training); perplexity = exp(loss).",
    ),
    (
        "Latency",
        "local: wall time of the batch that produced the answer; endpoint: request time. "
        "Tokens/s = output tokens / generation wall time of the run.",
    ),
    ("Rubric", "pass rate of each domain check over the answers it applies to."),
)


def e(value: Any) -> str:
    return escape("" if value is None else str(value))


def _fmt(info: MetricInfo, value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return info.fmt.format(value)


def _best(values: Sequence[float | None], better: str) -> set[int]:
    idx = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if len(values) < 2 or len(idx) < 1 or better == "none":
        return set()
    key = {
        "higher": lambda i: -values[i],
        "lower": lambda i: values[i],
        "one": lambda i: abs(values[i] - 1.0),
    }[better]
    best = min(key(i) for i in idx)
    winners = {i for i in idx if abs(key(i) - best) <= 1e-12}
    return set() if len(winners) == len(values) else winners


def _score_class(v: float | None) -> str:
    if v is None:
        return "poor"
    return "good" if v >= 0.6 else "mid" if v >= 0.3 else "poor"


def _source(m: dict[str, Any]) -> str:
    if m.get("kind") == "endpoint":
        return f"{m.get('base_url')} · {m.get('endpoint_model')}"
    text = str(m.get("path") or m.get("spec") or "")
    return f"job {m['job_id']} · {text}" if m.get("job_id") else text


def _short_source(m: dict[str, Any]) -> str:
    if m.get("kind") == "endpoint":
        return str(m.get("endpoint_model") or m.get("base_url"))
    if m.get("job_id"):
        return f"job {m['job_id']}"
    parts = str(m.get("path") or m.get("spec") or "").rstrip("/").split("/")
    return "/".join(parts[-2:])


def _rubric_names(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rubric = summary.get("rubric") or {}
    return [(c["name"], c.get("label") or c["name"]) for c in rubric.get("checks", [])]


def _colour_style(i: int) -> str:
    return f' style="--c:{color(i)}"'


# --- sections ------------------------------------------------------------------------------


def _hero(summary: dict[str, Any]) -> str:
    gates = summary.get("gates") or []
    failed = [g for g in gates if not g["passed"]]
    if not gates:
        banner = '<div class="banner none">No gates set</div>'
    elif failed:
        banner = (
            f'<div class="banner fail">&#10007; {len(failed)} of {len(gates)} gate'
            f"{'s' if len(gates) != 1 else ''} failed</div>"
        )
    else:
        banner = f'<div class="banner pass">&#10003; all {len(gates)} gates passed</div>'
    rubric = summary.get("rubric") or {}
    meta = [
        f"{summary['n']} test questions",
        f"{len(summary['models'])} model{'s' if len(summary['models']) != 1 else ''}",
        e(summary.get("data")),
    ]
    if rubric:
        meta.append(f"rubric {e(rubric.get('name'))}")
    meta.append(e(summary.get("created")))
    return (
        '<header class="hero"><div class="wrap"><div class="brand">tunedesk · eval</div>'
        "<h1>Evaluation report</h1>"
        f'<p class="meta">{"".join(f"<span>{m}</span>" for m in meta)}</p>{banner}'
        "</div></header>"
    )


def _nav(has_curves: bool, has_gates: bool) -> str:
    links = [("overview", "Overview"), ("models", "Models"), ("charts", "Charts")]
    if has_curves:
        links.append(("loss-curves", "Training curves"))
    if has_gates:
        links.append(("gates", "Gates"))
    links += [("worst-samples", "Worst samples"), ("definitions", "Definitions")]
    items = "".join(f'<a href="#{i}">{t}</a>' for i, t in links)
    return f'<nav class="toc"><div class="wrap">{items}</div></nav>'


def _kpis(summary: dict[str, Any]) -> str:
    cards = []
    for i, m in enumerate(summary["models"]):
        mt = m["metrics"]
        rates = [r["rate"] for r in (m.get("rubric") or {}).values() if r.get("rate") is not None]
        rubric = sum(rates) / len(rates) if rates else None
        rows = [
            ("Exact match", _fmt(_INFO["em"], mt.get("em"))),
            ("ROUGE-L", _fmt(_INFO["rouge_l"], mt.get("rouge_l"))),
            ("BLEU-4", _fmt(_INFO["bleu"], mt.get("bleu"))),
            ("chrF", _fmt(_INFO["chrf"], mt.get("chrf"))),
            ("Rubric (mean)", "–" if rubric is None else f"{rubric:.0%}"),
            ("Latency", "–" if mt.get("latency_s") is None else f"{mt['latency_s']:.2f}s"),
        ]
        if mt.get("loss") is not None:
            rows.append(("Answer loss", _fmt(_INFO["loss"], mt.get("loss"))))
            rows.append(("Perplexity", _fmt(_INFO["perplexity"], mt.get("perplexity"))))
        dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
        cards.append(
            f'<div class="card kpi"{_colour_style(i)}><div class="name"><span class="swatch">'
            f"</span>{e(m['label'])}</div>"
            f'<div class="src" title="{e(_source(m))}">{e(_source(m))}</div>'
            f'<div class="big">{_fmt(_INFO["char_f1"], mt.get("char_f1"))}<small>char F1</small>'
            f"</div><dl>{dl}</dl></div>"
        )
    return (
        '<section id="overview"><h2>Overview</h2><p class="sub">Headline scores per model; '
        f'details below.</p><div class="kpis">{"".join(cards)}</div></section>'
    )


def _models_table(summary: dict[str, Any]) -> str:
    models = summary["models"]
    head = "".join(
        f'<th class="num"><span class="swatch"{_colour_style(i)}></span>{e(m["label"])}</th>'
        for i, m in enumerate(models)
    )
    ncol = len(models) + 1
    body = [
        f'<tr class="group"><th colspan="{ncol}">Model</th></tr>',
        '<tr><td class="metric">Source</td>'
        + "".join(
            f'<td class="num" title="{e(_source(m))}">{e(_short_source(m))}</td>' for m in models
        )
        + "</tr>",
        '<tr><td class="metric">Samples</td>'
        + "".join(f'<td class="num">{m["n"]}</td>' for m in models)
        + "</tr>",
    ]

    def row(label: str, hint: str, values: list[float | None], texts: list[str], better: str):
        best = _best(values, better)
        cells = "".join(
            f'<td class="num{" best" if j in best else ""}{" na" if values[j] is None else ""}">'
            f"{t}</td>"
            for j, t in enumerate(texts)
        )
        hint_html = f'<span class="hint">{e(hint)}</span>' if hint else ""
        return f'<tr><td class="metric">{e(label)}{hint_html}</td>{cells}</tr>'

    for title, keys in _GROUPS:
        rows = []
        for key in keys:
            info = _INFO[key]
            values = [m["metrics"].get(key) for m in models]
            if all(v is None for v in values):
                continue
            rows.append(
                row(info.label, info.help, values, [_fmt(info, v) for v in values], info.better)
            )
        if rows:
            body.append(f'<tr class="group"><th colspan="{ncol}">{e(title)}</th></tr>')
            body.extend(rows)
    checks = _rubric_names(summary)
    if checks:
        body.append(f'<tr class="group"><th colspan="{ncol}">Domain rubric (pass rate)</th></tr>')
        for name, label in checks:
            items = [(m.get("rubric") or {}).get(name) or {} for m in models]
            values = [it.get("rate") for it in items]
            texts = [
                "–"
                if it.get("rate") is None
                else f"{it['rate']:.1%} <small>({it['passed']}/{it['applicable']})</small>"
                for it in items
            ]
            body.append(row(label, name, values, texts, "higher"))
    return (
        '<section id="models"><h2>Models side by side</h2><p class="sub">The best value of each '
        "metric is highlighted (closest to 1.0 for the length ratio).</p>"
        '<div class="card table-wrap"><table id="models-table"><thead><tr><th>Metric</th>'
        f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></section>"
    )


def _legend(models: list[dict[str, Any]], box: bool = True) -> str:
    cls = ' class="box"' if box else ""
    return (
        '<div class="legend">'
        + "".join(
            f"<span{_colour_style(i)}><i{cls}></i>{e(m['label'])}</span>"
            for i, m in enumerate(models)
        )
        + "</div>"
    )


def _figure(fid: str, title: str, subtitle: str, svg: str, legend: str) -> str:
    return (
        f'<figure class="chart card" id="chart-{fid}"><figcaption>{e(title)}'
        f"<small>{e(subtitle)}</small></figcaption>{legend}{svg}</figure>"
    )


def _charts(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    models = summary["models"]
    legend = _legend(models)
    figs = []
    subtitles = {k: (t, s) for k, t, s in _FAMILIES}

    def metric_chart(fid: str, keys: Sequence[str], **kw: Any) -> None:
        keys = [k for k in keys if any(m["metrics"].get(k) is not None for m in models)]
        if not keys:
            return
        series = [
            Series(m["label"], color(i), [m["metrics"].get(k) for k in keys])
            for i, m in enumerate(models)
        ]
        title, sub = subtitles[fid]
        svg = bar_chart([_INFO[k].label for k in keys], series, aria=title, **kw)
        figs.append(_figure(fid, title, sub, svg, legend))

    metric_chart("overlap", ["em", "char_f1", "rouge_l"], y_max=1.0)
    metric_chart("sacrebleu", ["bleu", "chrf"], fmt=lambda v: f"{v:.1f}")
    checks = _rubric_names(summary)
    if checks:
        series = [
            Series(
                m["label"],
                color(i),
                [((m.get("rubric") or {}).get(n) or {}).get("rate") for n, _ in checks],
            )
            for i, m in enumerate(models)
        ]
        title, sub = subtitles["rubric"]
        svg = bar_chart(
            [label for _, label in checks],
            series,
            y_max=1.0,
            fmt=lambda v: f"{v:.0%}",
            aria=title,
        )
        figs.append(_figure("rubric", title, sub, svg, legend))
    metric_chart("length", ["length_ratio"], ref_line=(1.0, "reference length"))
    metric_chart("loss", ["loss"], fmt=lambda v: f"{v:.3f}")
    metric_chart("latency", ["latency_s", "latency_p95_s"], fmt=lambda v: f"{v:.2f}")
    metric_chart("throughput", ["tokens_per_s"], fmt=lambda v: f"{v:.0f}")

    topics = sorted({t for m in models for t in (m.get("by_topic") or {})})
    if len(topics) > 1:
        series = [
            Series(
                m["label"],
                color(i),
                [((m.get("by_topic") or {}).get(t) or {}).get("char_f1") for t in topics],
            )
            for i, m in enumerate(models)
        ]
        counts = [
            max(((m.get("by_topic") or {}).get(t) or {}).get("n", 0) for m in models)
            for t in topics
        ]
        labels = [f"{t} ({c})" for t, c in zip(topics, counts, strict=True)]
        svg = bar_chart(labels, series, y_max=1.0, aria="char F1 by topic")
        figs.append(
            _figure("topics", "Char F1 by topic", "meta.topic of each test record (n)", svg, legend)
        )

    names = ["0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1"]
    series = []
    for i, m in enumerate(models):
        f1s = [r["scores"][m["label"]]["char_f1"] for r in rows]
        counts = [0] * 5
        for v in f1s:
            counts[min(4, int(v / 0.2 + 1e-9))] += 1
        series.append(Series(m["label"], color(i), [c / len(f1s) if f1s else None for c in counts]))
    svg = bar_chart(names, series, y_max=0.5, fmt=lambda v: f"{v:.0%}", aria="char F1 histogram")
    figs.append(
        _figure(
            "distribution",
            "Char F1 distribution",
            "Share of answers in each char-F1 band",
            svg,
            legend,
        )
    )
    return (
        '<section id="charts"><h2>Charts</h2><p class="sub">One chart per metric family; hover a '
        f'bar for its exact value.</p><div class="charts">{"".join(figs)}</div></section>'
    )


def _loss_curves(summary: dict[str, Any], curves: dict[str, dict[str, Any]]) -> str:
    if not curves:
        return ""
    index = {m["label"]: i for i, m in enumerate(summary["models"])}
    figs = []
    for label, job in curves.items():
        c = color(index.get(label, 0))
        series = job.get("series", {})
        for key, title, y_label in (
            ("loss", "Loss", "loss (answer tokens)"),
            ("token_accuracy", "Token accuracy", "token accuracy"),
        ):
            by_split = series.get(key) or {}
            train, val = by_split.get("train") or [], by_split.get("val") or []
            if not train and not val:
                continue
            lines, legend = [], []
            if train:
                if len(train) > 20:
                    alpha = min(1.0, 2 / (len(train) / 10 + 1))
                    lines.append(Line("train (raw)", c, train, faint=True))
                    lines.append(Line("train (smoothed)", c, ema(train, alpha)))
                    legend += [("train (raw)", "faint"), ("train (smoothed)", "")]
                else:
                    lines.append(Line("train", c, train, markers=True))
                    legend.append(("train", ""))
            if val:
                lines.append(Line("validation", "#1f2430", val, dashed=True, markers=True))
                legend.append(("validation", "dash"))
            svg = line_chart(lines, y_label=y_label, aria=f"{label} {title}")
            leg = (
                '<div class="legend">'
                + "".join(
                    f'<span style="--c:{"#1f2430" if cls == "dash" else c}">'
                    f'<i class="{cls}"></i>{e(n)}</span>'
                    for n, cls in legend
                )
                + "</div>"
            )
            last_val = f"; last validation {val[-1][1]:.4f} at step {val[-1][0]}" if val else ""
            sub = f"job {job.get('job_id')}" + (
                f" · base {job['base_model']}" if job.get("base_model") else ""
            )
            figs.append(
                _figure(
                    f"{key}-{_slug(label)}",
                    f"{label}: {title}",
                    sub + (last_val if key == "loss" else ""),
                    svg,
                    leg,
                )
            )
    if not figs:
        return ""
    return (
        '<section id="loss-curves"><h2>Training curves</h2><p class="sub">From each job\'s '
        "runs/&lt;job-id&gt;/metrics.jsonl: training loss per logged step and validation loss "
        f'per evaluation.</p><div class="charts">{"".join(figs)}</div></section>'
    )


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text)


def _gates(summary: dict[str, Any]) -> str:
    gates = summary.get("gates") or []
    if not gates:
        return ""
    items = "".join(
        f'<li><span class="{"ok" if g["passed"] else "ko"}">'
        f"{'&#10003; pass' if g['passed'] else '&#10007; fail'}</span>"
        f"<span>{e(g['message'])}</span></li>"
        for g in gates
    )
    return (
        '<section id="gates"><h2>Gates</h2><p class="sub">Thresholds from <code>--fail-under'
        "</code> / <code>--fail-over</code>; any failure makes the command exit with code 3."
        f'</p><div class="card gates"><ul>{items}</ul></div></section>'
    )


def _text_block(text: str) -> str:
    return (
        f'<div class="v">{e(text)}</div>' if text.strip() else '<div class="v empty">(empty)</div>'
    )


def _worst(summary: dict[str, Any], rows: list[dict[str, Any]], worst: int) -> str:
    models = summary["models"]
    last = models[-1]["label"]
    labels = {
        c["name"]: c.get("label") or c["name"]
        for c in (summary.get("rubric") or {}).get("checks", [])
    }
    ranked = sorted(rows, key=lambda r: (r["scores"][last]["char_f1"], r["index"]))[: max(0, worst)]
    cards = []
    for rank, r in enumerate(ranked, 1):
        meta = r.get("meta") or {}
        f1 = r["scores"][last]["char_f1"]
        head = [f'<span class="rank">#{rank}</span>', f"<span>test record {r['index'] + 1}</span>"]
        if meta.get("topic"):
            head.append(f'<span class="tag">{e(meta["topic"])}</span>')
        head.append(f'<span class="pill {_score_class(f1)}">{e(last)} char F1 {f1:.2f}</span>')
        earlier = r.get("prompt") or []
        turns = ""
        if len(earlier) > 1:
            inner = "".join(
                f"<div><b>{e(m.get('role'))}</b>: {e(m.get('content'))}</div>" for m in earlier[:-1]
            )
            turns = (
                f'<details class="turns" lang="zh-CN"><summary>Earlier turns ({len(earlier) - 1})'
                f"</summary>{inner}</details>"
            )
        answers = []
        for i, m in enumerate(models):
            sc = r["scores"][m["label"]]
            pills = [
                f'<span class="pill {_score_class(sc["char_f1"])}">F1 {sc["char_f1"]:.2f}</span>',
                f'<span class="pill {_score_class(sc["rouge_l"])}">ROUGE-L {sc["rouge_l"]:.2f}'
                "</span>",
            ]
            if sc.get("em"):
                pills.append('<span class="pill good">exact</span>')
            for name, ok in (sc.get("rubric") or {}).items():
                if ok is False:
                    pills.append(
                        f'<span class="pill flag">&#10007; {e(labels.get(name, name))}</span>'
                    )
            if sc.get("finish_reason") == "length":
                pills.append('<span class="pill mid">hit max tokens</span>')
            body = _text_block(r["answers"][m["label"]])
            if sc.get("error"):
                body = f'<div class="v empty">request failed: {e(sc["error"])}</div>'
            answers.append(
                f'<div class="block ans"{_colour_style(i)}><div class="k"><span class="swatch">'
                f'</span><span class="lbl">{e(m["label"])}</span>{"".join(pills)}</div>{body}</div>'
            )
        cards.append(
            f'<article class="card sample"><header>{"".join(head)}</header>{turns}'
            f'<div class="qa" lang="zh-CN"><div class="block q"><div class="k">Question</div>'
            f'{_text_block(r["question"])}</div><div class="block ref"><div class="k">Reference'
            f'</div>{_text_block(r["reference"])}</div><div class="answers">{"".join(answers)}'
            "</div></div></article>"
        )
    return (
        '<section id="worst-samples"><h2>Worst samples</h2><p class="sub">Lowest char F1 of '
        f"<b>{e(last)}</b> first ({len(ranked)} of {len(rows)}); every answer is in samples.jsonl."
        f"</p>{''.join(cards)}</section>"
    )


def _definitions(summary: dict[str, Any]) -> str:
    items = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in DEFINITIONS)
    rubric = summary.get("rubric") or {}
    extra = ""
    if rubric:
        extra = (
            f"<p>Rubric <b>{e(rubric.get('name'))}</b> ({e(rubric.get('source'))}): "
            f"{e(rubric.get('description'))}</p>"
        )
    s = summary.get("settings") or {}
    settings = (
        f"<p>Greedy decoding (temperature 0), at most {e(s.get('max_tokens'))} new tokens; "
        f"local batch size {e(s.get('batch_size'))}, endpoint concurrency "
        f"{e(s.get('concurrency'))}.</p>"
    )
    return (
        '<section id="definitions"><details class="card defs"><summary>Metric definitions'
        f'</summary><dl class="defs">{items}</dl>{extra}{settings}</details></section>'
    )


def render_report(
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    curves: dict[str, dict[str, Any]] | None = None,
    worst: int = 20,
) -> str:
    curves = curves or {}
    loss_section = _loss_curves(summary, curves)
    names = ", ".join(m["label"] for m in summary["models"])
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="color-scheme" content="light">'
        # An empty inline icon: served over HTTP the page would otherwise request /favicon.ico.
        '<link rel="icon" href="data:,">'
        f"<title>Eval report · {e(names)}</title><style>{CSS}</style></head><body>"
        + _hero(summary)
        + _nav(bool(loss_section), bool(summary.get("gates")))
        + '<main class="wrap">'
        + _kpis(summary)
        + _models_table(summary)
        + _charts(summary, rows)
        + loss_section
        + _gates(summary)
        + _worst(summary, rows, worst)
        + _definitions(summary)
        + '</main><footer class="wrap">Generated by tunedesk eval · summary.json and '
        "samples.jsonl beside this file hold every number.</footer></body></html>\n"
    )
