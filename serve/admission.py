"""Admission control: a bounded number of sequences in flight (running + queued).

Beyond the bound a request is refused at once with 429 and Retry-After instead of waiting in
an unbounded queue, so overload shows up as fast, retryable errors rather than timeouts. The
counter lives on the event loop only, so it needs no lock.
"""

from __future__ import annotations

from tunedesk.serve.errors import BadRequest, RateLimited


class Ticket:
    """Holds `weight` units of capacity until released (idempotent)."""

    __slots__ = ("_admission", "weight")

    def __init__(self, admission: Admission, weight: int) -> None:
        self._admission: Admission | None = admission
        self.weight = weight

    def release(self) -> None:
        if self._admission is not None:
            self._admission._active -= self.weight
            self._admission = None


class Admission:
    def __init__(self, max_running: int, max_queued: int, retry_after_s: int = 1) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self._active = 0

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_queued

    @property
    def active(self) -> int:
        return self._active

    @property
    def running(self) -> int:
        return min(self._active, self.max_running)

    @property
    def queued(self) -> int:
        return max(0, self._active - self.max_running)

    def acquire(self, weight: int = 1) -> Ticket:
        """A ticket for `weight` sequences (n choices count n), or 429 when full."""
        if weight > self.capacity:
            raise BadRequest(
                f"This request asks for {weight} sequences; the server runs at most "
                f"{self.capacity} at once. Lower n (or the number of prompts).",
                param="n",
            )
        if self._active + weight > self.capacity:
            raise RateLimited(
                "The server is at capacity; please retry after a short wait.",
                retry_after_s=self.retry_after_s,
            )
        self._active += weight
        return Ticket(self, weight)
