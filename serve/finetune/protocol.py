"""Wire shapes of the fine-tuning API: the create request, and the OpenAI objects built from
the store's rows and a job's folder (file, fine_tuning.job, .event, .checkpoint, list pages)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

ORGANIZATION = "org-tunedesk"
TERMINAL = ("succeeded", "failed", "cancelled")


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | PositiveInt | None = None
    batch_size: Literal["auto"] | PositiveInt | None = None
    learning_rate_multiplier: Literal["auto"] | PositiveFloat | None = None


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="ignore")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: SupervisedMethod | None = None


class CreateJobRequest(BaseModel):
    """POST /v1/fine_tuning/jobs. `tunedesk` is this server's namespace for its own options
    (sent with the SDK's `extra_body={"tunedesk": {...}}`)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    tunedesk: dict[str, Any] | None = None

    def requested_hyperparameters(self) -> tuple[Hyperparameters, str]:
        """The hyperparameters and the param path they came from (method wins, as in OpenAI)."""
        if self.method is not None and self.method.supervised is not None:
            hp = self.method.supervised.hyperparameters
            if hp is not None:
                return hp, "method.supervised.hyperparameters"
        return self.hyperparameters or Hyperparameters(), "hyperparameters"


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    info = row.get("info") or {}
    out: dict[str, Any] = {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": row["status"],
        "status_details": row["status_details"],
        "expires_at": None,
    }
    if info:
        out["tunedesk"] = {k: info[k] for k in ("format", "rows", "usable") if k in info}
    return out


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    hp = row["hyperparameters"]
    options = row.get("options") or {}
    error = row.get("error")
    return {
        "id": row["id"],
        "object": "fine_tuning.job",
        "created_at": row["created_at"],
        "error": error,
        "fine_tuned_model": row["fine_tuned_model"] if row["status"] == "succeeded" else None,
        "finished_at": row["finished_at"],
        "hyperparameters": hp,
        "model": row["model"],
        "organization_id": ORGANIZATION,
        "result_files": row["result_files"] or [],
        "seed": row["seed"],
        "status": row["status"],
        "trained_tokens": row["trained_tokens"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "estimated_finish": None,
        "integrations": [],
        "metadata": row.get("metadata"),
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "user_provided_suffix": row["suffix"],
        "tunedesk": {"stage": row["stage"], "base_model": row["base_path"], **options},
    }


_LEVELS = {"warning": "warn", "warn": "warn", "error": "error"}


def event_id(job_id: str, index: int) -> str:
    return f"ftevent-{job_id.removeprefix('ftjob-')}-{index}"


def event_index(event: str) -> int | None:
    tail = event.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None


def _metrics_data(data: dict[str, Any]) -> dict[str, Any]:
    """The training loop's metric names next to the ones OpenAI's events use."""
    out = dict(data)
    prefix = "valid" if data.get("split") == "val" else "train"
    if "loss" in data:
        out[f"{prefix}_loss"] = data["loss"]
    if "token_accuracy" in data:
        out[f"{prefix}_mean_token_accuracy"] = data["token_accuracy"]
    return out


def event_object(job_id: str, index: int, event: dict[str, Any]) -> dict[str, Any]:
    kind = event.get("type") or "message"
    data = event.get("data") or {}
    return {
        "id": event_id(job_id, index),
        "object": "fine_tuning.job.event",
        "created_at": event.get("created_at", 0),
        "level": _LEVELS.get(event.get("level", "info"), "info"),
        "message": event.get("message", ""),
        "data": _metrics_data(data) if kind == "metrics" else data,
        "type": "metrics" if kind == "metrics" else "message",
    }


def checkpoint_metrics(metrics: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """OpenAI's checkpoint metrics at `step`: the newest logged training row at or before it,
    and the validation row (the full validation split) at it, if one was logged."""
    out: dict[str, Any] = {"step": step}
    train = [m for m in metrics if m.get("split") == "train" and m["step"] <= step]
    if train:
        last = max(train, key=lambda m: m["step"])
        out["train_loss"] = last.get("loss")
        out["train_mean_token_accuracy"] = last.get("token_accuracy")
    val = [m for m in metrics if m.get("split") == "val" and m["step"] <= step]
    if val:
        last = max(val, key=lambda m: m["step"])
        out["valid_loss"] = last.get("loss")
        out["valid_mean_token_accuracy"] = last.get("token_accuracy")
        if last["step"] == step:
            out["full_valid_loss"] = last.get("loss")
            out["full_valid_mean_token_accuracy"] = last.get("token_accuracy")
    return out


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt-{job_id.removeprefix('ftjob-')}-{step}"


def checkpoint_model(ft_name: str, step: int) -> str:
    return f"{ft_name}:ckpt-step-{step}"
