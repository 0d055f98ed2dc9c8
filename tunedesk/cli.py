"""The `tunedesk` command. Each package contributes its subcommands through a small
`commands` module (argparse only at import time: heavy imports happen inside the handlers, so
`tunedesk --help` stays instant)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tunedesk import __version__
from tunedesk.errors import CommandError

__all__ = ["CommandError", "build_parser", "main"]

# Order is the order shown in --help.
COMMAND_MODULES = (
    "tunedesk.train.commands",
    "tunedesk.train.commands_train",
    "tunedesk.train.commands_merge",
    "tunedesk.serve.commands",
    "tunedesk.eval.commands",
    "tunedesk.ui.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunedesk",
        description="Prepare data, QLoRA-train, merge, serve, chat with and evaluate a domain "
        "Q&A assistant on an open model.",
    )
    parser.add_argument("--version", action="version", version=f"tunedesk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not an unbuilt command module
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "accepts_overrides", False):
        args.overrides = extra
    try:
        return int(args.handler(args) or 0)
    except CommandError as exc:
        print(f"tunedesk {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
