"""The transformers engine's parts without HTTP: batching, detokenisation, stop strings,
sampling, and the auth and admission building blocks."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import pytest
import torch
from test_serve_support import build_tiny, cache_root
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunedesk.serve.admission import Admission
from tunedesk.serve.auth import ALL_SCOPES, KeyFileError, KeyStore
from tunedesk.serve.engines.local import grammar, sampling
from tunedesk.serve.engines.local.batcher import StepBatcher
from tunedesk.serve.engines.local.detok import IncrementalDetokenizer, StopMatcher
from tunedesk.serve.engines.local.generation import Generation
from tunedesk.serve.engines.local.sampling import (
    SamplingParams,
    finite_rows,
    row_argmax,
    sample,
)
from tunedesk.serve.errors import BadRequest, GatewayTimeout, RateLimited

PROMPTS = [
    "申购费是多少",
    "FOF基金在基金分类里指什么，请详细说明",
    "赎回",
    "管理费每年0.50%至0.70%，托管费每年0.15%；投资本公司管理的基金部分",
]


@pytest.fixture(scope="module")
def tiny(pytestconfig, tmp_path_factory):
    path = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    # The reference generate() runs here; a 64-wide model gains nothing from intra-op threads
    # and loses a lot to them on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, tok
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["lean", "transformers"])
def batcher(tiny, request):
    """Both runners: the lean forward (fastpath.py) and the model's own forward."""
    model, tok = tiny
    lean = request.param == "lean"
    b = StepBatcher(
        model, tok, stop_ids=[2, 0], context_len=2048, max_batch=8, cpu_threads=1, lean=lean
    )
    assert b._runner.name == request.param
    b.start()
    yield b
    b.stop()


async def _generate(batcher, prompt, delay=0.0, **params):
    await asyncio.sleep(delay)
    params.setdefault("max_tokens", 24)
    params.setdefault("temperature", 0.0)
    gen = Generation(batcher, [(prompt, SamplingParams(**params))], time.monotonic() + 60)
    text, tokens, finish = "", 0, None
    while not gen.finished:
        for out in await gen.next_outputs():
            text, tokens = text + out.text, tokens + out.tokens
            finish = out.finish_reason or finish
    return text, tokens, finish


def test_batched_greedy_equals_generate_alone_and_joining_mid_batch(tiny, batcher):
    model, tok = tiny
    prompts = [tok(p)["input_ids"] for p in PROMPTS]

    async def run():
        alone = [await _generate(batcher, p, ignore_eos=True) for p in prompts]
        # Staggered starts: later prompts join a batch that is already decoding.
        together = await asyncio.gather(
            *[_generate(batcher, p, delay=0.03 * i, ignore_eos=True) for i, p in enumerate(prompts)]
        )
        return alone, together

    alone, together = asyncio.run(run())
    assert alone == list(together)
    for p, (text, tokens, finish) in zip(prompts, alone, strict=True):
        ref = model.generate(
            torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert text == tok.decode(ref[0, len(p) :], skip_special_tokens=True)
        assert (tokens, finish) == (24, "length")


def test_one_prefill_of_mixed_lengths_matches_each_alone(tiny, batcher):
    _, tok = tiny
    prompts = [tok(p)["input_ids"] for p in PROMPTS]

    async def run():
        # One submit: all four are prefilled together, left-padded to the longest.
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        gen = Generation(batcher, [(p, params) for p in prompts], time.monotonic() + 60)
        texts = [""] * len(prompts)
        while not gen.finished:
            for out in await gen.next_outputs():
                texts[out.index] += out.text
        return texts

    together = asyncio.run(run())
    alone = [asyncio.run(_generate(batcher, p, max_tokens=12, ignore_eos=True))[0] for p in prompts]
    assert together == alone


def test_seed_reproduces_a_sample_whatever_else_is_in_the_batch(tiny, batcher):
    _, tok = tiny
    a, b = (tok(p)["input_ids"] for p in PROMPTS[:2])

    async def run():
        mixed = await asyncio.gather(
            _generate(batcher, a, temperature=1.0, top_p=0.9, seed=7),
            _generate(batcher, b, temperature=1.0, seed=3),
        )
        alone = await _generate(batcher, a, temperature=1.0, top_p=0.9, seed=7)
        other = await _generate(batcher, a, temperature=1.0, top_p=0.9, seed=8)
        return mixed[0], alone, other

    mixed, alone, other = asyncio.run(run())
    assert mixed == alone
    assert other != alone


def test_logprobs_and_prompt_logprobs_on_both_runners_beside_a_running_batch(tiny, batcher):
    """The prompt is scored by one more forward in the worker: it must give the model's own
    logprobs and leave the batch's cache alone (a neighbour's greedy text is unchanged)."""
    model, tok = tiny
    # Longer than the 256 positions the output head is run over at a time.
    scored = tok(" ".join(PROMPTS) * 12)["input_ids"][:300]
    neighbour = tok(PROMPTS[1])["input_ids"]
    assert len(scored) == 300
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    params.logprobs = params.prompt_logprobs = 3

    async def run():
        gen = Generation(batcher, [(scored, params)], time.monotonic() + 60)
        beside = asyncio.create_task(_generate(batcher, neighbour, delay=0.0, ignore_eos=True))
        outs = []
        while not gen.finished:
            outs += await gen.next_outputs()
        return outs, await beside

    outs, beside = asyncio.run(run())
    assert beside == asyncio.run(_generate(batcher, neighbour, ignore_eos=True))
    with torch.inference_mode():
        logits = model(torch.tensor([scored])).logits[0, :, : len(tok)]
    ref = torch.log_softmax(logits, -1)
    prompt_lps = outs[0].prompt_logprobs
    assert [lp.chosen.token for lp in prompt_lps] == [tok.decode([t]) for t in scored]
    assert prompt_lps[0].chosen.logprob is None and prompt_lps[0].top is None
    for i, lp in enumerate(prompt_lps[1:]):
        assert lp.chosen.logprob == pytest.approx(float(ref[i, scored[i + 1]]), abs=1e-4)
        assert len(lp.top) == 3
    assert all(o.prompt_logprobs is None for o in outs[1:])
    # Greedy: each sampled token is its step's likeliest, the first one after the prompt.
    assert len(outs) == 6 and all(o.logprob.chosen == o.logprob.top[0] for o in outs)
    assert outs[0].logprob.chosen.logprob == pytest.approx(float(ref[-1].max()), abs=1e-4)


def _constrained_greedy_by_hand(model, tok, prompt, grammar, stop_ids, steps):
    """The reference: the model's whole forward each step, masked through llguidance's
    byte-per-token API (not the bitmask the batcher reads), the likeliest allowed token."""
    import llguidance
    import llguidance.hf

    matcher = llguidance.LLMatcher(
        llguidance.hf.from_tokenizer(tok, n_vocab=len(tok), eos_token=stop_ids), grammar
    )
    ids, out = list(prompt), []
    for _ in range(steps):
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, -1, : len(tok)]
        allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)
        token = int(logits.masked_fill(allowed[: len(tok)] == 0, float("-inf")).argmax())
        if token in stop_ids:
            break
        assert matcher.consume_token(token)
        ids.append(token)
        out.append(token)
        if matcher.is_stopped():
            break
    return tok.decode(out)


@pytest.mark.parametrize(
    "make, check",
    [
        (
            lambda: grammar.regex_grammar("[0-9]{3}-[a-z]{2}"),
            lambda text: re.fullmatch("[0-9]{3}-[a-z]{2}", text),
        ),
        (
            lambda: grammar.json_schema_grammar(
                {
                    "type": "object",
                    "properties": {"risk": {"enum": ["低", "高"]}, "n": {"type": "integer"}},
                    "required": ["risk", "n"],
                    "additionalProperties": False,
                },
                any_whitespace=False,
            ),
            lambda text: set(json.loads(text)) == {"risk", "n"},
        ),
    ],
    ids=["regex", "json-schema"],
)
def test_grammar_masks_its_own_row_and_ends_the_output_where_the_grammar_ends(
    tiny, batcher, make, check
):
    model, tok = tiny
    prompt, neighbour = tok(PROMPTS[0])["input_ids"], tok(PROMPTS[1])["input_ids"]
    constraint = make()

    async def run():
        # ignore_eos: the grammar's end alone must stop it. The neighbour shares its steps
        # and comes first in the batch, so the masked row is not the batch's first.
        return await asyncio.gather(
            _generate(
                batcher, prompt, delay=0.02, max_tokens=40, ignore_eos=True, grammar=constraint
            ),
            _generate(batcher, neighbour, ignore_eos=True),
        )

    (text, _, finish), beside = asyncio.run(run())
    assert finish == "stop"
    assert check(text), text
    assert text == _constrained_greedy_by_hand(model, tok, prompt, constraint, [2, 0], 40)
    assert beside == asyncio.run(_generate(batcher, neighbour, ignore_eos=True))


def test_a_grammar_that_cannot_be_built_fails_only_its_own_request(tiny, batcher):
    _, tok = tiny
    bad = 'start: "a" b'  # not validated on its way in (the server validates), `b` undefined
    with pytest.raises(BadRequest, match="structured output"):  # the request's fault: a 400
        asyncio.run(_generate(batcher, tok(PROMPTS[0])["input_ids"], grammar=bad))
    assert asyncio.run(_generate(batcher, tok(PROMPTS[0])["input_ids"]))[2] is not None


def test_a_tokenizer_llguidance_cannot_read_leaves_free_text_serving():
    class NotFast:  # looks like a fast tokenizer, is not one: llguidance refuses it
        backend_tokenizer = None
        eos_token_id = 2

    constraint = grammar.regex_grammar("[0-9]+")
    for tokenizer, reason in ((object(), "fast"), (NotFast(), "off for this model")):
        masks = grammar.GrammarMasks(tokenizer, frozenset({2}), 100)
        masks.prepare()  # at engine start: must not raise
        with pytest.raises(grammar.GrammarError, match=reason):
            masks.matcher(constraint)


def test_end_of_turn_token_stops_without_text(tiny):
    model, tok = tiny
    prompt = tok(PROMPTS[0])["input_ids"]
    first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    # Make the token the model is about to emit an end token: generation stops on it.
    b = StepBatcher(model, tok, stop_ids=[first], context_len=2048, max_batch=2, cpu_threads=1)
    b.start()
    try:
        text, tokens, finish = asyncio.run(_generate(b, prompt, max_tokens=10))
        assert (text, tokens, finish) == ("", 1, "stop")
        text, tokens, finish = asyncio.run(_generate(b, prompt, max_tokens=3, ignore_eos=True))
        assert (tokens, finish) == (3, "length")
    finally:
        b.stop()


def test_stop_string_is_cut_and_not_emitted(tiny, batcher):
    _, tok = tiny
    prompt = tok(PROMPTS[0])["input_ids"]
    full, _, _ = asyncio.run(_generate(batcher, prompt, max_tokens=30, ignore_eos=True))
    stop = full[4:7]
    assert len(stop) == 3
    text, _, finish = asyncio.run(
        _generate(batcher, prompt, max_tokens=30, stop=[stop], ignore_eos=True)
    )
    assert text == full[: full.index(stop)]
    assert finish == "stop"


def test_deadline_times_out_and_frees_the_slot(tiny, batcher):
    _, tok = tiny
    prompt = tok(PROMPTS[0])["input_ids"]

    async def run():
        params = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
        gen = Generation(batcher, [(prompt, params)], time.monotonic() + 0.3)
        with pytest.raises(GatewayTimeout):
            while not gen.finished:
                await gen.next_outputs()
        assert gen.close() is True

    asyncio.run(run())
    deadline = time.monotonic() + 5
    while batcher.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_incremental_detokenizer_matches_full_decode(tiny):
    _, tok = tiny
    text = "申购费1.5%，T+1到账。Fund fees: 0.15% p.a.；管理费每年0.50%"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok)
    pieces = [d.step(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # Random ids split characters mid-byte; held-back bytes come out at the end, as decode has.
    rng = random.Random(0)
    for generic in (False, True):
        for _ in range(30):
            ids = [rng.randrange(len(tok)) for _ in range(30)]
            d = IncrementalDetokenizer(tok)
            if generic:
                d._stream = None  # the any-tokenizer path
            out = "".join(d.step(i) for i in ids) + d.flush()
            assert out == tok.decode(ids, skip_special_tokens=True)


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END", "。\n"])
    assert m.feed("abc E") == "abc "
    assert m.feed("N") == ""
    assert m.feed("x") == "ENx"
    assert m.feed("好。") == "好"
    assert m.feed("\n后面") == ""
    assert m.stopped and m.text == "abc ENx好"
    m = StopMatcher(["END"])
    assert m.feed("aEN") == "a"
    assert m.flush() == "EN"


def test_sampling_temperature_top_p_penalties_and_seed():
    logits = torch.tensor([[2.0, 1.9, -5.0, 0.0], [2.0, 1.9, -5.0, 0.0]])
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    # Greedy picks the argmax; a frequency penalty on what was already said changes it.
    assert sample(logits, [greedy, greedy], [None, None], [[], []]) == [0, 0]
    penalised = SamplingParams(max_tokens=1, temperature=0.0, frequency_penalty=0.2)
    assert sample(logits[:1], [penalised], [None], [[0]]) == [1]
    presence = SamplingParams(max_tokens=1, temperature=0.0, presence_penalty=0.5)
    assert sample(logits[:1], [presence], [None], [[0, 0, 0]]) == [1]
    # top_p small enough keeps only the top token, however hot the temperature.
    narrow = SamplingParams(max_tokens=1, temperature=2.0, top_p=0.3, seed=1)
    gens = [narrow.make_generator(torch.device("cpu")) for _ in range(1)]
    assert {sample(logits[:1], [narrow], gens, [[]])[0] for _ in range(20)} == {0}
    # A seed fixes the draws; no seed draws fresh ones.
    hot = SamplingParams(max_tokens=1, temperature=1.5, seed=42)

    def draws(p):
        g = p.make_generator(torch.device("cpu"))
        return [sample(logits[:1], [p], [g], [[]])[0] for _ in range(30)]

    assert draws(hot) == draws(hot)
    assert len(set(draws(hot))) > 1


def test_sampling_vllm_extensions_top_k_min_p_repetition_penalty():
    logits = torch.tensor([[2.0, 1.9, -3.0, 0.0, -1.0]])
    cpu = torch.device("cpu")

    def draws(p, n=400):
        g = p.make_generator(cpu)
        return {sample(logits, [p], [g], [[]])[0] for _ in range(n)}

    # Hot enough that every token shows up without a filter.
    assert draws(SamplingParams(max_tokens=1, temperature=2.0, seed=3)) == {0, 1, 2, 3, 4}
    assert draws(SamplingParams(max_tokens=1, temperature=2.0, top_k=2, seed=3)) == {0, 1}
    assert draws(SamplingParams(max_tokens=1, temperature=2.0, top_k=1, seed=3)) == {0}
    # min_p after temperature: at 1.0 token 3 has 0.14x the top token's probability.
    assert draws(SamplingParams(max_tokens=1, temperature=1.0, min_p=0.2, seed=3)) == {0, 1}
    assert draws(SamplingParams(max_tokens=1, temperature=1.0, min_p=0.1, seed=3)) == {0, 1, 3}
    # A repetition penalty counts the prompt too, and applies to greedy decoding: 2.0 / 1.1
    # falls below 1.9; a negative logit is multiplied, so it sinks further.
    rep = SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=1.1)
    assert sample(logits, [rep], [None], [[]], [[0]]) == [1]
    assert sample(logits, [rep], [None], [[0]], [[]]) == [1]
    assert sample(logits, [rep], [None], [[]], [[4]]) == [0]
    penalised = sampling._adjust_logits(logits[0], [4, 2], [], rep)
    assert penalised[4] == pytest.approx(-1.1) and penalised[2] == pytest.approx(-3.3)
    assert penalised[0] == 2.0  # not seen: untouched


def test_logit_bias_comes_before_the_penalties_and_steers_greedy_too():
    logits = torch.tensor([[2.0, 1.9, -3.0, 0.0, -1.0]])
    biased = SamplingParams(max_tokens=1, temperature=0.0, logit_bias={4: 3.5})
    assert sample(logits, [biased], [None], [[]]) == [4]  # -1.0 + 3.5 beats 2.0
    # vLLM's order: bias first, then a repetition penalty on the biased logit (2.5 / 2 < 1.9).
    both = SamplingParams(
        max_tokens=1, temperature=0.0, logit_bias={4: 3.5}, repetition_penalty=2.0
    )
    assert sample(logits, [both], [None], [[]], [[4]]) == [0]
    hot = SamplingParams(max_tokens=1, temperature=1.0, logit_bias={0: -100, 1: -100}, seed=1)
    g = hot.make_generator(torch.device("cpu"))
    assert {sample(logits, [hot], [g], [[]])[0] for _ in range(200)}.isdisjoint({0, 1})


def test_token_logprobs_are_raw_and_token_bytes_rebuild_split_characters(tiny):
    from tunedesk.serve.engines.local.logprobs import TokenTexts, token_logprobs

    _, tok = tiny
    texts = TokenTexts(tok)
    # A rare character is several byte tokens: each alone is U+FFFD, their bytes join into it.
    for text in ("龘鬱基金", "hello world", tok.eos_token):
        ids = tok.encode(text)
        raw = b"".join(bytes(texts(i)[1]) for i in ids)
        assert raw.decode() == text, ids
    assert any(texts(i)[0] == "\ufffd" for i in tok.encode("龘"))
    # Rows of one step, each with its own k, through one log_softmax and one topk.
    logits = torch.tensor([[1.0, 3.0, 2.0, float("-inf")], [0.5, -1.0, 4.0, 0.0]])
    lps = token_logprobs(logits, [2, 1], [2, 0], texts)
    expected = torch.log_softmax(logits, -1)
    assert lps[0].chosen.logprob == pytest.approx(float(expected[0, 2]))
    assert [c.logprob for c in lps[0].top] == pytest.approx(
        [float(expected[0, 1]), float(expected[0, 2])]
    )
    assert [c.token for c in lps[0].top] == [texts(1)[0], texts(2)[0]]
    assert lps[1].chosen.logprob == pytest.approx(float(expected[1, 1]))
    assert lps[1].top == ()
    deeper = token_logprobs(logits, [2, 2], [1, 3], texts)  # a row's k does not limit another's
    assert [c.token for c in deeper[0].top] == [texts(1)[0]]
    assert [c.token for c in deeper[1].top] == [texts(i)[0] for i in (2, 0, 3)]


def test_row_argmax_and_finite_rows_agree_with_torch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 6016, generator=gen)
    logits[3, 7] = logits[3, 100] = 50.0  # a tie: the first index wins, as in torch
    logits[5, 9] = float("nan")
    logits[6, 0] = float("inf")
    logits[7, 1] = float("-inf")
    assert row_argmax(logits) == logits.argmax(dim=-1).tolist()
    assert row_argmax(logits)[3] == 7
    assert finite_rows(logits) == torch.isfinite(logits).all(dim=-1).tolist()
    assert [i for i, ok in enumerate(finite_rows(logits)) if not ok] == [5, 6, 7]
    # Views (a column slice, rows picked out) and other dtypes go through the same answers.
    view = logits[::2, 10:]
    assert row_argmax(view) == view.argmax(dim=-1).tolist()
    assert finite_rows(view) == torch.isfinite(view).all(dim=-1).tolist()
    half = logits.to(torch.bfloat16)
    assert finite_rows(half) == torch.isfinite(half).all(dim=-1).tolist()
    assert row_argmax(half) == half.argmax(dim=-1).tolist()


def test_key_store_scopes_and_constant_time_lookup(tmp_path):
    f = tmp_path / "keys"
    f.write_text(
        "# comment\nsk-full\n\nsk-widget name=widget scopes=chat models=ft:a,ft:b  # the widget\n"
    )
    store = KeyStore.load(["sk-env"], f)
    assert len(store) == 3 and not store.open
    assert store.verify("sk-env").name == "key-1"
    full = store.verify("sk-full")
    assert full.scopes == ALL_SCOPES and full.models is None
    widget = store.verify("sk-widget")
    assert widget.name == "widget" and widget.scopes == {"chat"}
    assert widget.allows_model("ft:a") and not widget.allows_model("base")
    assert store.verify("sk-nope") is None and store.verify("") is None
    f.write_text("sk-secret-value colour=blue\n")
    with pytest.raises(KeyFileError) as exc:
        KeyStore.load([], f)
    assert "sk-secret-value" not in str(exc.value) and ":1:" in str(exc.value)
    assert KeyStore.load([], None).open


def test_admission_bounds_running_plus_queued():
    a = Admission(max_running=2, max_queued=1, retry_after_s=3)
    t1, t2 = a.acquire(), a.acquire(weight=1)
    t3 = a.acquire()
    assert (a.running, a.queued) == (2, 1)
    with pytest.raises(RateLimited) as exc:
        a.acquire()
    assert exc.value.status == 429 and exc.value.headers["Retry-After"] == "3"
    with pytest.raises(BadRequest):
        a.acquire(weight=4)
    t3.release()
    t3.release()  # idempotent
    assert a.active == 2
    t1.release(), t2.release()
    assert a.active == 0


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        "中文，标点。",
        'quote " and \\ backslash',
        "line\nbreak\ttab",
        "\x01\x1f ctrl",
        "😀",
        "",
    ],
)
def test_chunk_template_renders_what_pydantic_renders(text):
    from tunedesk.serve.engines.local.formats import ChatFormat, CompletionFormat
    from tunedesk.serve.protocol import (
        ChatCompletionChunk,
        ChoiceDelta,
        ChunkChoice,
        Completion,
        CompletionChoice,
    )
    from tunedesk.serve.streaming import sse

    chat = ChatFormat("m", include_usage=False)
    expected = sse(
        ChatCompletionChunk(
            id=chat.id,
            created=chat.created,
            model="m",
            choices=[ChunkChoice(index=3, delta=ChoiceDelta(content=text))],
        ),
        exclude={"usage"},
    )
    assert chat._text.render(3, text) == expected
    completion = CompletionFormat("m", include_usage=True)
    expected = sse(
        Completion(
            id=completion.id,
            created=completion.created,
            model="m",
            choices=[CompletionChoice(text=text, index=0, finish_reason=None)],
        )
    )
    assert completion._text.render(0, text) == expected


@pytest.mark.parametrize("model", ["m", 'ft-987654321 "index":987654321 tunedesk-id-slot', "模型"])
def test_chunks_from_cached_samples_match_pydantic(model):
    # The per-model samples hold slots for the id, time and index: a model whose name looks
    # like a slot must still get its own name back, and every response its own id.
    from tunedesk.serve.engines.local.formats import ChatFormat, CompletionFormat
    from tunedesk.serve.protocol import (
        ChatCompletionChunk,
        ChoiceDelta,
        ChunkChoice,
        Completion,
        CompletionChoice,
    )
    from tunedesk.serve.streaming import sse

    first, chat = ChatFormat(model, include_usage=True), ChatFormat(model, include_usage=True)
    assert first.id != chat.id
    role = ChoiceDelta(role="assistant", content="")
    expected = b"".join(
        sse(
            ChatCompletionChunk(
                id=chat.id,
                created=chat.created,
                model=model,
                choices=[ChunkChoice(index=i, delta=role)],
            )
        )
        for i in range(3)
    )
    assert chat.opening(3) == expected
    text = ChatCompletionChunk(
        id=chat.id,
        created=chat.created,
        model=model,
        choices=[ChunkChoice(index=12, delta=ChoiceDelta(content="答"))],
    )
    assert chat._text.render(12, "答") == sse(text)
    completion = CompletionFormat(model, include_usage=False)
    expected = sse(
        Completion(
            id=completion.id,
            created=completion.created,
            model=model,
            choices=[CompletionChoice(text="x", index=7, finish_reason=None)],
        ),
        exclude={"usage"},
    )
    assert completion._text.render(7, "x") == expected
