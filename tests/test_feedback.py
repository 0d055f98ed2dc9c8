"""The feedback loop: rows stored in SQLite, exported as training data that prepare accepts."""

from __future__ import annotations

import json
import subprocess
import sys

from tunedesk.train.prepare.pipeline import PrepareOptions, prepare
from tunedesk.ui.feedback import FeedbackStore, training_examples


def test_feedback_stored_then_exported(tmp_path):
    store = FeedbackStore(tmp_path / "fb.sqlite")
    q = [{"role": "user", "content": "货币基金赎回多久到账？"}]
    liked = store.add("ft", q, "一般T+1到账。", 1)
    store.add("ft", [{"role": "user", "content": "你好"}], "乱码", -1)  # no correction: skipped
    fixed = store.add(
        "ft",
        [{"role": "user", "content": "申购费多少？"}],
        "不知道",
        -1,
        better_answer="申购费率一般为1.5%，以基金合同为准。",
    )
    rows = FeedbackStore(tmp_path / "fb.sqlite").rows()  # a fresh handle reads what was written
    assert [r.id for r in rows] == [liked, 2, fixed]
    assert rows[2].better_answer == "申购费率一般为1.5%，以基金合同为准。"

    out = tmp_path / "fb.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunedesk.cli",
            "feedback",
            "export",
            "--db",
            str(tmp_path / "fb.sqlite"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    examples = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["messages"][-1]["content"] for e in examples] == [
        "一般T+1到账。",
        "申购费率一般为1.5%，以基金合同为准。",
    ]
    assert examples[1]["messages"][0] == {"role": "user", "content": "申购费多少？"}
    # The export is valid training data for prepare.
    result = prepare([out], None, PrepareOptions(min_examples=1))
    assert result.report["counts"]["kept"] == 2 and result.report["counts"]["errors"] == 0
    only = training_examples(rows, include_liked=False)
    assert len(only) == 1 and only[0]["meta"]["feedback_id"] == fixed
