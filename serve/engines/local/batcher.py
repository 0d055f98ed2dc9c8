"""Step-level continuous batching on one model, in one worker thread.

All running sequences advance together: each step is one batched forward of every sequence's
last token over a shared left-padded KV cache (see runners.py: the lean forward over a slab
cache for Llama-family models, the model's own forward otherwise), then per-sequence sampling. Between
steps, waiting sequences join: they are prefilled together in one forward and their caches
merged into the batch, so a new request never waits for the running ones to finish. Finished,
failed and aborted sequences leave between steps and free their slot at once.

Why not transformers' own continuous batching (`init_continuous_batching`)? It works on CPU,
but one manager shares a single sampling config (temperature, top_p, do_sample) across all
requests and one global RNG, so per-request `temperature`/`seed` can't be honoured; on CPU its
paged cache was also far slower than this for small batches. This batcher is plain PyTorch over
the model's weights.

The worker thread owns the model; the event loop only enqueues and aborts. Outputs go back with
one `call_soon_threadsafe` per step and event loop, not one per token.

Hand-off: after each step the worker waits (at most `handoff_timeout_s`) until every consumer
of that step's outputs has come back for more, i.e. has written its chunk to the socket. Both
threads run Python and share the GIL: left to overlap, every socket write on the event loop
waits out a GIL switch interval (5 ms) behind the forward pass, and a 32-stream batch spent
most of each step queueing for the GIL. Taking turns is several times faster under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tunedesk.serve.engines.local.detok import IncrementalDetokenizer, StopMatcher
from tunedesk.serve.engines.local.grammar import GrammarMasks
from tunedesk.serve.engines.local.logprobs import (
    TokenLogprob,
    TokenTexts,
    prompt_logprobs,
    token_logprobs,
)
from tunedesk.serve.engines.local.prefix_cache import NO_SCOPE, Block, CacheScope
from tunedesk.serve.engines.local.runners import Runner, make_runner
from tunedesk.serve.engines.local.sampling import SamplingParams, finite_rows, sample

log = logging.getLogger("tunedesk.serve")

_ids = itertools.count(1)


@dataclass
class SeqOutput:
    """What one step produced for one sequence."""

    index: int
    """The sequence's choice index in its request."""
    text: str
    tokens: int
    finish_reason: str | None = None
    error: str | None = None
    at: float = field(default_factory=time.perf_counter)
    """When the worker produced it (per-token latency is measured here, not on arrival)."""
    cached: int = 0
    """On a sequence's first output: how many of its prompt tokens came from the prefix
    cache instead of being prefilled."""
    logprob: TokenLogprob | None = None
    """The token's logprob, when the request asked for logprobs."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """On a sequence's first output, when asked for: its prompt tokens' logprobs."""
    refused: bool = False
    """With `error`: the request asked for what this model can't do (a 400, not a 500)."""


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    index: int
    loop: asyncio.AbstractEventLoop | None
    sink: OutputSink | None
    """Receives this sequence's outputs on `loop` (the request's Generation); both None when
    the batcher hands outputs to `on_outputs` instead (an engine process, see process.py)."""
    id: int = field(default_factory=lambda: next(_ids))
    # Worker-side state.
    generated: list[int] = field(default_factory=list)
    last_token: int = -1
    position: int = 0
    """Real tokens in the cache (the next token's position id)."""
    detok: Any = None
    stops: StopMatcher | None = None
    generator: torch.Generator | None = None
    done: bool = False
    cached: int = 0
    """Prompt tokens whose keys and values came from the prefix cache."""
    prompt_logprobs: list[TokenLogprob] | None = None
    finished_ok: bool = False
    """Done with a finish reason (not failed): its cache is worth keeping."""
    matcher: Any = None
    """Its grammar's state, when the request constrains the output (grammar.py)."""
    cache_scope: CacheScope = NO_SCOPE
    """Which cached prefixes it may use (the server's: its API key, and its salt): how fast a
    first token comes must not tell one caller what another one asked."""


class EngineDead(RuntimeError):
    pass


class Handoff:
    """Counts consumers that still owe an acknowledgement for one step's outputs. Touched only
    on the event loop; the worker just waits on `done`."""

    def __init__(self) -> None:
        self._owed = 0
        self.done = threading.Event()

    def expect(self, n: int) -> None:
        self._owed += n
        if self._owed <= 0:
            self.done.set()

    def ack(self) -> None:
        self._owed -= 1
        if self._owed <= 0:
            self.done.set()


class OutputSink(Protocol):
    def push(self, outputs: list[SeqOutput], handoff: Handoff) -> None:
        """Take outputs (on the event loop); call `handoff.ack()` once they are consumed."""


class StepBatcher:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        stop_ids: Iterable[int],
        context_len: int,
        max_batch: int,
        name: str = "model",
        prefill_token_budget: int = 8192,
        cpu_threads: int | None = None,
        handoff_timeout_s: float = 0.02,
        lean: bool = True,
        on_outputs: Callable[[list[tuple[int, SeqOutput]]], None] | None = None,
        prefix_cache_bytes: int = 0,
    ) -> None:
        """`on_outputs`, if given, receives each step's (sequence id, output) pairs on the
        worker thread, and the worker does not wait for them to be consumed.
        `prefix_cache_bytes`: keys and values of prompt prefixes kept for reuse (lean runner
        only; 0: none)."""
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.context_len = context_len
        self.max_batch = max_batch
        self.name = name
        self.prefill_token_budget = prefill_token_budget
        self.cpu_threads = cpu_threads
        self.handoff_timeout_s = handoff_timeout_s
        self.on_outputs = on_outputs
        self.device = model.device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Embedding rows past the tokenizer's vocabulary are padding (never trained): never
        # sample them.
        self.vocab = len(tokenizer)
        self._token_texts = TokenTexts(tokenizer)
        self._grammars = GrammarMasks(tokenizer, self.stop_ids, self.vocab)
        self._pending: deque[Sequence] = deque()
        self._rows: list[Sequence] = []
        self._aborts: set[int] = set()
        self._cv = threading.Condition()
        self._stopping = False
        self._runner: Runner = make_runner(model, lean=lean, prefix_cache_bytes=prefix_cache_bytes)
        self._out: list[tuple[Sequence, SeqOutput]] = []
        self.fatal: BaseException | None = None
        self._inline = False
        self._warmed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)

    # --- event-loop side ----------------------------------------------------------------

    def start(self, timeout: float = 300.0) -> None:
        """Start the worker thread; return once it has warmed up (see `warm_up`)."""
        self._thread.start()
        self._warmed.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        running = self._inline or self._thread.is_alive()
        return self.fatal is None and running and not self._stopping

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cv:
            if not self.alive:
                raise EngineDead(f"the {self.name} worker has stopped: {self.fatal!r}")
            self._pending.extend(seqs)
            self._cv.notify()

    def abort(self, seq_ids: Iterable[int]) -> None:
        ids = set(seq_ids)
        with self._cv:
            # Not started yet: drop it here. Running: the worker drops it before the next step.
            self._pending = deque(s for s in self._pending if s.id not in ids)
            self._aborts |= ids
            self._cv.notify()

    # --- worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        self._serve(self._wait_for_work)

    def run_inline(self, pump: Callable[[bool], bool]) -> None:
        """Run the worker loop in the calling thread instead of `start()`ing one.

        Before every step the loop calls `pump(idle)`, which feeds work in (`submit`, `abort`)
        and returns False to stop; with `idle` True there is nothing to do until it brings
        some, so it may block. An engine process runs this way: its pipe is read between steps
        by the thread that steps, so no second thread competes for the interpreter lock
        (with one, a burst of 32 submissions waited ~5 ms each for the lock).
        """

        self._inline = True

        def wait() -> bool:
            return pump(not (self._pending or self._rows or self._aborts)) and not self._stopping

        self._serve(wait)

    def _wait_for_work(self) -> bool:
        with self._cv:
            while not (self._stopping or self._pending or self._rows or self._aborts):
                self._cv.wait()
            return not self._stopping

    def _set_threads(self) -> None:
        if self.cpu_threads is not None and self.device.type == "cpu":
            # Set in the thread that runs the model: OpenMP's team size is per thread.
            torch.set_num_threads(self.cpu_threads)

    def _serve(self, wait: Callable[[], bool]) -> None:
        self._set_threads()
        try:
            with torch.inference_mode():
                self.warm_up()
                while True:
                    if not wait():
                        self._fail_everyone("the model was unloaded")
                        return
                    with self._cv:
                        aborts, self._aborts = self._aborts, set()
                        new = self._take_pending()
                    if aborts:
                        self._drop(aborts)
                        new = [s for s in new if s.id not in aborts]
                    if new:
                        self._prefill(new)
                        # First tokens go out now, not after the decode step below.
                        self._flush()
                    if self._rows:
                        self._decode()
                    self._flush()
        except BaseException as exc:  # a bug or a dead device: fail everyone, refuse new work
            log.exception("batcher for %s died", self.name)
            self.fatal = exc
            self._fail_everyone(f"engine failure: {exc}")

    def warm_up(self) -> None:
        """A throwaway prefill and decode step at a large batch shape before serving.

        A process's first large tensors are slow: fresh pages fault in, and glibc raises its
        mmap threshold only after the first big frees. Measured on the tiny model, the first
        32-prompt prefill took 165 ms and the next ones 29 ms; without this, the first burst of
        requests pays it in time to first token. Skipped where it would itself be slow (a big
        model on CPU). Structured outputs' view of the vocabulary is built here too.
        """
        if self._warmed.is_set():
            return
        self._set_threads()
        self._grammars.prepare()
        rows, width = min(self.max_batch, 32), min(32, self.context_len - 2)
        params = sum(p.numel() for p in self.model.parameters())
        if width < 1 or (self.device.type == "cpu" and params * rows * width > 2e11):
            self._warmed.set()
            return
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            with torch.inference_mode():
                self._runner.prefill(ids, mask, positions)
                self._runner.decode(ids[:, -1:], positions[:, -1:] + 1)
        finally:
            self._runner.reset()
            if self._runner.prefix_cache is not None:
                self._runner.prefix_cache.clear()  # the warm-up's padding is no one's prefix
            self._warmed.set()

    def _fail_everyone(self, message: str) -> None:
        with self._cv:
            pending = list(self._pending)
            self._pending.clear()
        for seq in [*self._rows, *pending]:
            self._emit(seq, SeqOutput(seq.index, "", 0, error=message))
        self._rows = []
        self._runner.reset()
        self._flush()

    def _take_pending(self) -> list[Sequence]:
        room = self.max_batch - len(self._rows)
        new: list[Sequence] = []
        budget = self.prefill_token_budget
        while self._pending and len(new) < room:
            if new and len(self._pending[0].prompt) > budget:
                break  # a long prompt waits for the next step rather than stall this one
            seq = self._pending.popleft()
            budget -= len(seq.prompt)
            new.append(seq)
        return new

    def _drop(self, ids: set[int]) -> None:
        self._remove([i for i, s in enumerate(self._rows) if s.id in ids])

    def _remove(self, dead: list[int]) -> None:
        if dead:
            order = self._runner.remove(dead)
            self._rows = [self._rows[i] for i in order]

    def _prefill(self, group: list[Sequence]) -> None:
        for s in group:
            if s.params.grammar is not None:
                try:
                    s.matcher = self._grammars.matcher(s.params.grammar)
                except Exception as exc:
                    self._fail(s, f"structured output: {exc}", refused=True)
                    continue
            if s.params.prompt_logprobs is not None:
                try:
                    s.prompt_logprobs = self._score_prompt(s.prompt, s.params.prompt_logprobs)
                except Exception as exc:
                    log.exception("prompt logprobs failed on %s", self.name)
                    self._fail(s, f"prompt logprobs failed: {exc}")
        group = [s for s in group if not s.done]
        if not group:
            return
        cache = self._runner.prefix_cache
        if cache is None:
            self._prefill_rows(group, None)
            return
        # One forward per cached-prefix length: the rows of a forward share the prefix's width.
        by_length: dict[int, list[tuple[Sequence, list[Block]]]] = {}
        for s in group:
            chain = cache.match(s.prompt, scope=s.cache_scope)
            s.cached = len(chain) * cache.block_size
            by_length.setdefault(len(chain), []).append((s, chain))
        for pairs in by_length.values():
            self._prefill_rows([s for s, _ in pairs], [chain for _, chain in pairs])

    def _prefill_rows(self, group: list[Sequence], chains: list[list[Block]] | None) -> None:
        cached = group[0].cached if chains else 0
        width = max(len(s.prompt) - cached for s in group)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, s in enumerate(group):
            rest = s.prompt[cached:]
            ids[i, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            mask[i, width - len(rest) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Padding positions get the first real position; they are masked out and never
        # attended to. Real tokens continue from the cached prefix.
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + cached
        try:
            scopes = [s.cache_scope for s in group]
            logits = self._runner.prefill(ids, mask, positions, chains, scopes)
        except Exception as exc:
            log.exception("prefill failed on %s", self.name)
            for s in group:
                self._fail(s, f"prefill failed: {exc}")
            return
        for s in group:
            s.position = len(s.prompt)
            s.detok = IncrementalDetokenizer(self.tokenizer)
            s.stops = StopMatcher(s.params.stop)
            s.generator = s.params.make_generator(self.device)
        self._rows.extend(group)
        self._sample_and_emit(logits, first_row=len(self._rows) - len(group))

    def _score_prompt(self, prompt: list[int], k: int) -> list[TokenLogprob]:
        """Logprobs of every prompt token. The batched prefill keeps only the last position's
        logits, so this is one more forward over the whole prompt, by the model's own
        (uncached) forward: paid only by requests that ask (`echo` with `logprobs`).

        The output head runs over 256 positions at a time: a whole prompt's logits at once
        would be 1.2 GB for 2,048 tokens of a 152k vocabulary (Qwen2's)."""
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        config = getattr(self.model, "config", None)
        whole = decoder is None or decoder is self.model or head is None
        if whole or getattr(config, "final_logit_softcapping", None):  # the head isn't all
            logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
            logits[:, self.vocab :] = float("-inf")
            return prompt_logprobs(logits, prompt, k, self._token_texts)
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
        out: list[TokenLogprob] = []
        for start in range(0, len(prompt), 256):
            logits = head(hidden[start : start + 256]).float()
            logits[:, self.vocab :] = float("-inf")
            # Position i's logits predict token i + 1 (the first token has none).
            window = prompt[start : start + 257]
            part = prompt_logprobs(logits, window, k, self._token_texts)
            out += part if start == 0 else part[1:]
        return out

    def _decode(self) -> None:
        ids = torch.tensor([[s.last_token] for s in self._rows], device=self.device)
        positions = torch.tensor([[s.position] for s in self._rows], device=self.device)
        try:
            logits = self._runner.decode(ids, positions)
        except Exception as exc:
            # One batched forward: no telling whose input broke it. Fail the batch, keep serving.
            log.exception("decode step failed on %s", self.name)
            for s in self._rows:
                self._fail(s, f"decode failed: {exc}")
            self._rows = []
            self._runner.reset()
            return
        for s in self._rows:
            s.position += 1
        self._sample_and_emit(logits, first_row=0)

    def _sample_and_emit(self, logits: torch.Tensor, first_row: int) -> None:
        rows = self._rows[first_row:]
        logits = logits.float()
        # A model that produces NaN/inf (diverged fine-tune, corrupted weights) fails its
        # requests with an error instead of streaming garbage.
        finite = finite_rows(logits)
        if self.vocab < logits.shape[-1]:
            logits[:, self.vocab :] = float("-inf")
        constrained = [(i, s.matcher) for i, s in enumerate(rows) if s.matcher is not None]
        if constrained:
            self._grammars.apply(logits, constrained)
        healthy = [i for i, ok in enumerate(finite) if ok]
        for i, ok in enumerate(finite):
            if not ok:
                self._fail(rows[i], "the model produced non-finite logits")
        if healthy:
            picked = rows if len(healthy) == len(rows) else [rows[i] for i in healthy]
            sub = logits if len(healthy) == len(rows) else logits[healthy]
            try:
                tokens = sample(
                    sub,
                    [s.params for s in picked],
                    [s.generator for s in picked],
                    [s.generated for s in picked],
                    [s.prompt for s in picked],
                )
                logprobs: list[TokenLogprob | None] = [None] * len(picked)
                asked = [i for i, s in enumerate(picked) if s.params.logprobs is not None]
                if asked:
                    found = token_logprobs(
                        sub[asked] if len(asked) < len(picked) else sub,
                        [tokens[i] for i in asked],
                        [picked[i].params.logprobs for i in asked],
                        self._token_texts,
                    )
                    for i, lp in zip(asked, found, strict=True):
                        logprobs[i] = lp
            except Exception as exc:
                log.exception("sampling failed on %s", self.name)
                for s in picked:
                    self._fail(s, f"sampling failed: {exc}")
                tokens, logprobs = [], []
            for s, token, logprob in zip(picked, tokens, logprobs, strict=True):
                self._advance(s, token, logprob)
        dead = [i for i, s in enumerate(self._rows) if s.done]
        if dead and self._runner.prefix_cache is not None:
            for i in dead:
                s = self._rows[i]
                if s.finished_ok:  # the next turn of a chat sends this answer back
                    self._runner.store_row(i, s.prompt + s.generated[:-1], s.cache_scope)
        self._remove(dead)

    def _advance(self, s: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        s.generated.append(token)
        s.last_token = token
        assert s.stops is not None
        finish = None
        text = ""
        if token in self.stop_ids and not s.params.ignore_eos:
            finish = "stop"
        else:
            text = s.stops.feed(s.detok.step(token))
            if s.stops.stopped or self._grammar_done(s, token):
                finish = "stop"
        if finish is None and (
            len(s.generated) >= s.params.max_tokens
            or len(s.prompt) + len(s.generated) >= self.context_len
        ):
            finish = "length"
        if finish is not None and not s.stops.stopped:
            # The end token itself adds no text; held-back bytes and held-back text (a
            # partial stop string that never completed) are the output's true end.
            text += s.stops.feed(s.detok.flush())
            if s.stops.stopped:
                finish = "stop"
            else:
                text += s.stops.flush()
        if finish is not None:
            s.done = s.finished_ok = True
        first = len(s.generated) == 1
        out = SeqOutput(s.index, text, 1, finish, cached=s.cached if first else 0, logprob=logprob)
        if first:
            out.prompt_logprobs = s.prompt_logprobs
        self._emit(s, out)

    def _grammar_done(self, s: Sequence, token: int) -> bool:
        """Advance the sequence's grammar; True once it can take nothing but an end token."""
        if s.matcher is None:
            return False
        if not s.matcher.consume_token(token):  # the mask allowed it: only on a parser limit
            log.warning("structured output on %s stopped: %s", self.name, s.matcher.get_error())
        return s.matcher.is_stopped()

    def _fail(self, s: Sequence, message: str, refused: bool = False) -> None:
        s.done = True
        self._emit(s, SeqOutput(s.index, "", 0, error=message, refused=refused))

    def _emit(self, s: Sequence, out: SeqOutput) -> None:
        self._out.append((s, out))

    def _flush(self) -> None:
        if not self._out:
            return
        if self.on_outputs is not None:
            outs, self._out = self._out, []
            self.on_outputs([(s.id, out) for s, out in outs])
            return
        by_loop: dict[asyncio.AbstractEventLoop, dict[OutputSink, list[SeqOutput]]] = {}
        for s, out in self._out:
            assert s.loop is not None and s.sink is not None
            by_loop.setdefault(s.loop, {}).setdefault(s.sink, []).append(out)
        self._out = []
        waits = []
        for loop, by_sink in by_loop.items():
            handoff = Handoff()
            with contextlib.suppress(RuntimeError):  # a closed loop: its requests are gone
                loop.call_soon_threadsafe(deliver_outputs, by_sink, handoff)
                waits.append(handoff)
        deadline = time.monotonic() + self.handoff_timeout_s
        for handoff in waits:
            handoff.done.wait(max(0.0, deadline - time.monotonic()))


def deliver_outputs(by_sink: dict[OutputSink, list[SeqOutput]], handoff: Handoff) -> None:
    """On the event loop: hand each sink its outputs of one step."""
    handoff.expect(len(by_sink))
    for sink, outs in by_sink.items():
        sink.push(outs, handoff)
