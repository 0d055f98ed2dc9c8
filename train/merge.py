"""Merge a trained LoRA / QLoRA adapter into its base model and prove the merge is faithful.

`merge_adapter` loads the base in 16 or 32 bits (never 4-bit: folding a LoRA delta into
quantised weights would re-quantise them and lose the adapter's effect), applies the adapter
with peft, folds it in with `merge_and_unload`, and writes a plain Hugging Face model folder
(safetensors, tokenizer, chat template, a generation config that stops at the end-of-turn
token) that any loader or server can use without peft.

Before the folder replaces the output path, a parity check compares the merged model, reloaded
from disk, against base + adapter (unmerged) on a few held-out prompts: the largest logit
difference over the prompt must be within a dtype-dependent tolerance and greedy generations
must produce the same token ids. A failure raises `MergeParityError` and leaves any previous
output untouched.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunedesk import __version__, paths
from tunedesk.chat_format import ChatFormatError, encode_prompt, stop_token_ids
from tunedesk.io import atomic_dir, read_jsonl

DTYPES = ("auto", "float32", "bfloat16", "float16")

# Allowed max |logit difference| as a fraction of the logit scale (the largest |logit| the
# reference produces, floored at 1). In fp32 merged and unmerged weights differ only by
# summation order (~1e-6 relative); 16-bit rounds the merged weight W + BA once more, and bf16
# keeps only 8 mantissa bits, so its bound must be much looser.
REL_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}

DEFAULT_MAX_NEW_TOKENS = 24
DEFAULT_PARITY_PROMPTS = 4
# Only the tail of a long prompt is probed: the reference keeps full-vocabulary logits for
# every prompt position in memory while the merged model is written and reloaded, and
# 256 positions x a 150k vocabulary is already ~150 MB per prompt.
MAX_PROMPT_TOKENS = 256

# Used when the job's own held-out data can't be found (a bare adapter folder).
BUILTIN_PROMPTS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "货币基金和债券基金有什么区别？"}],
    [{"role": "user", "content": "请问基金赎回一般几天能到账？"}],
    [
        {"role": "system", "content": "你是一名基金公司的客服助手。"},
        {"role": "user", "content": "定投和一次性买入哪个更适合新手？"},
    ],
    [{"role": "user", "content": "我的风险承受能力是稳健型，可以买R4等级的基金吗？"}],
]

ADAPTER_CONFIG = "adapter_config.json"
MERGE_CARD = "tunedesk_merge.json"


class MergeError(ValueError):
    """The merge can't be done as asked (adapter or base not found, quantised base, ...)."""


class MergeParityError(MergeError):
    """The merged model does not reproduce base + adapter; `report` holds the figures."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


# --- locating the adapter, its job and its base -------------------------------------------


@dataclass
class AdapterSource:
    """Where an adapter lives and, when it came from a training job, that job's folder."""

    adapter_dir: Path
    job_dir: Path | None = None
    job_config: dict[str, Any] = field(default_factory=dict)
    job_status: dict[str, Any] | None = None

    @property
    def job_id(self) -> str | None:
        return self.job_dir.name if self.job_dir is not None else None

    @property
    def adapter_config(self) -> dict[str, Any]:
        return json.loads((self.adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))


def _is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def _load_job(job_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    import yaml

    config: dict[str, Any] = {}
    cfg_path = job_dir / "config.yaml"
    if cfg_path.is_file():
        loaded = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    status = None
    status_path = job_dir / "status.json"
    if status_path.is_file():
        try:
            loaded = json.loads(status_path.read_text(encoding="utf-8"))
            status = loaded if isinstance(loaded, dict) else None
        except json.JSONDecodeError:
            # The trainer may be mid-write; the status only annotates the report.
            status = None
    return config, status


def resolve_source(adapter_or_job: str | Path, runs_dir: Path | None = None) -> AdapterSource:
    """Find the adapter for a job id, a job folder or an adapter folder."""
    runs_dir = Path(runs_dir) if runs_dir is not None else paths.runs_dir()
    given = Path(adapter_or_job)
    candidates = [given]
    # A bare name is also tried as a job id under the runs folder.
    if len(given.parts) == 1:
        candidates.append(runs_dir / given)
    for path in candidates:
        if _is_adapter(path):
            # An adapter inside a job folder (runs/<id>/adapter) still knows its job.
            parent = path.resolve().parent
            job_dir = parent if (parent / "config.yaml").is_file() else None
            config, status = _load_job(job_dir) if job_dir else ({}, None)
            return AdapterSource(path.resolve(), job_dir, config, status)
        if _is_adapter(path / "adapter"):
            job_dir = path.resolve()
            config, status = _load_job(job_dir)
            return AdapterSource(job_dir / "adapter", job_dir, config, status)
        if path.is_dir() and (path / "config.yaml").is_file():
            _, status = _load_job(path)
            state = (status or {}).get("state") or (status or {}).get("status")
            raise MergeError(
                f"job {path.name} has no adapter yet ({path / 'adapter'} is missing"
                + (f"; job status: {state}" if state else "")
                + ")"
            )
    raise MergeError(
        f"{adapter_or_job}: not an adapter folder (no {ADAPTER_CONFIG}), a job folder or a job "
        f"id under {runs_dir}"
    )


def _workspace_path(name: str) -> str:
    """`name` as a local path if it exists as given or under the workspace, else unchanged
    (a hub id). Jobs record paths relative to the workspace, not to the caller's cwd."""
    for path in (Path(name), paths.home() / name):
        if path.exists():
            return str(path.resolve())
    return name


def resolve_base(source: AdapterSource, base: str | None = None) -> str:
    """The base model to merge into: `base`, else the adapter's own record, else the job's."""
    name = (
        base
        or source.adapter_config.get("base_model_name_or_path")
        or source.job_config.get("base_model")
    )
    if not name:
        raise MergeError(
            f"{source.adapter_dir}: the adapter does not name its base model; pass --base"
        )
    return _workspace_path(str(name))


def resolve_dtype(dtype: str = "auto") -> str:
    """Name of the torch dtype to merge in; "auto" is bf16 on a bf16-capable GPU, else fp32."""
    import torch

    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def _prompts_from_rows(rows: Sequence[dict[str, Any]], limit: int) -> list[list[dict[str, Any]]]:
    """The context before each conversation's first assistant turn, i.e. what the model was
    asked before it answered."""
    prompts: list[list[dict[str, Any]]] = []
    for row in rows:
        messages = row.get("messages") or []
        first_answer = next(
            (i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages)
        )
        context = messages[:first_answer]
        if any(m.get("role") == "user" for m in context):
            prompts.append(context)
        if len(prompts) == limit:
            break
    return prompts


def default_parity_prompts(
    source: AdapterSource, limit: int = DEFAULT_PARITY_PROMPTS
) -> tuple[list[list[dict[str, Any]]], str]:
    """Up to `limit` held-out prompts from the job's data (test.jsonl, then val.jsonl) and
    where they came from; the built-in fund questions when there is no such data."""
    data_dir = source.job_config.get("data_dir")
    if data_dir:
        folder = Path(_workspace_path(str(data_dir)))
        prompts: list[list[dict[str, Any]]] = []
        used: list[str] = []
        for name in ("test.jsonl", "val.jsonl"):
            path = folder / name
            if len(prompts) < limit and path.is_file():
                got = _prompts_from_rows(read_jsonl(path), limit - len(prompts))
                if got:
                    prompts.extend(got)
                    used.append(str(path))
        if prompts:
            return prompts, ", ".join(used)
    return [list(p) for p in BUILTIN_PROMPTS[:limit]], "built-in"


# --- parity ------------------------------------------------------------------------------


@dataclass
class Probe:
    """What one model does with one prompt: its logits over the prompt and a greedy run."""

    prompt_ids: list[int]
    prompt_logits: Any  # float32 CPU tensor [prompt_len, vocab]
    tokens: list[int]
    step_logits: list[Any]  # step_logits[i]: float32 CPU logits that chose tokens[i]


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


def probe(
    model: Any,
    prompt_ids: Sequence[int],
    stop_ids: Sequence[int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Probe:
    """Run `prompt_ids` through `model` and decode greedily (plain argmax, no sampling or
    penalties from any generation config), stopping at a stop id or `max_new_tokens`."""
    import torch

    device = _device_of(model)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(prompt_ids)], device=device), use_cache=True)
        prompt_logits = out.logits[0].float().cpu()
        past = out.past_key_values
        logits = out.logits[0, -1]
        tokens: list[int] = []
        steps: list[Any] = []
        for _ in range(max_new_tokens):
            steps.append(logits.float().cpu())
            token = int(logits.argmax())
            tokens.append(token)
            if token in stop_ids:
                break
            out = model(
                input_ids=torch.tensor([[token]], device=device),
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            logits = out.logits[0, -1]
    return Probe(list(prompt_ids), prompt_logits, tokens, steps)


def probe_all(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, Any]]],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[Probe]:
    """`probe` each conversation, rendered exactly as training and serving render it."""
    stops = stop_token_ids(tokenizer)
    return [
        probe(model, encode_prompt(tokenizer, p)[-MAX_PROMPT_TOKENS:], stops, max_new_tokens)
        for p in prompts
    ]


def _max_abs_diff(a: Any, b: Any) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max())


def _nanmax(values: Sequence[float], default: float = 0.0) -> float:
    """max() that returns NaN when any value is NaN (plain max() may silently skip it)."""
    import math

    if any(math.isnan(v) for v in values):
        return float("nan")
    return max(values, default=default)


def compare_probes(
    reference: Sequence[Probe],
    candidate: Sequence[Probe],
    dtype: str = "float32",
    atol: float | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Parity figures of `candidate` against `reference`; `passed` says whether they match.

    The tolerance is `atol` when given, else REL_TOLERANCE[dtype] x the logit scale. Logits
    are compared over every prompt position and over each greedy step taken on a shared
    prefix. Greedy runs must produce the same ids; the one allowed exception is a near tie
    (both models' margins between the two tokens within twice the tolerance), where numerics
    alone decide the argmax and neither model is wrong. Such flips are counted, not hidden.
    """
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate probes differ in number")
    scale = max((float(r.prompt_logits.abs().max()) for r in reference), default=1.0)
    tol = atol if atol is not None else REL_TOLERANCE[dtype] * max(1.0, scale)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for i, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        row: dict[str, Any] = {"prompt_tokens": len(ref.prompt_ids)}
        if ref.prompt_ids != cand.prompt_ids:
            # The saved tokenizer renders the prompt differently: a serving-time bug.
            problems.append(f"prompt {i}: the merged folder's tokenizer encodes it differently")
            row.update(max_abs_logit_diff=float("inf"), identical=False, diverged_at=0)
            rows.append(row)
            continue
        prompt_diff = _max_abs_diff(ref.prompt_logits, cand.prompt_logits)
        # Index of the first differing token (or the shorter length if one is a prefix).
        common = next(
            (k for k, (a, b) in enumerate(zip(ref.tokens, cand.tokens, strict=False)) if a != b),
            min(len(ref.tokens), len(cand.tokens)),
        )
        identical = ref.tokens == cand.tokens
        # Steps 0..common are conditioned on the same tokens in both models, so comparable.
        n_steps = min(common + 1, len(ref.step_logits), len(cand.step_logits))
        step_diffs = [
            _max_abs_diff(ref.step_logits[k], cand.step_logits[k]) for k in range(n_steps)
        ]
        diff = _nanmax([prompt_diff, *step_diffs])
        row.update(
            max_abs_logit_diff=diff,
            generated_tokens=len(ref.tokens),
            identical=identical,
            diverged_at=None if identical else common,
            near_tie=False,
        )
        # `not <=` so that NaN (a broken merge) fails too.
        if not diff <= tol:
            problems.append(f"prompt {i}: max |logit diff| {diff:.3g} > tolerance {tol:.3g}")
        if not identical:
            tie = False
            if common < min(len(ref.tokens), len(cand.tokens)):
                a, b = ref.tokens[common], cand.tokens[common]
                ref_margin = float(ref.step_logits[common][a] - ref.step_logits[common][b])
                cand_margin = float(cand.step_logits[common][b] - cand.step_logits[common][a])
                row.update(ref_margin=ref_margin, cand_margin=cand_margin)
                tie = ref_margin <= 2 * tol and cand_margin <= 2 * tol
            row["near_tie"] = tie
            if not tie:
                problems.append(
                    f"prompt {i}: greedy tokens differ at step {common} "
                    f"(reference {ref.tokens[common : common + 4]} vs merged "
                    f"{cand.tokens[common : common + 4]})"
                )
        rows.append(row)
    return {
        "passed": not problems,
        "dtype": dtype,
        "prompts": len(rows),
        "max_abs_logit_diff": _nanmax([r["max_abs_logit_diff"] for r in rows]),
        "logit_scale": scale,
        "tolerance": tol,
        "greedy_identical": all(r["identical"] for r in rows),
        "greedy_near_tie_flips": sum(1 for r in rows if r.get("near_tie")),
        "max_new_tokens": max_new_tokens,
        "per_prompt": rows,
        "problems": problems,
    }


def format_parity(report: dict[str, Any]) -> str:
    """One line of parity figures for people."""
    rows = report["per_prompt"]
    same = sum(1 for r in rows if r["identical"])
    line = (
        f"parity on {report['prompts']} prompts ({report['dtype']}): max |logit diff| "
        f"{report['max_abs_logit_diff']:.3g} (tolerance {report['tolerance']:.3g}, logit scale "
        f"{report['logit_scale']:.3g}); greedy {report['max_new_tokens']}-token generations "
        f"identical {same}/{len(rows)}"
    )
    if report["greedy_near_tie_flips"]:
        line += f" ({report['greedy_near_tie_flips']} near-tie flips)"
    return line


def _raise_on_failure(report: dict[str, Any]) -> None:
    if not report["passed"]:
        raise MergeParityError(
            "merged model does not match base + adapter: "
            + "; ".join(report["problems"])
            + f" [{format_parity(report)}]",
            report,
        )


def check_parity(
    reference: Any,
    candidate: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, Any]]],
    dtype: str = "float32",
    atol: float | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    candidate_tokenizer: Any = None,
) -> dict[str, Any]:
    """Compare two loaded models on `prompts`; return the figures or raise MergeParityError.

    `candidate_tokenizer` (default: `tokenizer`) renders the candidate's prompts, so a merged
    folder's saved tokenizer is checked along with its weights.
    """
    ref = probe_all(reference, tokenizer, prompts, max_new_tokens)
    cand = probe_all(candidate, candidate_tokenizer or tokenizer, prompts, max_new_tokens)
    report = compare_probes(ref, cand, dtype=dtype, atol=atol, max_new_tokens=max_new_tokens)
    _raise_on_failure(report)
    return report


# --- merging -----------------------------------------------------------------------------


def _load_tokenizer(source: AdapterSource, base: str) -> tuple[Any, str]:
    """The tokenizer the adapter was trained with (saved beside it by the trainer), else the
    base's; a missing chat template is taken from the base so the merged model can chat."""
    from transformers import AutoTokenizer

    has_own = any(
        (source.adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.adapter_dir) if has_own else base)
    except Exception as exc:
        raise MergeError(f"can't load the tokenizer of {base}: {exc}") from exc
    origin = "adapter" if has_own else "base"
    if has_own and not getattr(tokenizer, "chat_template", None):
        base_tok = AutoTokenizer.from_pretrained(base)
        if getattr(base_tok, "chat_template", None):
            tokenizer.chat_template = base_tok.chat_template
            origin = "adapter (chat template from base)"
    return tokenizer, origin


def _check_not_quantized(base: str) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base)
    except Exception as exc:
        raise MergeError(f"can't load base model {base}: {exc}; pass --base") from exc
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise MergeError(
            f"base model {base} is stored quantised ({method}); merging into quantised weights "
            "loses the adapter. Pass --base with the original 16/32-bit model."
        )


def _generation_config(base_generation: Any, tokenizer: Any) -> Any:
    """The base's generation settings, with eos ids that include the end-of-turn token (so
    generation stops after an answer instead of running on) and a pad id."""
    import copy

    gen = copy.deepcopy(base_generation)
    base_eos = gen.eos_token_id
    base_eos = [] if base_eos is None else [base_eos] if isinstance(base_eos, int) else base_eos
    eos: list[int] = []
    for tid in [*stop_token_ids(tokenizer), *base_eos]:
        if tid not in eos:
            eos.append(int(tid))
    if not eos:
        raise MergeError("neither the tokenizer nor the base defines an end-of-turn/eos token")
    gen.eos_token_id = eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else gen.pad_token_id
    gen.pad_token_id = pad if pad is not None else eos[0]
    return gen


def _free() -> None:
    """Collect dropped models now (callers `del` their references first)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merge_adapter(
    adapter_or_job: str | Path,
    out_dir: str | Path,
    base: str | None = None,
    dtype: str = "auto",
    parity_prompts: list[list[dict[str, Any]]] | None = None,
    atol: float | None = None,
    runs_dir: str | Path | None = None,
    parity: bool = True,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Merge an adapter (or a training job's adapter) into its base and write `out_dir`.

    Args:
        adapter_or_job: a job id under `runs_dir`, a job folder, or an adapter folder.
        out_dir: the merged model folder; replaced atomically, only after parity passed.
        base: base model (hub id or path); default: the adapter's `base_model_name_or_path`.
        dtype: "auto" (bf16 on a bf16 GPU, else fp32), "float32", "bfloat16" or "float16".
        parity_prompts: conversations to probe; default: the job's held-out data, else
            built-in fund questions.
        atol: absolute logit tolerance; default REL_TOLERANCE[dtype] x the logit scale.
        runs_dir: where job ids are looked up (default: the workspace's runs/).
        parity: False skips the parity check (the report says so).
        max_new_tokens: length of the greedy generations compared.
        device: "cuda" / "cpu" (default: cuda when available).
        log: progress messages go here.

    Returns the report also written to `out_dir/tunedesk_merge.json`.
    Raises MergeError for bad inputs and MergeParityError when the merge is unfaithful.
    """
    import peft
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = log or (lambda _msg: None)
    started = time.time()
    source = resolve_source(adapter_or_job, Path(runs_dir) if runs_dir is not None else None)
    base_name = resolve_base(source, base)
    dtype_name = resolve_dtype(dtype)
    torch_dtype = getattr(torch, dtype_name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_not_quantized(base_name)
    tokenizer, tokenizer_origin = _load_tokenizer(source, base_name)

    say(f"loading base {base_name} ({dtype_name}, {device})")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_name, dtype=torch_dtype, device_map=device
        )
    except Exception as exc:
        raise MergeError(f"can't load base model {base_name}: {exc}; pass --base") from exc
    model.eval()
    generation_config = _generation_config(model.generation_config, tokenizer)
    say(f"applying adapter {source.adapter_dir}")
    try:
        model = PeftModel.from_pretrained(model, str(source.adapter_dir))
    except Exception as exc:
        raise MergeError(
            f"adapter {source.adapter_dir} does not fit base {base_name}: {exc}"
        ) from exc
    model.eval()

    prompts: list[list[dict[str, Any]]] = []
    prompt_source = "none"
    reference: list[Probe] = []
    if parity:
        if parity_prompts is not None:
            prompts, prompt_source = [list(p) for p in parity_prompts], "given"
        else:
            prompts, prompt_source = default_parity_prompts(source)
        if not prompts:
            raise MergeError("no parity prompts to check the merge with")
        say(f"probing base + adapter on {len(prompts)} prompts ({prompt_source})")
        try:
            reference = probe_all(model, tokenizer, prompts, max_new_tokens)
        except ChatFormatError as exc:
            raise MergeError(f"can't render the parity prompts: {exc}") from exc

    # safe_merge checks each merged weight for NaN/inf before committing it.
    merged = model.merge_and_unload(safe_merge=True)
    merged.generation_config = generation_config
    merged.config.use_cache = True

    report: dict[str, Any] = {
        "base": base_name,
        "adapter": str(source.adapter_dir),
        "job_id": source.job_id,
        "job_status": source.job_status,
        "dtype": dtype_name,
        "device": str(device),
        "tokenizer_from": tokenizer_origin,
        "eos_token_id": generation_config.eos_token_id,
        "pad_token_id": generation_config.pad_token_id,
        "parity_prompt_source": prompt_source,
        "parity": None,
        "versions": {
            "tunedesk": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        say(f"writing merged model to {tmp}")
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Drop the in-memory copy before reloading so peak memory stays at one model.
        del merged, model
        _free()
        if parity:
            say("reloading the merged model from disk for the parity check")
            reloaded = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch_dtype, device_map=device
            )
            reloaded.eval()
            reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp)
            candidate = probe_all(reloaded, reloaded_tokenizer, prompts, max_new_tokens)
            del reloaded
            _free()
            parity_report = compare_probes(
                reference, candidate, dtype=dtype_name, atol=atol, max_new_tokens=max_new_tokens
            )
            report["parity"] = parity_report
            say(format_parity(parity_report))
            # Raising inside atomic_dir discards the temp folder; the old out_dir survives.
            _raise_on_failure(parity_report)
        report["seconds"] = round(time.time() - started, 1)
        (tmp / MERGE_CARD).write_text(
            json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
    say(f"merged model written to {out_dir}")
    return report
