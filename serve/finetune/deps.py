"""Dependencies of the fine-tuning routes: the workspace's `FineTuning`, and a key allowed to
use it."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tunedesk.serve.auth import ALL_SCOPES, ApiKey
from tunedesk.serve.deps import KeyDep
from tunedesk.serve.errors import PermissionDenied
from tunedesk.serve.finetune.core import FineTuning

SCOPE = "fine-tune"


async def get_finetuning(request: Request) -> FineTuning:
    return request.app.state.finetune


async def finetune_key(key: KeyDep) -> ApiKey:
    # Training spends the machine: the key needs the fine-tune scope (where auth has none,
    # every scope there is). A chat widget's key (scopes=chat) gets 403.
    allowed = key.allows(SCOPE) if SCOPE in ALL_SCOPES else key.scopes >= ALL_SCOPES
    if not allowed:
        raise PermissionDenied(f"This API key may not use fine-tuning (scope '{SCOPE}').")
    return key


FineTuningDep = Annotated[FineTuning, Depends(get_finetuning)]
FineTuneKey = Annotated[ApiKey, Depends(finetune_key)]
