"""/v1/files: upload (multipart), list, retrieve, delete and download fine-tuning files.

Handlers are plain functions: FastAPI runs them in its thread pool, so disk and SQLite work
never blocks the event loop that streams completions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from tunedesk.serve.errors import NotFound
from tunedesk.serve.finetune.deps import FineTuneKey, FineTuningDep
from tunedesk.serve.finetune.protocol import file_object

router = APIRouter()

_MEDIA = {".csv": "text/csv", ".tsv": "text/tab-separated-values", ".json": "application/json"}


@router.post("/v1/files")
def upload_file(
    ft: FineTuningDep,
    _key: FineTuneKey,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> dict:
    return file_object(ft.upload(file.file, file.filename, purpose))


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
