"""`tunedesk merge`: fold a trained adapter into its base model. Argument parsing only; the
work (torch, transformers, peft) is imported inside the handler."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunedesk import paths
from tunedesk.cli import CommandError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a trained LoRA/QLoRA adapter into its base model and check parity",
        description="Loads the base in 16/32 bits, applies the adapter, merges it, writes a "
        "standalone model folder (safetensors, tokenizer, chat template, generation config) "
        "and checks on held-out prompts that the merged model reproduces base + adapter: max "
        "logit difference within tolerance and identical greedy generations. The output "
        "folder is replaced only if that check passes.",
    )
    p.add_argument(
        "source",
        metavar="JOB_or_ADAPTER",
        help="a job id (under runs/), a job folder, or an adapter folder",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="merged model folder (default for a job: models/<job-id>-merged)",
    )
    p.add_argument(
        "--base",
        default=None,
        help="base model (hub id or path); default: the one the adapter was trained on",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights to merge and save in; auto: bfloat16 on a bf16 GPU, else float32",
    )
    p.add_argument("--no-parity", action="store_true", help="skip the parity check")
    p.add_argument(
        "--atol",
        type=float,
        default=None,
        help="absolute logit tolerance of the parity check (default: scaled to the dtype)",
    )
    p.set_defaults(handler=_merge)


def _merge(args: argparse.Namespace) -> int:
    from tunedesk.train.merge import (
        MergeError,
        MergeParityError,
        format_parity,
        merge_adapter,
        resolve_source,
    )

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        out = args.out
        if out is None:
            source = resolve_source(args.source)
            if source.job_id is None:
                raise CommandError(
                    f"{args.source} is an adapter folder outside a job; pass --out DIR"
                )
            out = paths.models_dir() / f"{source.job_id}-merged"
        report = merge_adapter(
            args.source,
            out,
            base=args.base,
            dtype=args.dtype,
            atol=args.atol,
            parity=not args.no_parity,
            log=log,
        )
    except MergeParityError as exc:
        # Exit 1, not 2: the inputs were fine, the merged result is what failed.
        raise CommandError(f"{exc}; {out} was left unchanged", code=1) from None
    except MergeError as exc:
        raise CommandError(str(exc)) from None
    if report["parity"] is None:
        print("parity check skipped (--no-parity)")
    else:
        print(format_parity(report["parity"]))
    print(f"merged model written to {out}")
    return 0
