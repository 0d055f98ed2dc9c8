"""UsageTap: the gateway's view of usage in a relayed SSE stream, read by read."""

from __future__ import annotations

import json

from tunedesk.serve.engines.usage_tap import UsageTap


def _event(payload: dict | str, sep: bytes = b"\n\n") -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return b"data: " + data.encode() + sep


TOKENS = [_event({"choices": [{"index": 0, "delta": {"content": c}}]}) for c in "你好呀"]
FINISH = _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
USAGE = _event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
DONE = _event("[DONE]")
STREAM = b"".join([*TOKENS, FINISH, USAGE, DONE])


def _relay(tap: UsageTap, reads: list[bytes]) -> bytes:
    return b"".join(tap.feed(r) for r in reads) + tap.flush()


def _reads_of(stream: bytes, size: int) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def test_usage_is_read_and_the_stream_passes_unchanged_when_the_client_asked_for_it():
    for size in (1, 7, 50, len(STREAM)):  # every way the reads can cut the events
        tap = UsageTap(strip_usage_event=False)
        assert _relay(tap, _reads_of(STREAM, size)) == STREAM
        assert tap.usage == {"prompt_tokens": 7, "completion_tokens": 3}


def test_the_usage_event_the_gateway_asked_for_is_removed_whole():
    for size in (1, 7, 50, len(STREAM)):
        tap = UsageTap(strip_usage_event=True)
        assert _relay(tap, _reads_of(STREAM, size)) == b"".join([*TOKENS, FINISH, DONE])
        assert tap.usage == {"prompt_tokens": 7, "completion_tokens": 3}


def test_usage_on_a_content_event_is_read_but_never_dropped():
    # Some servers put usage on the last content chunk: keep the content.
    last = _event(
        {
            "choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1},
        },
        sep=b"\r\n\r\n",
    )
    tap = UsageTap(strip_usage_event=True)
    assert _relay(tap, [last, DONE]) == last + DONE
    assert tap.usage == {"prompt_tokens": 2, "completion_tokens": 1}


def test_null_usage_and_non_sse_bytes():
    nulls = _event({"choices": [], "usage": None})
    tap = UsageTap(strip_usage_event=True)
    assert _relay(tap, [nulls, DONE]) == nulls + DONE and tap.usage is None
    # No event boundary at all (not SSE): held only up to max_hold, then passed on as is.
    tap = UsageTap(strip_usage_event=True, max_hold=10)
    assert tap.feed(b"12345") == b""
    assert tap.feed(b"678901234") == b"12345678901234"
    assert tap.flush() == b""
