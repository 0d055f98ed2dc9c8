"""The prefix cache: prompts that start like earlier ones skip prefilling the shared blocks.

The numbers must stay the model's: a prompt prefilled over cached blocks gets the logits the
transformers forward gives for the whole prompt, and so does every decode step after it (the
slab then holds rows whose padding sits between the prefix and the rest). End to end, the
official client reads `usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time

import httpx
import pytest
import torch
from openai import OpenAI
from test_serve_fastpath import CONFIGS, SMALL, _left_pad, _model, _reference_last_logits
from test_serve_support import build_tiny, cache_root, metric, serve
from transformers import AutoTokenizer, Qwen2Config

from tunedesk.chat_format import encode_messages, encode_prompt
from tunedesk.serve.engines.local.batcher import StepBatcher
from tunedesk.serve.engines.local.fastpath import LeanDecoder
from tunedesk.serve.engines.local.generation import Generation
from tunedesk.serve.engines.local.prefix_cache import CacheScope, PrefixCache
from tunedesk.serve.engines.local.runners import LeanRunner
from tunedesk.serve.engines.local.sampling import SamplingParams
from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings


def _kv(tokens: int, fill: float = 0.0) -> torch.Tensor:
    """Stand-in keys and values: [layers 2, 2, kv_heads 1, tokens, head_dim 4]."""
    return torch.full((2, 2, 1, tokens, 4), fill)


# --- the cache itself --------------------------------------------------------------------


def test_scopes_share_nothing():
    pc = PrefixCache(budget_bytes=1 << 20, block_size=4)
    prompt = list(range(9))
    a, b = CacheScope("tenant-a"), CacheScope("tenant-b")
    pc.store(prompt, [], _kv(8), scope=a)
    assert len(pc.match(prompt, scope=a)) == 2
    assert pc.match(prompt, scope=b) == [] and pc.match(prompt) == []
    pc.store(prompt, [], _kv(8), scope=b)  # its own copy, not a's
    assert len(pc) == 4 and len(pc.match(prompt, scope=b)) == 2


def test_a_salt_branches_off_after_the_shared_head():
    pc = PrefixCache(budget_bytes=1 << 20, block_size=4)
    prompt = list(range(13))  # three whole blocks, and a last token
    one = CacheScope("widget", salt="visitor-1", shared=6)  # the head's one whole block
    pc.store(prompt, [], _kv(12), scope=one)
    assert len(pc.match(prompt, scope=one)) == 3
    # Another visitor of the key reuses the shared block only; the key without a salt, or a
    # salt that shares nothing, not even that (vLLM's meaning of a salt).
    two = CacheScope("widget", salt="visitor-2", shared=6)
    assert [b.tokens for b in pc.match(prompt, scope=two)] == [(0, 1, 2, 3)]
    assert len(pc.match(prompt, scope=CacheScope("widget"))) == 1
    assert pc.match(prompt, scope=CacheScope("widget", salt="visitor-1")) == []
    assert pc.match(prompt, scope=CacheScope("other", salt="visitor-1", shared=6)) == []
    # The second visitor's own blocks hang off the shared one: 1 shared + 2 + 2.
    pc.store(prompt, pc.match(prompt, scope=two), _kv(8), scope=two)
    assert len(pc) == 5 and len(pc.match(prompt, scope=two)) == 3


def test_whole_blocks_match_and_the_last_token_is_always_left_to_prefill():
    pc = PrefixCache(budget_bytes=1 << 20, block_size=4)
    prompt = list(range(10))  # blocks [0-3] [4-7], and 2 tokens that make no block
    assert pc.match(prompt) == []
    pc.store(prompt, [], _kv(8))
    assert len(pc) == 2
    assert [b.tokens for b in pc.match(prompt)] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    # A prompt that is exactly the cached blocks keeps its last block to prefill.
    assert [b.tokens for b in pc.match(list(range(8)))] == [(0, 1, 2, 3)]
    # A prompt that differs inside the second block matches the first only; one that differs
    # in the first matches nothing, even where later tokens agree.
    assert len(pc.match([0, 1, 2, 3, 4, 5, 99, 7, 8])) == 1
    assert pc.match([99, 1, 2, 3, 4, 5, 6, 7, 8]) == []
    # The same tokens after a different first block are a different block.
    pc.store([9, 9, 9, 9, 4, 5, 6, 7, 1], [], _kv(8))
    assert len(pc) == 4
    # Storing after a matched prefix keeps only the new blocks, copied from `kv`.
    chain = pc.match(list(range(13)))
    pc.store(list(range(13)), chain, _kv(4, fill=7.0))
    third = pc.match(list(range(13)))[2]
    assert third.tokens == (8, 9, 10, 11) and bool((third.kv == 7.0).all())


def test_least_recently_used_blocks_go_first_tails_before_heads():
    block_bytes = _kv(4).numel() * 4
    pc = PrefixCache(budget_bytes=4 * block_bytes, block_size=4)
    a = [1] * 4 + [2] * 4 + [3] * 4 + [0]
    b = [5] * 4 + [6] * 4 + [0]
    pc.store(a, [], _kv(12))
    pc.store(b, [], _kv(8))  # 5 blocks > budget of 4: the least recent goes
    assert pc.bytes == 4 * block_bytes and len(pc) == 4
    # a's tail went, not its head: a still matches its first two blocks.
    assert len(pc.match(a)) == 2 and len(pc.match(b)) == 2
    pc.store([7] * 4 + [0], [], _kv(4))  # a is least recent now: its tail goes first again
    assert len(pc.match(a)) == 1 and len(pc.match(b)) == 2
    # Blocks matched for a prompt may be evicted before it stores its own (other rows of the
    # group store first): what it adds under a parent that is gone is never matched.
    chain = pc.match(b)
    for filler in range(4):
        pc.store([20 + filler] * 4 + [0], [], _kv(4))
    assert pc.match(b) == []
    pc.store(b + [8, 8, 8, 8], chain, _kv(4))
    assert pc.match(b + [8, 8, 8, 8, 0]) == [] and pc.bytes <= pc.budget_bytes
    pc.clear()
    assert len(pc) == 0 and pc.bytes == 0 and pc.match(a) == []


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_over_cached_blocks_matches_the_transformers_forward(name):
    """Prompts sharing a system-prompt-like head: the first group fills the cache, the next
    ones (different lengths, some sharing more blocks than others) are prefilled over it; their
    logits, and those of the decode steps after, equal the forward over each row's tokens."""
    model = _model(CONFIGS[name]())
    reference = _model(CONFIGS[name]())
    runner = LeanRunner(LeanDecoder(model), torch.device("cpu"), PrefixCache(1 << 24, 4))
    pc = runner.prefix_cache
    rng = random.Random(3)
    head = [rng.randrange(300) for _ in range(10)]  # two whole blocks and a half
    first = [head + [rng.randrange(300) for _ in range(n)] for n in (3, 9)]
    rows: list[list[int]] = []
    with torch.inference_mode():
        ids, mask = _left_pad(first)
        logits = runner.prefill(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        rows += [list(p) for p in first]
        assert len(pc) >= 3  # head's 2 blocks, and the longer prompt's own third one
        # Next: one prompt that shares 3 blocks with first[1], two that share the head's 2.
        later = [first[1][:12] + [rng.randrange(300) for _ in range(n)] for n in (1,)]
        later += [head[:8] + [rng.randrange(300) for _ in range(n)] for n in (1, 7)]
        groups: dict[int, list[list[int]]] = {}
        chains = {}
        for p in later:
            chain = pc.match(p)
            chains[tuple(p)] = chain
            groups.setdefault(len(chain), []).append(p)
        assert sorted(groups) == [2, 3]
        all_logits = [logits]
        for blocks, prompts in groups.items():
            cached = blocks * 4
            ids, mask = _left_pad([p[cached:] for p in prompts])
            positions = (mask.cumsum(-1) - 1).clamp(min=0) + cached
            all_logits.append(
                runner.prefill(ids, mask, positions, [chains[tuple(p)] for p in prompts])
            )
            rows += [list(p) for p in prompts]
        logits = torch.cat(all_logits)
        for _step in range(5):
            for row, lg in zip(rows, logits, strict=True):
                torch.testing.assert_close(
                    lg, _reference_last_logits(reference, row), atol=1e-4, rtol=1e-4
                )
            nxt = logits.argmax(-1)
            for row, t in zip(rows, nxt.tolist(), strict=True):
                row.append(t)
            logits = runner.decode(nxt[:, None], torch.tensor([[len(r) - 1] for r in rows]))


# --- in the batcher -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(pytestconfig, tmp_path_factory):
    """The tiny model's tokenizer over random weights with sharp logits: greedy text then
    changes when anything about a position or a cached key is off (the trained tiny model's
    answers are too robust to show it)."""
    path = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    tok = AutoTokenizer.from_pretrained(path)
    config = Qwen2Config(**{**SMALL, "vocab_size": len(tok)}, num_key_value_heads=2)
    model = _model(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, tok
    torch.set_num_threads(threads)


SYSTEM = (
    "你是基金公司的客服助手，回答要简洁准确，涉及费率时给出具体数字，不确定时请用户咨询人工客服。"
)
QUESTIONS = ["申购费是多少？", "赎回多久到账？", "FOF基金指什么？", "定投"]


def _conversation(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def _run(batcher, prompts: list[list[int]]) -> tuple[list[str], list[int]]:
    """One request with these prompts as its choices; texts and cached tokens per choice."""
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    gen = Generation(batcher, [(p, params) for p in prompts], time.monotonic() + 60)
    texts, cached = [""] * len(prompts), [0] * len(prompts)
    while not gen.finished:
        for out in await gen.next_outputs():
            texts[out.index] += out.text
            cached[out.index] = max(cached[out.index], out.cached)
    return texts, cached


@pytest.fixture
def batchers(tiny):
    """The model without a prefix cache, and with a fresh one."""
    model, tok = tiny
    pair = [
        StepBatcher(model, tok, [2], 2048, max_batch=8, cpu_threads=1, prefix_cache_bytes=size)
        for size in (0, 64 << 20)
    ]
    for b in pair:
        b.start()
    yield pair
    for b in pair:
        b.stop()


def test_shared_system_prompt_is_prefilled_once_and_greedy_text_is_unchanged(tiny, batchers):
    _, tok = tiny
    plain, cached = batchers
    prompts = [encode_prompt(tok, _conversation(q)) for q in QUESTIONS]
    shared = 0
    while all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    assert shared >= 32  # the system prompt spans whole blocks
    expected = [asyncio.run(_run(plain, [p]))[0][0] for p in prompts]
    assert cached._runner.prefix_cache is not None and len(cached._runner.prefix_cache) == 0
    first_text, first_cached = asyncio.run(_run(cached, [prompts[0]]))
    assert first_text == [expected[0]] and first_cached == [0]
    # The others, together in one prefill: each skips the shared whole blocks.
    texts, hits = asyncio.run(_run(cached, prompts[1:]))
    assert texts == expected[1:]
    assert hits == [shared // 16 * 16] * 3
    # The same prompt again: everything but the blocks holding its last token.
    again, hit = asyncio.run(_run(cached, [prompts[0]]))
    assert again == [expected[0]] and hit == [(len(prompts[0]) - 1) // 16 * 16]


async def _generate_ids(batcher, prompt: list[int], max_tokens: int) -> tuple[list[int], int]:
    """Greedy token ids for one prompt, and how many prompt tokens were cached."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    gen = Generation(batcher, [(prompt, params)], time.monotonic() + 60)
    cached = 0
    while not gen.finished:
        for out in await gen.next_outputs():
            cached = max(cached, out.cached)
    gen.close()
    return list(gen._seqs[0].generated), cached


def test_a_finished_answer_is_cached_for_the_next_turn(tiny, batchers):
    """The next turn of a chat sends the answer back: its blocks, taken from the batch's cache
    when the row finished, are reused, and the continuation is the same as without them."""
    _, tok = tiny
    plain, cached = batchers
    first = encode_prompt(tok, _conversation(QUESTIONS[0]))
    answer, _ = asyncio.run(_generate_ids(cached, first, 40))
    assert answer == asyncio.run(_generate_ids(plain, first, 40))[0]
    # Next turn: the prompt, the answer the model read (all but its last token) and more.
    follow = first + answer + tok("\n再问一个问题：赎回多久到账？")["input_ids"]
    expected, none = asyncio.run(_generate_ids(plain, follow, 12))
    got, hit = asyncio.run(_generate_ids(cached, follow, 12))
    assert none == 0 and got == expected
    read = len(first) + len(answer) - 1  # the last answer token never went through a forward
    assert hit == read // 16 * 16 and hit > (len(first) - 1) // 16 * 16


# --- end to end ---------------------------------------------------------------------------


KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"


@pytest.fixture(scope="module")
def servers(pytestconfig, tmp_path_factory):
    tiny_path = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    registry = ModelRegistry()
    registry.register("tiny", str(tiny_path))
    on = ServeSettings(cpu_threads=1, max_running=4, api_keys=[KEY_A, KEY_B])
    off = ServeSettings(cpu_threads=1, max_running=4, api_keys=[KEY_A], prefix_cache_mb=0)
    with serve(on, registry) as with_cache, serve(off, registry) as without:
        yield with_cache, without


def test_usage_reports_cached_prompt_tokens_to_the_openai_client(servers, caplog):
    caplog.set_level(logging.INFO, logger="tunedesk.serve.access")
    with_cache, without = servers
    kw = dict(model="tiny", max_tokens=12, temperature=0)
    results = {}
    for label, server in (("on", with_cache), ("off", without)):
        client = OpenAI(base_url=server.base_url, api_key=KEY_A, max_retries=0, timeout=60)
        first = client.chat.completions.create(messages=_conversation(QUESTIONS[0]), **kw)
        second = client.chat.completions.create(messages=_conversation(QUESTIONS[1]), **kw)
        chunks = list(
            client.chat.completions.create(
                messages=_conversation(QUESTIONS[2]),
                stream=True,
                stream_options={"include_usage": True},
                **kw,
            )
        )
        results[label] = (first, second, chunks)
    first, second, chunks = results["on"]
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    hit = second.usage.prompt_tokens_details.cached_tokens
    assert hit >= 32 and hit % 16 == 0 and hit < second.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == hit  # same system prompt
    # Without the cache: nothing cached, and the same answers token for token.
    off_first, off_second, off_chunks = results["off"]
    assert off_second.usage.prompt_tokens_details.cached_tokens == 0
    assert second.choices[0].message.content == off_second.choices[0].message.content
    assert first.choices[0].message.content == off_first.choices[0].message.content

    def text(cs):
        return "".join(c.choices[0].delta.content or "" for c in cs if c.choices)

    assert text(chunks) == text(off_chunks)
    # Operators see it too: the metric and the access log line.
    auth = {"Authorization": f"Bearer {KEY_A}"}
    exposed = httpx.get(f"{with_cache.url}/metrics", headers=auth, timeout=10).text
    assert metric(exposed, "tunedesk_cached_prompt_tokens_total", model="tiny") == 2 * hit
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("access")]
    logged = [x.get("cached_tokens") for x in lines if x.get("path") == "/v1/chat/completions"]
    assert logged == [None, hit, hit, None, None, None]  # the server without a cache: none


def test_one_api_key_never_hits_what_another_key_cached(servers):
    """A hit answers faster than a miss: shared across keys, the cache would tell one tenant
    what another asked. Each key has its own prefix scope."""
    with_cache, _ = servers
    a, b = (
        OpenAI(base_url=with_cache.base_url, api_key=k, max_retries=0, timeout=60)
        for k in (KEY_A, KEY_B)
    )
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "租户B的问题"}]
    kw = dict(model="tiny", messages=messages, max_tokens=4, temperature=0)
    a.chat.completions.create(**kw)
    # Key A has this prompt cached now; key B gets nothing of it, not even the system prompt.
    assert a.chat.completions.create(**kw).usage.prompt_tokens_details.cached_tokens >= 32
    assert b.chat.completions.create(**kw).usage.prompt_tokens_details.cached_tokens == 0
    again = b.chat.completions.create(**kw).usage
    assert again.prompt_tokens_details.cached_tokens == (again.prompt_tokens - 1) // 16 * 16


def test_a_cache_salt_narrows_sharing_within_a_key(servers):
    """vLLM's `cache_salt`, honoured here too: requests share cached prefixes only with the
    same key and the same salt."""
    with_cache, _ = servers
    client = OpenAI(base_url=with_cache.base_url, api_key=KEY_A, max_retries=0, timeout=60)
    messages = _conversation("加盐的问题")
    kw = dict(model="tiny", messages=messages, max_tokens=2, temperature=0)

    def cached(**extra) -> int:
        usage = client.chat.completions.create(**kw, extra_body=extra or None).usage
        return usage.prompt_tokens_details.cached_tokens

    cached()  # this key's unsalted cache now holds the prompt (whatever ran before)
    unsalted = cached()
    assert unsalted >= 32
    assert cached(cache_salt="user-1") == 0  # a salt starts its own scope
    assert cached(cache_salt="user-1") == unsalted  # and shares within it: the whole prompt
    assert cached(cache_salt="user-2") == 0
    # vLLM's rule for a salt, so that one works on every engine or on none.
    for salt in ("", "a/b", "a@b", "a\\b", "x" * 129):
        bad = httpx.post(
            f"{with_cache.base_url}/chat/completions",
            json={**kw, "cache_salt": salt},
            headers={"Authorization": f"Bearer {KEY_A}"},
            timeout=30,
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt", salt
    assert cached(cache_salt="x" * 128) == 0


def test_a_salt_can_leave_the_system_turn_shared(servers, pytestconfig, tmp_path_factory):
    """What the widget sends: a salt per visitor with `cache_share_system`. Each visitor
    reuses the key's cached system turn (whole blocks of it), never another's conversation."""
    with_cache, _ = servers
    tok = AutoTokenizer.from_pretrained(build_tiny(cache_root(pytestconfig, tmp_path_factory)))
    client = OpenAI(base_url=with_cache.base_url, api_key=KEY_A, max_retries=0, timeout=60)
    messages = _conversation("我的手机号是13800000000，帮我查一下")
    system_blocks = len(encode_messages(tok, messages[:1])) // 16 * 16
    assert system_blocks >= 32

    def cached(salt: str) -> int:
        usage = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=2,
            temperature=0,
            extra_body={"cache_salt": salt, "cache_share_system": True},
        ).usage
        return usage.prompt_tokens_details.cached_tokens

    client.chat.completions.create(model="tiny", messages=messages[:1], max_tokens=1)
    assert cached("visitor-1") == system_blocks  # the system turn, not the question
    assert cached("visitor-1") > system_blocks  # a visitor's own history: the whole prompt
    assert cached("visitor-2") == system_blocks  # the next visitor: the system turn only
