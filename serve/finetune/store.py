"""The fine-tuning API's books: uploaded files and API jobs in one SQLite database (WAL mode).

The training side of a job (status.json, events, metrics, checkpoints, adapter) lives in its
`runs/<job-id>/` folder, owned by `tunedesk.train.jobs`; this database holds what only the API
knows: the OpenAI-facing status, the file ids, the client's model name and suffix, the stage
the worker has reached, and the result files. The job id is the same in both places.

Columns holding lists or objects are stored as JSON text and decoded on the way out; every
row comes back as a plain dict. One connection, guarded by a lock: the routes (FastAPI's
thread pool) and the worker thread share it, and every statement is short.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FILE_PREFIX = "file-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    status TEXT NOT NULL,
    status_details TEXT,
    path TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    model TEXT NOT NULL,
    base_path TEXT NOT NULL,
    parent TEXT,
    ft_name TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    suffix TEXT,
    seed INTEGER NOT NULL,
    hyperparameters TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    metadata TEXT,
    status TEXT NOT NULL,
    stage TEXT NOT NULL,
    error TEXT,
    fine_tuned_model TEXT,
    finished_at INTEGER,
    trained_tokens INTEGER,
    result_files TEXT NOT NULL DEFAULT '[]',
    resumes INTEGER NOT NULL DEFAULT 0,
    merge_pid INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_stage ON jobs (stage);
CREATE TABLE IF NOT EXISTS deleted_models (
    name TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    deleted_at INTEGER NOT NULL
);
"""

_JSON_COLUMNS = {"info", "hyperparameters", "options", "metadata", "error", "result_files"}

# Worker stages (the API status is a separate column):
#   validate -> queue -> train -> merge -> done
STAGES = ("validate", "queue", "train", "merge", "done")


def new_file_id() -> str:
    return FILE_PREFIX + secrets.token_hex(12)


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (json.dumps(v, ensure_ascii=False) if k in _JSON_COLUMNS and v is not None else v)
        for k, v in fields.items()
    }


def _decode(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for k in _JSON_COLUMNS & out.keys():
        if out[k] is not None:
            out[k] = json.loads(out[k])
    return out


class FineTuneStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Autocommit (isolation_level=None): each statement is its own transaction unless a
        # `transaction()` block groups several.
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=10
        )
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _insert(self, table: str, fields: dict[str, Any]) -> None:
        enc = _encode(fields)
        cols = ", ".join(enc)
        marks = ", ".join("?" for _ in enc)
        with self._lock:
            self._db.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", list(enc.values()))

    def _one(self, sql: str, args: Iterable[Any] = ()) -> dict[str, Any] | None:
        with self._lock:
            return _decode(self._db.execute(sql, list(args)).fetchone())

    def _all(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [_decode(r) for r in self._db.execute(sql, list(args)).fetchall()]  # type: ignore[misc]

    def _page(
        self,
        table: str,
        where: str,
        args: list[Any],
        after: str | None,
        limit: int,
        ascending: bool = False,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Rows in `seq` order (newest first unless `ascending`), starting after the row with
        id `after`; and whether more rows follow."""
        clauses = [where] if where else []
        if after is not None:
            cursor = self._one(f"SELECT seq FROM {table} WHERE id = ?", [after])
            if cursor is not None:
                clauses.append("seq > ?" if ascending else "seq < ?")
                args = [*args, cursor["seq"]]
        sql = f"SELECT * FROM {table}"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += f" ORDER BY seq {'ASC' if ascending else 'DESC'} LIMIT ?"
        rows = self._all(sql, [*args, limit + 1])
        return rows[:limit], len(rows) > limit

    # -- files ----------------------------------------------------------------------------------

    def add_file(self, fields: dict[str, Any]) -> dict[str, Any]:
        self._insert("files", fields)
        return self.get_file(fields["id"])  # type: ignore[return-value]

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM files WHERE id = ?", [file_id])

    def list_files(
        self, purpose: str | None, after: str | None, limit: int, ascending: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        if purpose:
            return self._page("files", "purpose = ?", [purpose], after, limit, ascending)
        return self._page("files", "", [], after, limit, ascending)

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM files WHERE id = ?", [file_id]).rowcount > 0

    # -- jobs -----------------------------------------------------------------------------------

    def add_job(self, fields: dict[str, Any]) -> dict[str, Any]:
        self._insert("jobs", fields)
        return self.get_job(fields["id"])  # type: ignore[return-value]

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", [job_id])

    def list_jobs(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        return self._page("jobs", "", [], after, limit)

    def active_jobs(self) -> list[dict[str, Any]]:
        """Jobs the worker still has to act on, oldest first (the queue order)."""
        return self._all("SELECT * FROM jobs WHERE stage != 'done' ORDER BY seq ASC")

    def jobs_in_stage(self, stage: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM jobs WHERE stage = ? ORDER BY seq ASC", [stage])

    def update_job(
        self,
        job_id: str,
        *,
        expect_stage: str | Iterable[str] | None = None,
        expect_status: str | Iterable[str] | None = None,
        **fields: Any,
    ) -> bool:
        """Set `fields`; with `expect_*`, only if the row is still in that stage / status (a
        compare-and-set, so a cancel and the worker never undo each other). True if updated."""
        enc = _encode(fields)
        sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in enc)} WHERE id = ?"
        args = [*enc.values(), job_id]
        for column, expected in (("stage", expect_stage), ("status", expect_status)):
            if expected is None:
                continue
            values = [expected] if isinstance(expected, str) else list(expected)
            sql += f" AND {column} IN ({', '.join('?' for _ in values)})"
            args += values
        with self._lock:
            return self._db.execute(sql, args).rowcount > 0

    # -- deleted models ---------------------------------------------------------------------------

    def add_deleted_model(self, name: str, job_id: str, deleted_at: int) -> None:
        """Record that a served fine-tune was deleted, so a restart does not serve it again."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO deleted_models (name, job_id, deleted_at) VALUES (?, ?, ?)",
                [name, job_id, deleted_at],
            )

    def deleted_models(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT name FROM deleted_models")}
