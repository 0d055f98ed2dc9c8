"""Keep the garbage collector's full collections off the request path.

A server process holds a large heap of long-lived objects from startup: torch, transformers,
tokenizers, FastAPI, the model itself. CPython's oldest-generation collection walks all of
them: 88 ms in the server process on the tiny model, and it ran in the middle of load (a
122 ms stall of every stream and every waiting first token, measured with `gc.callbacks`).
vLLM's engine core does the same as here: collect once after startup, then move what survived
into the permanent generation, which later collections skip.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect, then exclude everything alive now from future collections. Call once the
    process has loaded what it keeps for its lifetime, before it serves."""
    gc.collect()
    gc.freeze()
