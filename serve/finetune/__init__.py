"""OpenAI's fine-tuning API on the tunedesk server: the seed workflow, unchanged.

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)
    f = client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-base", training_file=f.id, suffix="faq")
    ...poll client.fine_tuning.jobs.retrieve(job.id) / .list_events(job.id)...
    client.chat.completions.create(model=job.fine_tuned_model, messages=[...])

Enabled with `tunedesk serve --finetune` (or TUNEDESK_FINETUNE=1). Endpoints:

    POST   /v1/files                               multipart: file, purpose="fine-tune"
    GET    /v1/files[?purpose&after&limit&order]   list
    GET    /v1/files/{id}                          retrieve
    DELETE /v1/files/{id}                          delete
    GET    /v1/files/{id}/content                  download (uploads and results CSVs)
    POST   /v1/fine_tuning/jobs                    create
    GET    /v1/fine_tuning/jobs[?after&limit]      list, newest first
    GET    /v1/fine_tuning/jobs/{id}               retrieve
    POST   /v1/fine_tuning/jobs/{id}/cancel        cancel
    GET    /v1/fine_tuning/jobs/{id}/events        newest first, ?after&limit
    GET    /v1/fine_tuning/jobs/{id}/checkpoints   newest first, ?after&limit
    DELETE /v1/models/{model}                      a fine-tuned model or checkpoint (core.py)

Every route needs a key with the `fine-tune` scope (keys without `scopes=` have it; a chat
widget's `scopes=chat` key gets 403); a key limited with `models=` trains only those models.

Uploads are checked with `tunedesk prepare`'s loader and validator (chat, prompt/completion,
alpaca, sharegpt JSONL; JSON arrays; CSV): a file that can't be read at all is refused with a
400 naming the lines; bad records are recorded in `status_details` and left out when training.
Uploads count against the server's --max-body-bytes.

`model` is a model this server serves (its served name), a local model folder or a hub id
(see `plan`); the fine-tuned model is served as `ft:<model>:<suffix>:<job-id>` once the job
succeeds, each checkpoint as `...:ckpt-step-N`. Deleting the fine-tune stops serving it and
removes its merged weights (the job's adapter stays); deleting a checkpoint's name stops
serving that name.

tunedesk's own options go in a `tunedesk` object of the create body (with the SDK:
`extra_body={"tunedesk": {...}}`):

    recipe          a TrainConfig YAML (default configs/tiny-cpu.yaml; a shipped recipe's file
                    name, or a path in the workspace)
    <field>         any TrainConfig field: lora_r, lora_alpha, quantization ("nf4" | "none"),
                    max_steps, max_seq_len, save_every, eval_every, log_every, grad_accum,
                    num_threads, ... (`tunedesk train --fields` lists them). Not base_model,
                    data_dir, train_file, val_file, runs_dir or seed: the request sets those.

OpenAI's hyperparameters map onto the recipe: n_epochs -> epochs, batch_size -> batch_size,
learning_rate_multiplier -> lr x multiplier; "auto" keeps the recipe's value.

Jobs are the training jobs of `tunedesk.train.jobs` (same id, folder runs/<id>/, so `tunedesk
jobs list` shows them); see `worker` for how they run and survive a server restart, and
`core` for where things are kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

log = logging.getLogger("tunedesk.serve.finetune")

__all__ = ["install_finetuning"]


def install_finetuning(app: FastAPI, poll_s: float = 0.5) -> Any:
    """Add the files and fine-tuning routes to a `create_app` app, and run the worker for the
    app's lifetime (started after the engine, stopped before it). Returns the `FineTuning`."""
    from tunedesk import paths
    from tunedesk.serve.finetune.core import FineTuning
    from tunedesk.serve.finetune.files_routes import router as files_router
    from tunedesk.serve.finetune.jobs_routes import router as jobs_router
    from tunedesk.serve.finetune.models_routes import router as models_router

    state = app.state.tunedesk
    settings = state.settings
    ft = FineTuning(
        paths.home(),
        state.engine.registry,
        max_jobs=getattr(settings, "finetune_max_jobs", 1),
        poll_s=poll_s,
    )
    if state.keys.open:
        log.warning(
            "fine-tuning is on and no API keys are configured: any client that reaches this "
            "server can upload data and start training"
        )
    if state.engine.kind != "transformers":
        log.warning(
            "fine-tuning with --engine %s: jobs train and merge, but only the transformers "
            "engine serves the fine-tuned models",
            state.engine.kind,
        )
    app.state.finetune = ft
    app.include_router(files_router)
    app.include_router(jobs_router)
    app.include_router(models_router)

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as maybe_state:
            await asyncio.to_thread(ft.start)
            try:
                yield maybe_state
            finally:
                await asyncio.to_thread(ft.stop)

    app.router.lifespan_context = lifespan
    log.info("fine-tuning API on %s (%d job(s) at a time)", ft.home, ft.worker.max_jobs)
    return ft
