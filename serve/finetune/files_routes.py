"""/v1/files: upload (multipart), list, retrieve, delete and download fine-tuning files.

Handlers are plain functions: FastAPI runs them in its thread pool, so disk and SQLite work
never blocks the event loop that streams completions. The upload is the exception: it reads
the multipart body itself, after the key is checked (a `File()` parameter would make FastAPI
read the whole upload, up to max_upload_bytes, before auth), then hands the disk work to the
thread pool."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from tunedesk.serve.errors import BadRequest, NotFound
from tunedesk.serve.finetune.deps import FineTuneKey, FineTuningDep
from tunedesk.serve.finetune.protocol import file_object

router = APIRouter()

_MEDIA = {".csv": "text/csv", ".tsv": "text/tab-separated-values", ".json": "application/json"}


@router.post("/v1/files")
async def upload_file(request: Request, ft: FineTuningDep, _key: FineTuneKey) -> dict:
    # A broken multipart body is Starlette's HTTPException(400), a body over max_upload_bytes
    # the size limit's 413: both reach the OpenAI-shaped error handlers as they are.
    async with request.form() as form:
        file, purpose = form.get("file"), form.get("purpose")
        if not isinstance(file, UploadFile):
            raise BadRequest("Missing the file to upload (form field 'file').", param="file")
        if not isinstance(purpose, str) or not purpose:
            raise BadRequest("Missing 'purpose' (use 'fine-tune').", param="purpose")
        row = await run_in_threadpool(ft.upload, file.file, file.filename, purpose)
    return file_object(row)


@router.get("/v1/files")
def list_files(
    ft: FineTuningDep,
    _key: FineTuneKey,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> dict:
    return ft.list_files(purpose, after, limit, order)


@router.get("/v1/files/{file_id}")
def retrieve_file(file_id: str, ft: FineTuningDep, _key: FineTuneKey) -> dict:
    return file_object(ft.file(file_id))


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, ft: FineTuningDep, _key: FineTuneKey) -> dict:
    return ft.delete_file(file_id)


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, ft: FineTuningDep, _key: FineTuneKey) -> FileResponse:
    row = ft.file(file_id)
    path = Path(row["path"])
    if not path.is_file():
        raise NotFound(f"The content of file {file_id} is gone.", param="id")
    media = _MEDIA.get(path.suffix, "application/octet-stream")
    return FileResponse(path, media_type=media, filename=row["filename"])
