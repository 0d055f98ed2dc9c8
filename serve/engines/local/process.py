"""A model's batcher in its own process, so HTTP work and generation run on separate cores.

In one process, the event loop (parsing requests, writing SSE chunks) and the batcher thread
(the forward pass, sampling, detokenising) are both Python and take turns on one interpreter
lock: on a small model most of a step is Python, so at 8 or 32 streams they spend much of their
time waiting for each other. vLLM splits its API server from its engine core for the same
reason. Here the child process owns the model and a `StepBatcher`; this process keeps the
tokenizer (prompt encoding and limits happen before submission) and an `EngineProcess` that
mirrors the batcher's event-loop interface, so `Generation` and the serving code don't change.

Protocol over one `multiprocessing` pipe, pickled tuples:
- parent -> child: ("submit", [(seq id, prompt ids, SamplingParams, choice index, cache scope)]),
  ("abort", [seq ids]), ("stop",)
- child -> parent: ("ready",), ("failed", message) if the load failed,
  ("out", [(seq id, text, tokens, finish_reason, error, at, cached, logprob, prompt logprobs,
  refused)]) once per step (SeqOutput's fields in order), ("dead", reason) if the batcher
  failed (its sequences got their errors first).
The child exits when the pipe closes, so it never outlives the server. If the child dies, every
open sequence fails with an error (500 or an in-band stream error) and `alive` turns False
(/ready reports it, new requests get 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tunedesk.serve.engines.local.batcher import (
    EngineDead,
    Handoff,
    OutputSink,
    SeqOutput,
    Sequence,
    StepBatcher,
    deliver_outputs,
)
from tunedesk.serve.heap import freeze_startup_heap

log = logging.getLogger("tunedesk.serve")


@dataclass(frozen=True)
class EngineSpec:
    """What the child needs to load and run a model (plain values: it crosses the pipe)."""

    name: str
    path: str
    adapter: str | None
    tokenizer_source: str
    device: str
    dtype: str
    cpu_threads: int | None
    max_batch: int
    stop_ids: tuple[int, ...]
    context_len: int
    prefill_batch_tokens: int = 256
    lean: bool = True
    prefix_cache_bytes: int = 0


# --------------------------------------------------------------------------- child side


def _child_main(conn: Any, spec: EngineSpec) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    send_lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(msg)

    try:
        from tunedesk.serve.engines.local.models import load_weights

        model, tokenizer = load_weights(spec.path, spec.adapter, spec.tokenizer_source, spec)
        batcher = StepBatcher(
            model,
            tokenizer,
            stop_ids=spec.stop_ids,
            context_len=spec.context_len,
            max_batch=spec.max_batch,
            name=spec.name,
            cpu_threads=spec.cpu_threads,
            prefill_token_budget=spec.prefill_batch_tokens,
            lean=spec.lean,
            prefix_cache_bytes=spec.prefix_cache_bytes,
            on_outputs=lambda pairs: send(
                (
                    "out",
                    [
                        (
                            sid,
                            o.text,
                            o.tokens,
                            o.finish_reason,
                            o.error,
                            o.at,
                            o.cached,
                            o.logprob,
                            o.prompt_logprobs,
                            o.refused,
                        )
                        for sid, o in pairs
                    ],
                )
            ),
        )
        batcher.warm_up()
        freeze_startup_heap()
    except BaseException as exc:  # reported to the parent, which answers 503
        send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    send(("ready",))

    def pump(idle: bool) -> bool:
        """Feed the pipe's messages to the batcher; block for one only when it is idle."""
        block = idle
        while block or conn.poll():
            block = False
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return False  # the server is gone
            if msg[0] == "submit":
                seqs = [
                    Sequence(
                        prompt=p,
                        params=params,
                        index=i,
                        loop=None,
                        sink=None,
                        id=sid,
                        cache_scope=scope,
                    )
                    for sid, p, params, i, scope in msg[1]
                ]
                batcher.submit(seqs)
            elif msg[0] == "abort":
                batcher.abort(msg[1])
            elif msg[0] == "stop":
                return False
        return True

    # The worker loop runs here, in the main thread, reading the pipe between steps.
    batcher.run_inline(pump)
    if batcher.fatal is not None:  # its sequences already got their error outputs
        send(("dead", repr(batcher.fatal)))


# --------------------------------------------------------------------------- parent side


class EngineProcess:
    """The event-loop side of a StepBatcher whose worker runs in a child process.

    Outputs are read on the event loop itself (`add_reader` on the pipe), not by a thread: a
    reader thread had to win the interpreter lock from a busy event loop for every step's
    message, which added several milliseconds to each first token under load.
    """

    def __init__(self, spec: EngineSpec, startup_timeout_s: float = 600.0) -> None:
        self.spec = spec
        self.name = spec.name
        self.max_batch = spec.max_batch
        self.startup_timeout_s = startup_timeout_s
        self.fatal: BaseException | None = None
        self._seqs: dict[int, Sequence] = {}
        self._stopping = False
        self._send_lock = threading.Lock()  # stop() sends from a worker thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox = bytearray()
        ctx = multiprocessing.get_context("spawn")  # never fork a process holding torch threads
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child_main, args=(child_conn, spec), name=f"engine-{spec.name}", daemon=True
        )
        self._child_conn = child_conn

    # --- lifecycle (blocking: run from a worker thread)

    def start(self) -> None:
        self._proc.start()
        self._child_conn.close()  # the child holds its end; EOF here means the child is gone
        if not self._conn.poll(self.startup_timeout_s):
            self._kill()
            raise RuntimeError(f"the engine process did not start in {self.startup_timeout_s}s")
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._kill()
            raise RuntimeError(
                f"the engine process exited while loading (code {self._proc.exitcode})"
            ) from None
        if msg[0] != "ready":
            self._kill()
            raise RuntimeError(msg[1] if len(msg) > 1 else "the engine process failed to load")

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to stop (its open sequences get "unloaded" errors), wait, then kill."""
        self._stopping = True
        with contextlib.suppress(OSError, ValueError):
            self._send(("stop",))
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        # The pipe itself is closed by the event loop's reader when it sees the end.
        if self._loop is None or self._loop.is_closed():
            self._close_pipe()

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._close_pipe()

    def _close_pipe(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.close()

    # --- the StepBatcher interface, used on the event loop

    @property
    def alive(self) -> bool:
        return self.fatal is None and not self._stopping and self._proc.is_alive()

    @property
    def running(self) -> int:
        return min(len(self._seqs), self.max_batch)

    @property
    def waiting(self) -> int:
        return max(0, len(self._seqs) - self.max_batch)

    def submit(self, seqs: list[Sequence]) -> None:
        if not self.alive:
            raise EngineDead(f"the {self.name} engine process has stopped: {self.fatal!r}")
        self._attach(asyncio.get_running_loop())
        for s in seqs:
            self._seqs[s.id] = s
        try:
            self._send(
                ("submit", [(s.id, s.prompt, s.params, s.index, s.cache_scope) for s in seqs])
            )
        except (OSError, ValueError) as exc:
            for s in seqs:
                self._seqs.pop(s.id, None)
            raise EngineDead(f"the {self.name} engine process is unreachable: {exc}") from exc

    def abort(self, seq_ids: Iterable[int]) -> None:
        ids = list(seq_ids)
        for sid in ids:
            self._seqs.pop(sid, None)  # the child drops them without a last output
        with contextlib.suppress(OSError, ValueError):  # a dead child has nothing to abort
            self._send(("abort", ids))

    def _send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(msg)

    # --- outputs, read on the event loop

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("an engine process serves one event loop")
        loop.add_reader(self._conn.fileno(), self._on_readable)
        self._loop = loop

    def _on_readable(self) -> None:
        # One read per wake-up, framed by hand: `Connection.poll` builds a selector per call,
        # and polling after every message cost more than the message. The frames are
        # multiprocessing's own (a 4-byte big-endian length, or -1 and an 8-byte one).
        try:
            data = os.read(self._conn.fileno(), 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._detach()
            return
        buf = self._inbox
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            (size,) = struct.unpack_from("!i", buf, pos)
            start = pos + 4
            if size == -1:
                if len(buf) - pos < 12:
                    break
                (size,) = struct.unpack_from("!Q", buf, pos + 4)
                start = pos + 12
            if len(buf) < start + size:
                break
            msg = pickle.loads(memoryview(buf)[start : start + size])
            pos = start + size
            if msg[0] == "out":
                self._dispatch(msg[1])
            elif msg[0] == "dead":
                log.error("engine for %s failed: %s", self.name, msg[1])
                del buf[:pos]
                self._detach()
                return
        del buf[:pos]

    def _detach(self) -> None:
        assert self._loop is not None
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._conn.fileno())
        self._close_pipe()
        self._on_exit()

    def _on_exit(self) -> None:
        if not self._stopping:
            log.error("engine process for %s exited (code %s)", self.name, self._proc.exitcode)
        self.fatal = EngineDead(f"the engine process exited (code {self._proc.exitcode})")
        orphans, self._seqs = list(self._seqs.values()), {}
        message = "the model was unloaded" if self._stopping else "the engine process exited"
        self._deliver_pairs([(s, SeqOutput(s.index, "", 0, error=message)) for s in orphans])

    def _dispatch(self, items: list[tuple[Any, ...]]) -> None:
        pairs: list[tuple[Sequence, SeqOutput]] = []
        for sid, text, tokens, finish, error, at, cached, logprob, prompt_lps, refused in items:
            seq = self._seqs.get(sid)
            if seq is None:
                continue  # aborted meanwhile
            if finish is not None or error is not None:
                del self._seqs[sid]
            out = SeqOutput(
                seq.index, text, tokens, finish, error, at, cached, logprob, prompt_lps, refused
            )
            pairs.append((seq, out))
        self._deliver_pairs(pairs)

    @staticmethod
    def _deliver_pairs(pairs: list[tuple[Sequence, SeqOutput]]) -> None:
        by_sink: dict[OutputSink, list[SeqOutput]] = {}
        for seq, out in pairs:
            assert seq.sink is not None
            by_sink.setdefault(seq.sink, []).append(out)
        deliver_outputs(by_sink, _UNWAITED)


class _Unwaited(Handoff):
    """The hand-off of outputs nobody waits on: the child steps on without the event loop, so
    no `threading.Event` per step (a Handoff builds one)."""

    def __init__(self) -> None:
        pass

    def expect(self, n: int) -> None:
        pass

    def ack(self) -> None:
        pass


_UNWAITED = _Unwaited()
