"""Subcommands owned by the training side: `data`, `base`, `prepare` (and, later, `train`,
`jobs`, `merge`). Argument parsing only; the work is imported inside each handler."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunedesk import paths
from tunedesk.errors import CommandError


def register(sub: argparse._SubParsersAction) -> None:
    _register_data(sub)
    _register_base(sub)
    _register_prepare(sub)


# --- tunedesk data sample -------------------------------------------------------------------


def _register_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="sample domain data (Chinese fund-investment Q&A)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = dsub.add_parser("sample", help="write the sample fund Q&A as prompt/completion JSONL")
    s.add_argument("--out", type=Path, default=None, help="default: data/fund_qa.jsonl")
    s.add_argument("-n", type=int, default=3200, help="number of pairs (default 3200)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(handler=_data_sample)


def _data_sample(args: argparse.Namespace) -> int:
    from tunedesk.train.sample_data import write_sample

    out = args.out or paths.data_dir() / "fund_qa.jsonl"
    n = write_sample(out, n=args.n, seed=args.seed)
    print(f"wrote {n} fund Q&A pairs to {out}")
    return 0


# --- tunedesk base build ----------------------------------------------------------------------


def _register_base(sub: argparse._SubParsersAction) -> None:
    from tunedesk.train.tiny_base import TinyBaseConfig

    p = sub.add_parser("base", help="the embedded tiny base model (built offline)")
    bsub = p.add_subparsers(dest="base_command", metavar="ACTION", required=True)
    b = bsub.add_parser(
        "build",
        help="train a tokenizer on local text and create a tiny Qwen2-architecture model",
        description="Builds the embedded default base model from local text only.",
    )
    b.add_argument("--out", type=Path, default=None, help="default: models/tiny-base")
    defaults = TinyBaseConfig()
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "seed",
        "pretrain_steps",
        "pretrain_seq_len",
        "pretrain_batch_size",
    ):
        b.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    b.add_argument("--pretrain-lr", type=float, default=defaults.pretrain_lr)
    b.set_defaults(handler=_base_build)


def _base_build(args: argparse.Namespace) -> int:
    from tunedesk.train.sample_data import domain_corpus, generate_pairs
    from tunedesk.train.tiny_base import TinyBaseConfig, build_tiny_base

    cfg = TinyBaseConfig(
        **{k: getattr(args, k) for k in TinyBaseConfig.__dataclass_fields__ if hasattr(args, k)}
    )
    corpus = domain_corpus(seed=cfg.seed + 1)
    pairs = generate_pairs(seed=cfg.seed)
    # The tokenizer sees the domain's questions and answers; pre-training sees only the
    # corpus, so the base knows the language but has never seen the Q&A task.
    tokenizer_texts = corpus + [p["prompt"] for p in pairs] + [p["completion"] for p in pairs]
    out = args.out or paths.tiny_base_dir()
    build_tiny_base(out, tokenizer_texts, cfg, pretrain_texts=corpus)
    return 0


# --- tunedesk prepare ----------------------------------------------------------------------


def _register_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="validate, clean, de-duplicate and split fine-tuning data",
        description="Accepts prompt/completion JSONL, OpenAI chat messages, alpaca, sharegpt, "
        "CSV/TSV and LLaMA-Factory dataset_info.json; writes train/val/test.jsonl in chat "
        "`messages` form plus report.json.",
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--base",
        default=None,
        help="model (hub id or path) whose tokenizer measures lengths; default: the tiny base "
        "if built, else an estimate",
    )
    p.add_argument(
        "--format", default=None, choices=["prompt_completion", "chat", "alpaca", "sharegpt", "csv"]
    )
    p.add_argument("--question-col", default=None)
    p.add_argument("--answer-col", default=None)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--long-answer-tokens", type=int, default=1024)
    p.add_argument("--near-dup", choices=["group", "remove", "off"], default="group")
    p.add_argument("--near-dup-threshold", type=float, default=0.8)
    p.add_argument("--mask-pii", action="store_true")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test ratios")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-field", default="group")
    p.add_argument("--strict", action="store_true", help="exit 1 if any record has an error")
    p.add_argument(
        "--show", type=int, default=20, help="problems to print (all are in report.json)"
    )
    p.set_defaults(handler=_prepare)


def load_tokenizer(base: str | None):
    """The tokenizer of `base`, or of the tiny base when it exists; (None, None) otherwise."""
    if base is None:
        if not (paths.tiny_base_dir() / "tokenizer.json").exists():
            return None, None
        base = str(paths.tiny_base_dir())
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base), base
    except Exception as exc:
        raise CommandError(f"--base {base}: can't load its tokenizer: {exc}") from None


def _prepare(args: argparse.Namespace) -> int:
    from tunedesk.train.prepare.pipeline import FormatError, PrepareOptions, prepare
    from tunedesk.train.prepare.report import print_report

    try:
        ratios = tuple(float(x) for x in args.split.split(","))
        if len(ratios) != 3:
            raise ValueError
    except ValueError:
        raise CommandError(
            f"--split {args.split!r}: expected three numbers like 0.8,0.1,0.1"
        ) from None
    opts = PrepareOptions(
        format=args.format,
        question_col=args.question_col,
        answer_col=args.answer_col,
        max_tokens=args.max_tokens,
        long_answer_tokens=args.long_answer_tokens,
        near_dup_threshold=args.near_dup_threshold,
        near_dup=args.near_dup,
        mask_pii=args.mask_pii,
        ratios=ratios,  # type: ignore[arg-type]
        seed=args.seed,
        group_field=args.group_field,
        strict=args.strict,
    )
    tokenizer, name = load_tokenizer(args.base)
    try:
        result = prepare(
            args.inputs,
            args.out,
            opts,
            tokenizer=tokenizer,
            tokenizer_name=name,
            log=lambda m: print(m, file=sys.stderr),
        )
    except FormatError as exc:
        raise CommandError(str(exc)) from None
    print_report(result.report, show=args.show, out_dir=args.out)
    if result.usable == 0:
        print("nothing usable remains: no output worth training on", file=sys.stderr)
        return 1
    if opts.strict and result.report["counts"]["errors"]:
        return 1
    return 0
