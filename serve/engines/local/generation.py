"""One request's sequences in a batcher, seen from the event loop as batches of outputs."""

from __future__ import annotations

import asyncio
import time

from tunedesk.serve.engines.local.batcher import (
    EngineDead,
    Handoff,
    SeqOutput,
    Sequence,
    StepBatcher,
)
from tunedesk.serve.engines.local.prefix_cache import NO_SCOPE, CacheScope
from tunedesk.serve.engines.local.sampling import SamplingParams
from tunedesk.serve.errors import BadRequest, EngineFailure, GatewayTimeout, Unavailable

# Put in the queue when the deadline passes. A timer posting a marker, rather than
# asyncio.wait_for around the wait: wait_for can swallow a cancellation that races with a
# result (CPython gh-86296), and a request whose client had left would then generate on.
_TIMED_OUT = SeqOutput(index=-1, text="", tokens=0, error="timed out")


class Generation:
    def __init__(
        self,
        batcher: StepBatcher,
        jobs: list[tuple[list[int], SamplingParams]],
        deadline: float,
        cache_scope: CacheScope = NO_SCOPE,
    ) -> None:
        """Submit one sequence per (prompt ids, params); the list index is the choice index.
        `cache_scope`: prompts share cached prefixes only with the same scope."""
        self._batcher = batcher
        self._queue: asyncio.Queue[SeqOutput] = asyncio.Queue()
        self._handoff: Handoff | None = None
        loop = asyncio.get_running_loop()
        self._seqs = [
            Sequence(
                prompt=prompt,
                params=params,
                index=i,
                loop=loop,
                sink=self,
                cache_scope=cache_scope,
            )
            for i, (prompt, params) in enumerate(jobs)
        ]
        self._open = {s.index for s in self._seqs}
        try:
            batcher.submit(self._seqs)
        except EngineDead as exc:
            raise Unavailable(
                "The model's worker has stopped; the server needs a restart."
            ) from exc
        self._timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._queue.put_nowait(_TIMED_OUT)

    @property
    def finished(self) -> bool:
        return not self._open

    def push(self, outputs: list[SeqOutput], handoff: Handoff) -> None:
        """Called on the event loop by the batcher with one step's outputs."""
        self._ack()  # a late consumer: the worker stopped waiting for the previous step
        for out in outputs:
            self._queue.put_nowait(out)
        self._handoff = handoff

    def _ack(self) -> None:
        if self._handoff is not None:
            self._handoff.ack()
            self._handoff = None

    async def next_outputs(self) -> list[SeqOutput]:
        """Wait for at least one output, then take everything already queued (fewer, larger
        writes when many tokens arrive together). Raises on a sequence error or timeout."""
        # Coming back for more means the previous outputs are written: the worker may step.
        self._ack()
        outs = [await self._queue.get()]
        while not self._queue.empty():
            outs.append(self._queue.get_nowait())
        for out in outs:
            if out is _TIMED_OUT:
                raise GatewayTimeout("The request timed out before generation finished.")
            if out.error is not None:
                self._open.discard(out.index)
                if out.refused:
                    raise BadRequest(f"This model can't serve the request: {out.error}")
                raise EngineFailure(f"Generation failed: {out.error}")
            if out.finish_reason is not None:
                self._open.discard(out.index)
        return outs

    def close(self) -> bool:
        """Abort whatever is still generating; True if anything was (the slot is freed now)."""
        self._ack()
        self._timer.cancel()
        if not self._open:
            return False
        self._batcher.abort(s.id for s in self._seqs if s.index in self._open)
        self._open.clear()
        return True
