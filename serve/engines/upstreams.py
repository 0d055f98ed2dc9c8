"""Several upstream replicas behind one gateway.

Each request goes to the replica with the fewest requests in flight (ties taken in turn), so
a replica slowed by long generations gets fewer new ones. A replica that refuses a connection,
or does not accept one in time, is skipped for `down_for_s` and the request goes to the next
one: without a connection the request never reached it, so nothing runs twice. A replica that
fails later (mid-answer) is not retried: the request may have run.

A replica that answers `eject_after` requests in a row with a 5xx (a broken engine behind a
live HTTP server) is ejected for `down_for_s` too; its answers are still passed on as they
are. A readiness probe can't vouch for it (its HTTP server answers), so it comes back when the
time is up, on probation: its next 5xx ejects it again, a good answer clears it.

When every replica is out, the one whose time ends first is tried anyway: it may be back, and
a gateway that refuses to try would stay down longer than its upstreams.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


def normalise_base_url(url: str) -> str:
    """`http://h:8000/v1/` and `http://h:8000` both mean the server at http://h:8000."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(eq=False)
class Upstream:
    url: str
    """Base URL without `/v1` (see normalise_base_url)."""
    position: int
    in_flight: int = 0
    down_until: float = 0.0
    """Unreachable (no connection) until then."""
    ejected_until: float = 0.0
    """Answering with errors (consecutive 5xx) until then."""
    last_error: str = ""
    failures_in_a_row: int = 0
    """Consecutive 5xx answers."""


class UpstreamPool:
    def __init__(
        self,
        urls: Iterable[str],
        down_for_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        eject_after: int = 5,
    ) -> None:
        self.upstreams = [Upstream(normalise_base_url(u), i) for i, u in enumerate(urls)]
        if not self.upstreams:
            raise ValueError("an upstream pool needs at least one URL")
        self.down_for_s = down_for_s
        self.eject_after = eject_after
        self.clock = clock
        self._turn = 0

    def pick(self, exclude: Iterable[Upstream] = ()) -> Upstream | None:
        """The replica for the next request, not one of `exclude` (already tried); None when
        every replica has been tried."""
        tried = set(exclude)
        left = [u for u in self.upstreams if u not in tried]
        if not left:
            return None
        now = self.clock()
        up = [u for u in left if self._out_until(u) <= now]
        if not up:
            return min(left, key=self._out_until)
        n = len(self.upstreams)
        self._turn = (self._turn + 1) % n
        return min(up, key=lambda u: (u.in_flight, (u.position - self._turn) % n))

    def mark_down(self, upstream: Upstream, why: str) -> None:
        upstream.down_until = self.clock() + self.down_for_s
        upstream.last_error = why

    def mark_up(self, upstream: Upstream) -> None:
        """Reachable again (a connection or a probe answered): an ejection still stands."""
        upstream.down_until = 0.0
        if upstream.ejected_until <= self.clock():
            upstream.last_error = ""

    def is_up(self, upstream: Upstream) -> bool:
        return upstream.down_until <= self.clock()

    def answered(self, upstream: Upstream, status: int) -> bool:
        """Note a replica's answer status; True if that ejected it (see the module doc)."""
        if status < 500:
            upstream.failures_in_a_row = 0
            return False
        upstream.failures_in_a_row += 1
        if upstream.failures_in_a_row < self.eject_after:
            return False
        upstream.failures_in_a_row = self.eject_after - 1  # probation once back
        upstream.ejected_until = self.clock() + self.down_for_s
        upstream.last_error = f"answered {status} (5xx {self.eject_after} times in a row)"
        return True

    @staticmethod
    def _out_until(upstream: Upstream) -> float:
        return max(upstream.down_until, upstream.ejected_until)
