"""Where vLLM is installed, GPU or not: its own CLI accepts the `vllm serve` command the vLLM
engine runs, and its own chat rendering gives the prompt tokens tunedesk trains and serves
with. A renamed flag or a template that vLLM renders differently fails here, on CPU, instead
of at a GPU server's start or in its answers. Skipped without vLLM (CI; `pip install
'tunedesk[vllm]'`, or the bare wheel with `--no-deps` plus what it imports, runs them)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_serve_support import build_tiny, cache_root, options_model, vllm_launch

from tunedesk.serve.engines.vllm import chat_template_file, launch_for
from tunedesk.serve.model_ref import build_registry

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="needs vLLM installed (no GPU needed)"
)

# Without a GPU vLLM can't tell its platform; its CPU platform is enough to parse and render.
CPU_PLATFORM = """
from vllm import platforms
if platforms.current_platform.is_unspecified():
    from vllm.platforms.cpu import CpuPlatform
    platforms.current_platform = CpuPlatform()
"""

# vLLM's own `serve` CLI, told to parse and validate only; what it parsed comes back as JSON.
PARSE_WITH_VLLM = (
    CPU_PLATFORM
    + """
import json, sys
import vllm.entrypoints.cli.serve as serve
def parsed(args):
    print("PARSED " + json.dumps(vars(args), default=str))
serve.ServeSubcommand.cmd = staticmethod(parsed)
sys.argv = ["vllm", *sys.argv[1:]]
from vllm.entrypoints.cli.main import main
main()
"""
)

# vLLM's chat pipeline as its server runs it for a request (protocol model -> chat params ->
# renderer -> prompt token ids), with the template file the engine hands `vllm serve`.
RENDER_WITH_VLLM = (
    CPU_PLATFORM
    + """
import inspect, json, sys
from vllm.config import ModelConfig, VllmConfig
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.renderers import renderer_from_config
try:  # vLLM >= 0.33
    from vllm.renderers.chat_utils.chat_template import load_chat_template
except ImportError:  # 0.32
    from vllm.renderers.chat_utils import load_chat_template
model, template_file, conversations = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
template = load_chat_template(template_file)
config = ModelConfig(model=model, tokenizer=model)
renderer = renderer_from_config(VllmConfig(model_config=config))
out = []
for c in conversations:
    c = {"messages": c} if isinstance(c, list) else c  # a request's other fields beside them
    req = ChatCompletionRequest(model="m", max_tokens=1, **c)
    extra = [None] * (len(inspect.signature(req.build_chat_params).parameters) - 2)  # 0.33: +1
    params = req.build_chat_params(template, "auto", *extra)
    if req.tools:  # as vLLM's server hands a request's tools to the template
        params = params.with_defaults({"tools": [t.model_dump() for t in req.tools]})
    _, prompt = renderer.render_messages(req.messages, params)
    [tokens] = renderer.tokenize_prompts([prompt], req.build_tok_params(config))
    out.append(list(tokens["prompt_token_ids"]))
print("RENDERED " + json.dumps(out))
"""
)


def _run(script: str, *args: str, tag: str) -> object:
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith(tag + " ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix(tag + " "))


def test_vllm_own_cli_accepts_the_command_line(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    launch, adapter = vllm_launch(tmp_path, base, rank=64)
    cmd = launch.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.cli.main"]
    args = _run(PARSE_WITH_VLLM, *cmd[3:], tag="PARSED")
    assert args["model_tag"] == str(base.resolve())
    assert args["served_model_name"] == ["assistant"]
    assert args["generation_config"] == "vllm"
    assert args["tensor_parallel_size"] == 2
    assert Path(args["chat_template"]).read_text() == "{{ messages }}"
    assert args["enable_lora"] is True and args["max_lora_rank"] == 64
    [lora] = args["lora_modules"]  # vLLM's LoRAModulePath, as its repr
    assert "name='faq'" in lora and f"path='{adapter.resolve()}'" in lora
    assert args["max_model_len"] == 4096


def test_vllm_renders_the_prompt_tunedesk_trains_and_serves_with(pytestconfig, tmp_path_factory):
    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    conversations = [
        [{"role": "user", "content": "医药和消费有什么基金推荐的"}],
        [{"role": "system", "content": "你是基金客服。"}, {"role": "user", "content": "申购费？"}],
        [
            {"role": "system", "content": "你是基金客服。"},
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "您好，请问有什么可以帮您？"},
            {"role": "user", "content": "定投怎么设置"},
        ],
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "赎回"}, {"type": "text", "text": "多久"}],
            }
        ],
        [
            {"role": "developer", "content": "只答基金。"},
            {"role": "user", "content": " a  b\n\n多行 "},
        ],
        [
            {"role": "developer", "content": "A"},
            {"role": "user", "content": "B"},
            {"role": "system", "content": "C"},
            {"role": "user", "content": "D"},
        ],
        [
            {"role": "user", "content": "问"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "再问"},
        ],
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "fund_fee",
                "description": "申购费率",
                "parameters": {"type": "object", "properties": {"fund": {"type": "string"}}},
            },
        },
        {"type": "function", "function": {"name": "today"}},  # no description, no parameters
    ]
    call = {"id": "call_1", "type": "function", "function": {"name": "fund_fee"}}
    conversations += [
        {"messages": [{"role": "user", "content": "医药基金申购费？"}], "tools": tools},
        {
            "messages": [
                {"role": "system", "content": "你是基金客服。"},
                {"role": "user", "content": "医药基金申购费？"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {**call, "function": {**call["function"], "arguments": '{"fund":"医药"}'}},
                        {**call, "id": "call_2", "function": {"name": "today", "arguments": ""}},
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "0.15%"},
                {"role": "tool", "tool_call_id": "call_2", "content": "2026-11-22"},
                {"role": "user", "content": "那消费呢"},
            ],
            "tools": tools,
        },
    ]
    _assert_rendered_alike(tiny, conversations, tmp_path_factory)


def _assert_rendered_alike(model: Path, conversations: list, tmp_path_factory) -> list[tuple]:
    """vLLM's prompt tokens for each request (messages, or a body with more fields) are the
    ones the transformers engine serves it with."""
    from transformers import AutoTokenizer

    from tunedesk.chat_format import encode_prompt
    from tunedesk.serve.engines.local.serving import prompt_options, template_messages
    from tunedesk.serve.engines.local.tools import tool_use
    from tunedesk.serve.protocol import ChatCompletionRequest

    template = chat_template_file(str(model), tmp_path_factory.mktemp("template"))
    theirs = _run(
        RENDER_WITH_VLLM, str(model), str(template), json.dumps(conversations), tag="RENDERED"
    )
    tok = AutoTokenizer.from_pretrained(model)
    ours = []
    for c in conversations:
        body = ChatCompletionRequest(model="m", **({"messages": c} if isinstance(c, list) else c))
        use = tool_use(body)
        options = prompt_options(body, tok)
        ours.append(
            encode_prompt(tok, template_messages(body.messages), use and use.tools, options)
        )
    for conversation, vllm_ids, our_ids in zip(conversations, theirs, ours, strict=True):
        assert vllm_ids == list(our_ids), conversation
    return [tuple(ids) for ids in ours]


def test_vllm_renders_the_request_options_as_tunedesk_does(pytestconfig, tmp_path_factory):
    """continue_final_message, add_generation_prompt, documents, chat_template_kwargs and
    reasoning_effort: on a template that reads them, and dropped where it does not."""
    tiny = build_tiny(cache_root(pytestconfig, tmp_path_factory))
    model = options_model(tiny, tmp_path_factory.mktemp("options-model"))
    ask = [{"role": "user", "content": "医药基金申购费？"}]
    started = [*ask, {"role": "assistant", "content": "申购费"}]
    docs = [{"title": "费率表", "text": "医药 0.15%"}, {"title": "FAQ", "text": "T+1"}]
    requests = [
        {"messages": started, "continue_final_message": True, "add_generation_prompt": False},
        {"messages": ask, "add_generation_prompt": False},
        {"messages": started},  # a new assistant turn after the last one, as OpenAI allows
        {"messages": ask, "documents": docs},
        {"messages": ask, "chat_template_kwargs": {"enable_thinking": False, "unread": 1}},
        {"messages": ask, "reasoning_effort": "none"},
        {"messages": ask, "reasoning_effort": "low"},
        {
            "messages": ask,
            "reasoning_effort": "none",
            "chat_template_kwargs": {"enable_thinking": True},
        },
    ]
    read = _assert_rendered_alike(model, requests, tmp_path_factory)
    assert len(set(read)) == len(requests)  # every option changed the prompt
    unread = _assert_rendered_alike(tiny, requests, tmp_path_factory)
    assert len(set(unread[3:])) == 1  # the tiny template reads none of these


def test_the_gpu_benchmark_runs_direct_vllm_as_tunedesk_runs_its_child(tmp_path):
    """bench/serve_load.py --engine vllm compares tunedesk's gateway with `vllm serve` run
    directly: both vLLMs must get the same settings, or the comparison measures those."""
    from tunedesk.cli import build_parser
    from tunedesk.serve.commands import settings_from_args

    spec = importlib.util.spec_from_file_location(
        "serve_load", Path(__file__).parents[1] / "bench" / "serve_load.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = bench
    spec.loader.exec_module(bench)

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    args = bench.parse_args(
        ["--engine", "vllm", "--model", str(base), "--tensor-parallel-size", "2"]
        + ["--vllm-arg=--max-model-len=4096", "--vllm-arg=--gpu-memory-utilization=0.5"]
    )
    ours, direct = bench.build_servers(args, str(base), tmp_path)
    assert ours.argv[1:4] == ["-m", "tunedesk", "serve"]
    settings = settings_from_args(build_parser().parse_args(ours.argv[3:]))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    child = launch_for(build_registry(settings), settings, scratch).command()

    as_child = _run(PARSE_WITH_VLLM, *child[3:], tag="PARSED")
    as_direct = _run(PARSE_WITH_VLLM, *direct.argv[1:], tag="PARSED")
    for key in ("port", "chat_template", "model_tag", "dispatch_function"):
        as_child.pop(key), as_direct.pop(key)  # the port, and the template file's name
    assert as_direct == as_child
    assert as_child["generation_config"] == "vllm" and as_child["max_model_len"] == 4096


# vLLM's own sampler steps over a batch of rows: its penalties (repetition on prompt and
# output, frequency and presence on output), then temperature, then its top-k / top-p mask.
SAMPLE_WITH_VLLM = (
    CPU_PLATFORM
    + """
import json, sys, torch
from vllm.model_executor.layers.utils import apply_penalties
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch
c = json.loads(sys.argv[1])
logits = torch.tensor(c["logits"])
vocab = logits.shape[1]
def padded(rows):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [vocab] * (width - len(r)) for r in rows])
penalised = apply_penalties(
    logits.clone(), padded(c["prompts"]), padded(c["outputs"]), torch.tensor(c["presence"]),
    torch.tensor(c["frequency"]), torch.tensor(c["repetition"]),
)
scaled = penalised / torch.tensor(c["temperature"]).unsqueeze(1)
kept = apply_top_k_top_p_pytorch(
    scaled.clone(), torch.tensor(c["top_k"]), torch.tensor(c["top_p"]), allow_cpu_sync=False
)
print("SAMPLED " + json.dumps({
    "penalised": penalised.tolist(), "kept": torch.isfinite(kept).tolist(),
}))
"""
)


def test_vllm_samples_the_extensions_as_the_local_engine_does():
    """top_k, top_p, repetition / frequency / presence penalties mean the same on both
    engines: tunedesk's per-row sampler steps against vLLM's own functions."""
    import torch

    from tunedesk.serve.engines.local import sampling

    gen = torch.Generator().manual_seed(0)
    rows, vocab = 6, 40
    logits = torch.randn(rows, vocab, generator=gen) * 3
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 9, 1, 7, 3, 12)]
    outputs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (0, 4, 6, 2, 8, 3)]
    params = [
        sampling.SamplingParams(
            max_tokens=1,
            temperature=t,
            top_p=p,
            top_k=k,
            repetition_penalty=r,
            frequency_penalty=f,
            presence_penalty=pr,
        )
        for t, p, k, r, f, pr in [
            (1.0, 1.0, 0, 1.3, 0.0, 0.0),
            (0.7, 0.9, 5, 1.0, 0.5, 0.0),
            (1.3, 0.5, 0, 0.8, 0.0, 1.0),
            (1.0, 1.0, 1, 1.1, 0.2, 0.3),
            (0.5, 0.8, 10, 1.5, -0.5, 0.0),
            (2.0, 0.3, 3, 1.0, 0.0, -1.0),
        ]
    ]
    case = {
        "logits": logits.tolist(),
        "prompts": prompts,
        "outputs": outputs,
        "presence": [p.presence_penalty for p in params],
        "frequency": [p.frequency_penalty for p in params],
        "repetition": [p.repetition_penalty for p in params],
        "temperature": [p.temperature for p in params],
        "top_k": [p.top_k or vocab for p in params],  # vLLM's "all tokens" is the vocab size
        "top_p": [p.top_p for p in params],
    }
    theirs = _run(SAMPLE_WITH_VLLM, json.dumps(case), tag="SAMPLED")
    for i, p in enumerate(params):
        ours = sampling._adjust_logits(logits[i], prompts[i], outputs[i], p)
        assert torch.allclose(ours, torch.tensor(theirs["penalised"][i]), atol=1e-5), i
        row = ours / p.temperature
        if p.top_k:
            row = sampling._top_k_filter(row, p.top_k)
        if p.top_p < 1.0:
            row = sampling._top_p_filter(row, p.top_p)
        assert torch.isfinite(row).tolist() == theirs["kept"][i], i
