"""From a create request to what gets trained: the base model's weights and a `TrainConfig`.

`model` names, in the order they are tried:

1. a model this server serves (`/v1/models`): its weights; a fine-tuned model (`ft:...`)
   continues from its merged weights;
2. a local model folder (absolute, or relative to the workspace), or a job id whose merged
   model exists;
3. a Hugging Face hub id (`org/name`), downloaded by the training process if it can.

Anything else is a 404 `model_not_found`.

The recipe is a YAML `TrainConfig` (default: the embedded `configs/tiny-cpu.yaml`; pick another
with `tunedesk.recipe`). OpenAI's hyperparameters map onto it: `n_epochs` -> epochs,
`batch_size` -> batch_size, `learning_rate_multiplier` -> a multiple of the recipe's lr; "auto"
keeps the recipe's value. Every other `TrainConfig` field can be set under `tunedesk`, except
the ones the API owns (the base model, data paths, runs folder and seed).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from tunedesk.config import ConfigError, from_dict
from tunedesk.errors import CommandError
from tunedesk.serve.errors import BadRequest, ModelNotFound
from tunedesk.serve.finetune.protocol import CreateJobRequest
from tunedesk.serve.registry import ModelRegistry
from tunedesk.train.config import CONFIGS_DIR, DEFAULT_CONFIG, TrainConfig

NAMESPACE = "tunedesk"
RESERVED = frozenset({"base_model", "data_dir", "train_file", "val_file", "runs_dir", "seed"})
OPTION_KEYS = frozenset({"recipe"} | {f.name for f in fields(TrainConfig)} - RESERVED)
_SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class BaseModelRef:
    path: str
    """Weights to train on: a folder or a hub id."""
    parent: str | None
    """The served name of that model, when this server serves it."""
    family: str
    """The base name inside `ft:<family>:<suffix>:<job-id>`."""


def resolve_base_model(name: str, registry: ModelRegistry, home: Path) -> BaseModelRef:
    family = name.split(":")[1] if name.startswith("ft:") and name.count(":") >= 2 else name
    spec = registry.get(name)
    if spec is not None:
        if spec.adapter:
            raise BadRequest(
                f"The model `{name}` is a LoRA adapter served on top of `{spec.parent or spec.path}`; "
                "fine-tune that base model instead.",
                param="model",
                code="model_not_available",
            )
        return BaseModelRef(spec.path, name, family)
    local = Path(name).expanduser()
    local = local if local.is_absolute() else home / local
    if (local / "config.json").is_file():
        return BaseModelRef(str(local.resolve()), None, local.resolve().name)
    from tunedesk.serve.model_ref import resolve_model

    try:
        ref = resolve_model(name)
    except CommandError:
        raise ModelNotFound(name) from None
    return BaseModelRef(ref.path, None, family)


def check_suffix(suffix: str | None) -> str | None:
    if suffix is None or suffix == "":
        return None
    if not _SUFFIX.match(suffix):
        raise BadRequest(
            f"Invalid suffix {suffix!r}: use up to 64 letters, digits, '.', '_' or '-'.",
            param="suffix",
        )
    return suffix


def ft_model_name(family: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{family}:{suffix or ''}:{job_id}"


def shipped_recipes() -> list[str]:
    """The training recipes in configs/ (not the other YAML there, such as eval rubrics)."""
    return sorted(
        p.name
        for p in CONFIGS_DIR.glob("*.yaml")
        if "\nbase_model:" in "\n" + p.read_text(encoding="utf-8", errors="replace")
    )


def resolve_recipe(value: Any, home: Path) -> Path:
    if value is None:
        return DEFAULT_CONFIG
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("tunedesk.recipe must be a recipe file name.", param="tunedesk.recipe")
    given = Path(value).expanduser()
    candidates = (
        [given]
        if given.is_absolute()
        else [home / given, CONFIGS_DIR.parent / given, CONFIGS_DIR / given]
    )
    candidates.append(CONFIGS_DIR / f"{value}.yaml")
    for c in candidates:
        if c.suffix in (".yaml", ".yml") and c.is_file():
            return c.resolve()
    raise BadRequest(
        f"Unknown recipe {value!r}: give a YAML training config in the workspace or one of the "
        f"shipped recipes ({', '.join(shipped_recipes())}).",
        param="tunedesk.recipe",
    )


def _config_error(exc: ConfigError, options: dict[str, Any], hp_param: str) -> BadRequest:
    # The loader's messages name CLI flags (--lora_r=...); here the knob is tunedesk.lora_r.
    message = re.sub(r"--(\w+)=", rf"{NAMESPACE}.\1=", str(exc))
    param = None
    for key in options:
        if message.startswith(key) or f"({key})" in message or f"'{key}'" in message:
            param = f"{NAMESPACE}.{key}"
            break
    else:
        for key, hp in (("epochs", "n_epochs"), ("batch_size", "batch_size"), ("lr", "")):
            if message.startswith(key):
                param = f"{hp_param}.{hp or 'learning_rate_multiplier'}"
                break
    return BadRequest(f"Invalid training configuration: {message}", param=param)


def build_config(
    req: CreateJobRequest,
    *,
    base_path: str,
    job_dir: Path,
    runs_dir: Path,
    seed: int,
    home: Path,
) -> tuple[TrainConfig, dict[str, Any], dict[str, Any]]:
    """The job's TrainConfig, the hyperparameters as the job object shows them, and the
    tunedesk options (with the resolved recipe path)."""
    options = dict(req.tunedesk or {})
    unknown = sorted(set(options) - OPTION_KEYS)
    if unknown:
        key = unknown[0]
        if key in RESERVED:
            why = "is set by the API from the request" + (
                " (use the top-level `seed`)" if key == "seed" else ""
            )
        else:
            close = difflib.get_close_matches(key, sorted(OPTION_KEYS), n=1)
            why = "is not a training option" + (f" (did you mean {close[0]!r}?)" if close else "")
        raise BadRequest(f"{NAMESPACE}.{key} {why}.", param=f"{NAMESPACE}.{key}")
    recipe = resolve_recipe(options.pop("recipe", None), home)
    try:
        data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BadRequest(
            f"Recipe {recipe.name} can't be read: {exc}", param="tunedesk.recipe"
        ) from None
    if not isinstance(data, dict):
        raise BadRequest(f"Recipe {recipe.name} is not a mapping.", param="tunedesk.recipe")
    recipe_lr = float(data.get("lr", TrainConfig.lr))

    hp, hp_param = req.requested_hyperparameters()
    if isinstance(hp.n_epochs, int):
        data["epochs"] = hp.n_epochs
    if isinstance(hp.batch_size, int):
        data["batch_size"] = hp.batch_size
        accum = int(data.get("grad_accum", 1) or 1)
        if hp.batch_size % accum:
            data["grad_accum"] = math.gcd(hp.batch_size, accum)
    if isinstance(hp.learning_rate_multiplier, float | int):
        data["lr"] = recipe_lr * float(hp.learning_rate_multiplier)
    data.update(options)
    data.update(
        base_model=base_path,
        data_dir=str(job_dir / "data"),
        train_file=None,
        val_file=None,
        runs_dir=str(runs_dir),
        seed=seed,
    )
    try:
        cfg = from_dict(TrainConfig, data, source=f"recipe {recipe.name}")
    except ConfigError as exc:
        raise _config_error(exc, options, hp_param) from None
    epochs: float | int = int(cfg.epochs) if float(cfg.epochs).is_integer() else cfg.epochs
    hyperparameters = {
        "n_epochs": epochs,
        "batch_size": cfg.batch_size,
        "learning_rate_multiplier": round(cfg.lr / recipe_lr, 6) if recipe_lr else None,
    }
    return cfg, hyperparameters, {"recipe": str(recipe), **options}
