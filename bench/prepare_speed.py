"""Benchmark: `tunedesk prepare` end to end (read JSONL -> clean -> dedup -> split -> write).

Prepares N synthetic prompt/completion pairs, 10% of them planted near-duplicates, and prints
rows/s; then 10 x N in the same process and the time ratio, which stays near 10 when no
step is quadratic (the target is under 15).

    python bench/prepare_speed.py                 # 100k and 1M rows, estimated token counts
    python bench/prepare_speed.py --base models/tiny-base   # real tokenizer counts
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from tunedesk.train.prepare.pipeline import PrepareOptions, prepare

SUBJECTS = [
    "启明新能源混合A",
    "澄川稳健债券C",
    "远帆沪深300指数",
    "北辰全球科技QDII",
    "汇川养老FOF",
    "货币基金",
    "债券基金",
    "指数基金",
    "股票型基金",
    "医药主题基金",
    "消费行业基金",
]
ASKS = [
    "的申购费是多少",
    "怎么赎回",
    "赎回多久到账",
    "风险等级是什么",
    "适合定投吗",
    "分红方式怎么改",
    "管理费怎么收",
    "和同类比表现如何",
    "最低买多少",
    "可以随时卖吗",
]
OPENERS = ["", "你好，", "请问", "想问下", "麻烦问一下，", "您好，我想了解"]
FACTS = [
    "申购费率为{a}%",
    "赎回T+{b}日到账",
    "风险等级为R{c}",
    "管理费每年{a}%",
    "托管费每年0.{b}%",
    "最低申购{d}元",
    "持有7天以上免赎回费",
    "支持现金分红和红利再投资",
    "每月{b}日扣款",
]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    base_n = n - n // 10
    rows = []
    for i in range(base_n):
        q = f"{rng.choice(OPENERS)}{rng.choice(SUBJECTS)}{rng.choice(ASKS)}（编号{i}）？"
        facts = rng.sample(FACTS, 3)
        a = "，".join(
            f.format(
                a=rng.randint(1, 20) / 10,
                b=rng.randint(1, 9),
                c=rng.randint(1, 5),
                d=rng.choice([10, 100, 1000]),
            )
            for f in facts
        )
        rows.append({"prompt": q, "completion": f"您好，{a}。案例{i}的详细说明请参考基金合同。"})
    originals = rows[:base_n]
    for _ in range(n - base_n):
        src = dict(rng.choice(originals))
        # A near-duplicate: punctuation swapped and a polite word added.
        src["prompt"] = src["prompt"].replace("？", "?") + "谢谢"
        rows.append(src)
    rng.shuffle(rows)
    return rows


def run(n: int, tokenizer, name: str | None) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for row in synthetic_pairs(n):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        started = time.perf_counter()
        result = prepare(
            [path], Path(tmp) / "out", PrepareOptions(), tokenizer=tokenizer, tokenizer_name=name
        )
        return time.perf_counter() - started, result.report["counts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--scale", type=int, default=10, help="the large run is rows x scale")
    parser.add_argument("--base", default=None, help="model whose tokenizer counts tokens")
    args = parser.parse_args()
    tokenizer = None
    if args.base:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.base)
    mode = f"tokenizer of {args.base}" if args.base else "estimated token counts"
    small_s, counts = run(args.rows, tokenizer, args.base)
    print(
        f"{args.rows:>9,} rows: {small_s:7.2f} s  {args.rows / small_s:>9,.0f} rows/s  ({mode}; "
        f"kept {counts['kept']:,}, near-dup clusters {counts['near_duplicate_clusters']:,})"
    )
    if args.scale > 1:
        big = args.rows * args.scale
        big_s, counts = run(big, tokenizer, args.base)
        print(
            f"{big:>9,} rows: {big_s:7.2f} s  {big / big_s:>9,.0f} rows/s  "
            f"(kept {counts['kept']:,})"
        )
        print(f"time ratio {args.scale}x rows: {big_s / small_s:.2f}x (target < 15x)")


if __name__ == "__main__":
    main()
