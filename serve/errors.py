"""OpenAI-shaped errors: every failure leaves the server as `{"error": {message, type, param,
code}}` with the status OpenAI would use, so SDK clients raise their usual exception classes."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tunedesk.serve")


class OpenAIError(Exception):
    """A failure the client should see. Subclasses fix the status and OpenAI's error type."""

    status: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BadRequest(OpenAIError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    default_code = "context_length_exceeded"


class AuthenticationFailed(OpenAIError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PermissionDenied(OpenAIError):
    status = 403
    type = "permission_error"
    default_code = "insufficient_scope"


class NotFound(OpenAIError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        # Same words for "unknown" and "not yours": a restricted key learns nothing.
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.", param="model"
        )


class PayloadTooLarge(OpenAIError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimited(OpenAIError):
    status = 429
    type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class EngineFailure(OpenAIError):
    """Generation itself failed (a model producing NaNs, a forward that raised)."""

    status = 500
    type = "server_error"
    default_code = "engine_error"


class BadGateway(OpenAIError):
    status = 502
    type = "server_error"
    default_code = "upstream_error"


class Unavailable(OpenAIError):
    """The model or engine can't take requests now (loading, failed to load, worker dead)."""

    status = 503
    type = "server_error"
    default_code = "unavailable"


class GatewayTimeout(OpenAIError):
    status = 504
    type = "timeout"
    default_code = "timeout"


class ClientGone(Exception):
    """The client disconnected before the response was ready; nobody is left to answer."""


def param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role', the way OpenAI names params."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not out:
            out = str(p)
        else:
            out += f".{p}"
    return out or None


def _field_path(error: dict[str, Any], body: Any) -> tuple[Any, ...]:
    """The error's location with pydantic's union-member steps taken out: ('stop', 'list[str]')
    -> ('stop',). A step is kept where the request body has it (a key, an index), and a
    missing field's name at the end; a union member's name is never in the body."""
    loc = tuple(error.get("loc", ()))
    if not loc or loc[0] != "body":
        return loc
    kept: list[Any] = []
    node = body
    for i, step in enumerate(loc[1:], start=1):
        in_body = (isinstance(node, dict) and step in node) or (
            isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)
        )
        if in_body:
            node = node[step]
        elif not (i == len(loc) - 1 and error.get("type") == "missing"):
            continue
        kept.append(step)
    return ("body", *kept)


def _wrong_type(error: dict[str, Any]) -> bool:
    kind = str(error.get("type", ""))
    return kind.endswith(("_type", "_parsing")) or kind == "int_from_float"


def validation_error(exc: RequestValidationError) -> BadRequest:
    errors = exc.errors()
    if not errors:
        return BadRequest("Invalid request.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return BadRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            code="invalid_json",
        )
    if first.get("type") == "model_attributes_type" or first.get("loc") == ("body",):
        return BadRequest("The request body must be a JSON object.", code="invalid_json")
    # A field that takes several types (stop: a string or a list) fails once per type, under
    # locations that name the types. Report one problem under the field's own name: the one a
    # type that took the value ran into (a list of 5 stops: "at most 4 items"; prompt [[1],
    # [2.5]]: the 2.5), else every type the value could have had.
    by_field: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for error in errors:
        by_field.setdefault(_field_path(error, getattr(exc, "body", None)), []).append(error)

    def telling(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in group if not _wrong_type(e)]

    loc = max(by_field, key=lambda f: (bool(telling(by_field[f])), len(f)))
    group = by_field[loc]
    param = param_from_loc(loc)
    if telling(group):
        what = str(telling(group)[0].get("msg", "invalid value"))
    else:
        msgs = list(dict.fromkeys(str(e.get("msg", "invalid value")) for e in group))
        prefix = "Input should be "
        what = msgs[0] + "".join(
            " or " + (m.removeprefix(prefix) if msgs[0].startswith(prefix) else m) for m in msgs[1:]
        )
    others = len({f[:2] for f in by_field} - {loc[:2]})
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    return BadRequest(f"Invalid value for '{param}': {what}{more}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        ctx = getattr(request.state, "ctx", None)
        if ctx is not None:
            ctx.error_code = exc.code
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default is 422 with its own shape; OpenAI clients expect 400 naming the param.
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err: OpenAIError = NotFound(f"Unknown route: {request.method} {request.url.path}")
        elif exc.status_code == 413:
            err = PayloadTooLarge(str(exc.detail))
        else:
            kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
            err = OpenAIError(str(exc.detail), status=exc.status_code, type=kind)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, _: ClientGone) -> Response:
        ctx = getattr(request.state, "ctx", None)
        if ctx is not None:
            ctx.disconnected = True
        return Response(status_code=499)  # nginx's "client closed request", for the access log

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error: %s", exc)
        return EngineFailure("The server had an error while processing your request.").response()
