"""The customer-service chat widget: `/widget.js` and a demo page, `/widget/demo`.

`<script src="https://HOST/widget.js" data-model="..." data-key="...">` on any page adds a chat
bubble that streams from this server's /v1/chat/completions (cross-origin through the CORS
allow-list). The key in such a page is public, so it should be a widget key: `scopes=chat`,
named `models` and a `rate` (see auth.py).
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from tunedesk.serve.deps import StateDep

STATIC = Path(__file__).parent / "static"
router = APIRouter(include_in_schema=False)


@cache
def _static(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


@router.get("/widget.js")
async def widget_js() -> Response:
    return Response(
        _static("widget.js"),
        media_type="application/javascript; charset=utf-8",
        headers={"Cache-Control": "public, max-age=300"},
    )


@router.get("/widget/demo")
async def widget_demo(
    request: Request, state: StateDep, model: str | None = None, key: str | None = None
) -> HTMLResponse:
    """A stand-in customer page with the widget on it. `?model=` and `?key=` pick what it uses;
    by default the server's own model and its configured demo widget key."""
    settings = state.settings
    names = [spec.name for spec in state.engine.registry.list()]
    chosen = model or settings.served_model_name or (names[0] if names else "")
    demo_key = key if key is not None else (settings.widget_demo_key or "")
    page = (
        _static("widget_demo.html")
        .replace("__ORIGIN__", html.escape(str(request.base_url).rstrip("/"), quote=True))
        .replace("__MODEL__", html.escape(chosen, quote=True))
        .replace("__KEY__", html.escape(demo_key, quote=True))
    )
    return HTMLResponse(page)
