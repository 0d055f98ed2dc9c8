"""What `--model` names: a local model folder (or hub id), a training job, or an endpoint.

    --model [LABEL=]SPEC

SPEC is one of
- `http(s)://HOST[:PORT]/v1#MODEL`: an OpenAI-compatible endpoint and the model name to send
  (without `#MODEL` the endpoint's /v1/models is asked, and its one model is used);
- a job id under runs/ (or a job folder): evaluates the job's merged model,
  models/<job-id>-merged, and remembers the job so its loss curves can be plotted;
- a model folder (a merged model `models/<job-id>-merged` is linked back to its job when
  runs/<job-id> exists) or a Hugging Face hub id.

LABEL (letters, digits, `_ . -`) names the model in the report and in gates (`ft:char_f1=0.4`);
by default it is the job id, the folder name or the endpoint's model name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedesk import paths

LABEL_RE = re.compile(r"[A-Za-z0-9_.-]+")
_LABELLED = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")
_URL = re.compile(r"^https?://", re.IGNORECASE)


class SpecError(ValueError):
    """A --model value that can't be resolved."""


@dataclass
class ModelSpec:
    label: str
    raw: str
    kind: str  # "local" or "endpoint"
    path: str | None = None  # local: folder or hub id
    base_url: str | None = None  # endpoint: .../v1
    endpoint_model: str | None = None  # endpoint: model name; None = ask /v1/models
    job_id: str | None = None
    run_dir: Path | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "spec": self.raw, "kind": self.kind}
        if self.kind == "local":
            out["path"] = self.path
        else:
            out["base_url"] = self.base_url
            out["endpoint_model"] = self.endpoint_model
        if self.job_id:
            out["job_id"] = self.job_id
            out["run_dir"] = str(self.run_dir)
        return out


def split_label(value: str) -> tuple[str | None, str]:
    """`ft=runs/x` -> ("ft", "runs/x"); a bare spec (or a URL, or an existing path with "=")
    -> (None, value)."""
    m = _LABELLED.match(value)
    if m and not Path(value).exists():
        return m.group(1), m.group(2)
    return None, value


def _is_job_dir(path: Path) -> bool:
    return (
        path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").exists()
    )


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve(value: str, runs_dir: Path | None = None, models_dir: Path | None = None) -> ModelSpec:
    runs_dir = Path(runs_dir) if runs_dir is not None else paths.runs_dir()
    models_dir = Path(models_dir) if models_dir is not None else paths.models_dir()
    label, spec = split_label(value.strip())
    if not spec:
        raise SpecError(f"--model {value!r}: empty model")

    if _URL.match(spec):
        url, _, name = spec.partition("#")
        url = url.rstrip("/")
        return ModelSpec(
            label=label or name or "",
            raw=value,
            kind="endpoint",
            base_url=url,
            endpoint_model=name or None,
        )

    path = Path(spec).expanduser()
    job_dir: Path | None = None
    if _is_job_dir(path):
        job_dir = path.resolve()
    elif not path.exists() and LABEL_RE.fullmatch(spec) and _is_job_dir(runs_dir / spec):
        job_dir = (runs_dir / spec).resolve()
    if job_dir is not None:
        job_id = job_dir.name
        merged = models_dir / f"{job_id}-merged"
        if not _is_model_dir(merged):
            raise SpecError(
                f"--model {value}: job {job_id} has no merged model at {merged}; "
                f"run `tunedesk merge {job_id}` first (or pass a model folder)"
            )
        return ModelSpec(
            label=label or job_id,
            raw=value,
            kind="local",
            path=str(merged.resolve()),
            job_id=job_id,
            run_dir=job_dir,
        )

    if path.exists():
        if not _is_model_dir(path):
            raise SpecError(
                f"--model {value}: {path} is neither a model folder (no config.json) nor a job "
                "folder (no config.yaml)"
            )
        resolved = path.resolve()
        spec_out = ModelSpec(
            label=label or resolved.name, raw=value, kind="local", path=str(resolved)
        )
        if resolved.name.endswith("-merged"):  # models/<job-id>-merged: find its job
            job_id = resolved.name[: -len("-merged")]
            if _is_job_dir(runs_dir / job_id):
                spec_out.job_id = job_id
                spec_out.run_dir = (runs_dir / job_id).resolve()
        return spec_out

    if re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", spec):  # a hub id: org/name
        return ModelSpec(label=label or spec.split("/")[-1], raw=value, kind="local", path=spec)
    raise SpecError(
        f"--model {value}: not a model folder, a job id under {runs_dir}, an endpoint URL "
        "(http://host:port/v1#model-name) or a hub id (org/name)"
    )


def resolve_all(values: list[str], **kwargs: Any) -> list[ModelSpec]:
    """Resolve every --model and give each a unique label (`name`, `name-2`, ...)."""
    specs = [resolve(v, **kwargs) for v in values]
    explicit = [split_label(v)[0] for v in values]
    seen: set[str] = set()
    for spec, given in zip(specs, explicit, strict=True):
        if given is not None and given in seen:
            raise SpecError(f"--model label {given!r} is used twice")
        base = spec.label or "endpoint"
        label, k = base, 2
        while label in seen:
            label, k = f"{base}-{k}", k + 1
        spec.label = label
        seen.add(label)
    return specs


# --- training jobs: loss curves ------------------------------------------------------------


def read_job_curves(run_dir: Path) -> dict[str, Any] | None:
    """Loss (and token accuracy) per step from runs/<id>/metrics.jsonl, train and val.

    A resumed run may have re-logged steps; the last value logged for a step wins.
    """
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        return None
    series: dict[str, dict[str, dict[int, float]]] = {}
    with open(metrics, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a running job
            if not isinstance(rec, dict):
                continue
            split, step = rec.get("split"), rec.get("step")
            if split not in ("train", "val") or not isinstance(step, int | float):
                continue
            for key in ("loss", "token_accuracy"):
                value = rec.get(key)
                if isinstance(value, int | float) and value == value:  # not NaN
                    series.setdefault(key, {}).setdefault(split, {})[int(step)] = float(value)
    out: dict[str, Any] = {
        "job_id": Path(run_dir).name,
        "base_model": _base_model(Path(run_dir)),
        "series": {
            key: {split: sorted(points.items()) for split, points in by_split.items()}
            for key, by_split in series.items()
        },
    }
    return out if out["series"] else None


def _base_model(run_dir: Path) -> str | None:
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        import yaml

        raw = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    except Exception:
        return None
    value = raw.get("base_model") if isinstance(raw, dict) else None
    return str(value) if value is not None else None
