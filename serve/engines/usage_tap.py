"""Token usage out of a relayed SSE stream, for the gateway's access log and token counters.

The gateway relays an upstream's stream without parsing it. Usage arrives once, near the end
(OpenAI's `stream_options.include_usage`: an event with `"choices": []` and a `usage`
object), so only an event whose bytes contain a usage object is parsed: a byte search per
read, one JSON parse per stream. When the client did not ask for usage, the gateway asks the
upstream for it anyway and this removes that one event, so the client gets the stream it
asked for and the log still gets the tokens.

Only whole events are passed on: bytes after the last event boundary wait for the next read
(an event split across two reads would otherwise hide its usage). A stream without
boundaries (not SSE after all) is passed on as it comes once `max_hold` bytes pile up.
"""

from __future__ import annotations

import json
import re
from typing import Any

_USAGE_MARKS = (b'"usage":{', b'"usage": {')
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def _last_boundary_end(buf: bytes) -> int:
    """Index just past the last event boundary in `buf`, or 0 if there is none."""
    end = 0
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        at = buf.rfind(sep)
        if at >= 0:
            end = max(end, at + len(sep))
    return end


def _event_json(event: bytes) -> Any:
    """The JSON of an event's `data:` lines, or None if it has none or they aren't JSON."""
    lines = [line for line in re.split(rb"\r\n|\n|\r", event) if line.startswith(b"data:")]
    if not lines:
        return None
    data = b"\n".join(line[5:].removeprefix(b" ") for line in lines)
    try:
        return json.loads(data)
    except ValueError:
        return None


class UsageTap:
    def __init__(self, strip_usage_event: bool, max_hold: int = 1 << 16) -> None:
        """`strip_usage_event`: the client did not ask for usage; drop the usage-only event."""
        self.strip = strip_usage_event
        self.max_hold = max_hold
        self.usage: dict[str, Any] | None = None
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """One read from upstream -> the bytes to relay now (possibly empty)."""
        buf = self._held + data if self._held else data
        cut = _last_boundary_end(buf)
        if cut == 0 and len(buf) <= self.max_hold:
            self._held = buf
            return b""
        if cut == 0:  # no event structure to keep: relay as is
            cut = len(buf)
        whole, self._held = buf[:cut], buf[cut:]
        return self._scan(whole)

    def flush(self) -> bytes:
        """At the end of the stream: whatever is still held."""
        rest, self._held = self._held, b""
        return self._scan(rest) if rest else b""

    def _scan(self, whole: bytes) -> bytes:
        if not any(mark in whole for mark in _USAGE_MARKS):
            return whole
        parts = _BOUNDARY.split(whole)
        seps = _BOUNDARY.findall(whole)
        kept: list[bytes] = []
        dropped = False
        for i, event in enumerate(parts):
            sep = seps[i] if i < len(seps) else b""
            if any(mark in event for mark in _USAGE_MARKS):
                payload = _event_json(event)
                usage = payload.get("usage") if isinstance(payload, dict) else None
                if isinstance(usage, dict):
                    self.usage = usage
                    if self.strip and payload.get("choices") == []:
                        dropped = True
                        continue
            kept.append(event + sep)
        return b"".join(kept) if dropped else whole
