"""`tunedesk ui` (the Gradio chat app) and `tunedesk feedback export`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tunedesk import paths


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="Gradio chat app against an OpenAI-compatible endpoint")
    p.add_argument(
        "--endpoint",
        default="http://127.0.0.1:8000/v1",
        help="base URL of the API (default http://127.0.0.1:8000/v1)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("TUNEDESK_API_KEY"),
        help="Bearer key for the API (default: $TUNEDESK_API_KEY)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--examples",
        type=Path,
        default=None,
        help="JSONL whose questions are offered as examples "
        "(default: data/prepared/test.jsonl if present)",
    )
    p.add_argument(
        "--feedback-db",
        type=Path,
        default=None,
        help="SQLite file for feedback (default: data/feedback.sqlite)",
    )
    p.add_argument("--title", default="tunedesk")
    p.set_defaults(handler=_ui)

    f = sub.add_parser("feedback", help="feedback collected in the chat app")
    fsub = f.add_subparsers(dest="feedback_command", metavar="ACTION", required=True)
    e = fsub.add_parser("export", help="write feedback as training JSONL (chat messages)")
    e.add_argument("--db", type=Path, default=None, help="default: data/feedback.sqlite")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument(
        "--corrections-only",
        action="store_true",
        help="only edited better answers, not thumbs-up answers",
    )
    e.set_defaults(handler=_export)


def _default_db() -> Path:
    return paths.data_dir() / "feedback.sqlite"


def _ui(args: argparse.Namespace) -> int:
    from tunedesk.ui.app import build_app, launch, load_examples

    examples_path = args.examples or paths.data_dir() / "prepared" / "test.jsonl"
    app = build_app(
        args.endpoint,
        args.api_key,
        args.feedback_db or _default_db(),
        load_examples(examples_path),
        title=args.title,
    )
    print(f"chat app on http://{args.host}:{args.port} (API: {args.endpoint})")
    launch(app, args.host, args.port)
    return 0


def _export(args: argparse.Namespace) -> int:
    from tunedesk.errors import CommandError
    from tunedesk.ui.feedback import FeedbackStore, export

    db = args.db or _default_db()
    if not db.exists():
        raise CommandError(f"no feedback store at {db} (pass --db)")
    n = export(FeedbackStore(db), args.out, include_liked=not args.corrections_only)
    print(f"wrote {n} training example(s) to {args.out}")
    return 0
