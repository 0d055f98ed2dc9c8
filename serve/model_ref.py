"""`--model` and `--lora` values -> the served models.

`--model` takes a model folder, a fine-tuning job id whose merged model exists
(`models/<job-id>-merged`, as `tunedesk merge` writes it, or `runs/<job-id>/merged`), or a hub
id for a machine that can download. A job without a merged model gets told how to merge it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tunedesk import paths
from tunedesk.errors import CommandError
from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.settings import ServeSettings

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_JOB_ID = re.compile(r"^ftjob-[\w-]+$")


@dataclass(frozen=True)
class ModelRef:
    path: str
    name: str
    """Default served name: the job id, or the folder's name, or the hub id."""


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").exists()


def resolve_model(ref: str) -> ModelRef:
    given = Path(ref).expanduser()
    if _is_model_dir(given):
        return ModelRef(str(given.resolve()), given.resolve().name)
    if given.is_dir() and _is_model_dir(given / "merged"):  # a job folder
        return ModelRef(str((given / "merged").resolve()), given.resolve().name)
    candidates = [paths.models_dir() / f"{ref}-merged", paths.runs_dir() / ref / "merged"]
    for c in candidates:
        if _is_model_dir(c):
            return ModelRef(str(c.resolve()), ref)
    if _JOB_ID.match(ref) or (paths.runs_dir() / ref).is_dir():
        looked = " or ".join(str(c) for c in candidates)
        raise CommandError(
            f"job {ref} has no merged model (looked for {looked}); merge it first with "
            f"`tunedesk merge {ref}`, then serve it"
        )
    if given.exists():
        raise CommandError(f"--model {ref}: not a model folder (no config.json)")
    if _HUB_ID.match(ref) and not ref.startswith((".", "/")):
        return ModelRef(ref, ref)
    raise CommandError(f"--model {ref}: no such model folder or fine-tuning job id")


def parse_lora(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise CommandError(f"--lora {value!r}: expected NAME=PATH")
    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").exists():
        raise CommandError(f"--lora {name}: {path} is not a LoRA adapter (no adapter_config.json)")
    return name, str(folder.resolve())


def build_registry(settings: ServeSettings) -> ModelRegistry:
    registry = ModelRegistry()
    if settings.engine == "upstream":
        return registry  # the upstream knows its own models
    if settings.model is None:
        if not paths.tiny_base_dir().is_dir():
            raise CommandError(
                "--model is required (a model folder or job id); or build the embedded "
                "default first with `tunedesk base build`"
            )
        settings = settings.model_copy(update={"model": str(paths.tiny_base_dir())})
    ref = resolve_model(settings.model)  # type: ignore[arg-type]
    base = settings.served_model_name or ref.name
    registry.register(base, ref.path)
    for value in settings.loras:
        name, adapter = parse_lora(value)
        try:
            registry.register(name, ref.path, adapter=adapter, parent=base)
        except ValueError as exc:
            raise CommandError(f"--lora {name}: {exc}") from None
    return registry
