"""Chat feedback in a local SQLite file: thumbs up/down and edited better answers.

This is the loop from users back into data: `tunedesk feedback export` turns the rows into
training JSONL (chat `messages`) that `tunedesk prepare` accepts.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedesk.io import atomic_write_jsonl

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    model TEXT NOT NULL,
    messages TEXT NOT NULL,        -- JSON: the conversation up to (not including) the answer
    answer TEXT NOT NULL,          -- what the model said
    rating INTEGER NOT NULL,       -- 1 thumbs up, -1 thumbs down, 0 correction only
    better_answer TEXT             -- a person's edited answer, if any
)
"""


@dataclass
class FeedbackRow:
    id: int
    created_at: float
    model: str
    messages: list[dict[str, Any]]
    answer: str
    rating: int
    better_answer: str | None


class FeedbackStore:
    """A small SQLite store; every write is one transaction (WAL, so readers never block)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10)
        try:
            with db:
                yield db
        finally:
            db.close()

    def add(
        self,
        model: str,
        messages: list[dict[str, Any]],
        answer: str,
        rating: int,
        better_answer: str | None = None,
    ) -> int:
        if rating not in (-1, 0, 1):
            raise ValueError("rating must be 1 (up), -1 (down) or 0 (correction only)")
        better = (better_answer or "").strip() or None
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO feedback (created_at, model, messages, answer, rating, better_answer)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    model,
                    json.dumps(messages, ensure_ascii=False),
                    answer,
                    rating,
                    better,
                ),
            )
            return int(cur.lastrowid)

    def rows(self) -> list[FeedbackRow]:
        with self._connect() as db:
            cur = db.execute(
                "SELECT id, created_at, model, messages, answer, rating, better_answer "
                "FROM feedback ORDER BY id"
            )
            return [
                FeedbackRow(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6])
                for r in cur.fetchall()
            ]


def training_examples(rows: list[FeedbackRow], include_liked: bool = True) -> list[dict]:
    """Feedback rows as chat training examples.

    A corrected answer always becomes an example (the person's version is the target); a
    thumbs-up answer becomes one when `include_liked`; a thumbs-down without a correction
    teaches nothing and is skipped.
    """
    out = []
    for row in rows:
        if row.better_answer:
            target = row.better_answer
        elif row.rating > 0 and include_liked:
            target = row.answer
        else:
            continue
        messages = [*row.messages, {"role": "assistant", "content": target}]
        out.append({"messages": messages, "meta": {"feedback_id": row.id, "model": row.model}})
    return out


def export(store: FeedbackStore, out: str | Path, include_liked: bool = True) -> int:
    """Write the training examples as JSONL (atomically); returns how many."""
    examples = training_examples(store.rows(), include_liked=include_liked)
    return atomic_write_jsonl(out, examples)
