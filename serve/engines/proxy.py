"""Forwarding engine: the client's request bytes go upstream unchanged and the upstream's
response bytes come back unchanged, streamed chunk by chunk as they arrive.

Nothing is parsed on the hot path. The only extra work per chunk is noting the first chunk's
time (TTFT) and, for a non-streamed JSON answer, reading its `usage` for the access log and
token counters. Used as is for `--engine upstream` and by the vLLM engine for its child.

The upstream client is aiohttp, not httpx: every streamed chunk passes through it, and reading
a stream cost 27-31 us of CPU per read with aiohttp against 80-87 us with httpx (16 streams
from a tunedesk server, this machine; httpx opens a cancel scope and runs its h11 state machine
in Python for every read). At vLLM's token rates that difference is a good part of a core.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from starlette.responses import Response

from tunedesk.serve.engines.base import ApiCall, Engine
from tunedesk.serve.engines.upstreams import Upstream, UpstreamPool
from tunedesk.serve.engines.usage_tap import UsageTap
from tunedesk.serve.errors import BadGateway, GatewayTimeout, OpenAIError, Unavailable
from tunedesk.serve.metrics import Metrics
from tunedesk.serve.protocol import ChatCompletionRequest, CompletionRequest
from tunedesk.serve.registry import ModelRegistry
from tunedesk.serve.streaming import ManagedStreamingResponse, sse_error, unless_disconnected

log = logging.getLogger("tunedesk.serve")

# Hop-by-hop and length headers are the proxy's own business, never copied across.
_DROP_RESPONSE_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "server",
    "date",
    "x-request-id",  # ours is added by the access log (and was sent upstream)
}


def cache_salt(call: ApiCall[Any]) -> str | None:
    """The salt a keyed caller's request carries upstream: a digest of its key's name (vLLM logs
    what it is sent; the name stays here), and of the client's own salt, which can narrow the
    sharing further but never widen it to another key. None for an open server's callers."""
    key = call.ctx.key_name
    if key is None:
        return None
    own = getattr(call.body, "cache_salt", None)
    text = key if own is None else f"{key}\x00{own}"
    return "tunedesk-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class ProxyEngine(Engine):
    kind = "upstream"

    def __init__(
        self,
        registry: ModelRegistry,
        base_urls: str | list[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_connections: int = 256,
        ask_usage: bool = True,
        salt_by_key: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        """`base_urls`: one upstream, or several replicas of it (upstreams.py balances them).
        `ask_usage`: ask the upstream for usage on every stream (stream_options), so streamed
        tokens reach the access log and counters; see usage_tap.py. `salt_by_key`: the
        upstream is vLLM, whose prefix cache is shared by everyone the gateway forwards for;
        send each API key's requests with a `cache_salt` of their own (see `cache_salt`)."""
        super().__init__(registry, metrics)
        self.ask_usage = ask_usage
        self.salt_by_key = salt_by_key
        self.pool = UpstreamPool([base_urls] if isinstance(base_urls, str) else base_urls)
        self._connect_failures = self.metrics.upstream_connect_failures
        for upstream in self.pool.upstreams:  # read at scrape time
            self.metrics.upstream_in_flight.labels(upstream.url).set_function(
                lambda u=upstream: u.in_flight
            )
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        # Made on first use: an aiohttp session belongs to the event loop that creates it.
        self._session: aiohttp.ClientSession | None = None
        self._ready_at = 0.0
        self._ready: tuple[bool, str] = (False, "not checked yet")
        self._refreshing: asyncio.Future[None] | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
                # Reads can legitimately wait long between tokens of a queued request; each
                # request's own deadline is its total timeout (see _forward).
                timeout=aiohttp.ClientTimeout(
                    total=self._timeout_s, sock_connect=self._connect_timeout_s
                ),
                # Bytes are relayed as they come: the upstream must not compress them.
                headers={"accept-encoding": "identity"},
                auto_decompress=False,
            )
        return self._session

    async def stop(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._session is not None:
            await self._session.close()

    def _headers(self, call: ApiCall[Any]) -> dict[str, str]:
        # The client's Authorization was for this gateway; upstream gets the gateway's own key.
        headers = {"content-type": "application/json", "x-request-id": call.ctx.request_id}
        accept = call.http.headers.get("accept")
        if accept:
            headers["accept"] = accept
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        return headers

    async def ready(self) -> tuple[bool, str]:
        """The replicas' last known state. A probe older than a second is refreshed in the
        background, so a hung replica never makes /ready itself slow; only the very first
        call waits for an answer."""
        if self._refreshing is None and time.monotonic() - self._ready_at >= 1.0:
            self._refreshing = asyncio.ensure_future(self._refresh())
        if self._ready_at == 0.0 and self._refreshing is not None:
            await asyncio.shield(self._refreshing)
        return self._ready

    async def _refresh(self) -> None:
        try:
            answers = await asyncio.gather(*(self._probe(u) for u in self.pool.upstreams))
            ok = sum(1 for good, _ in answers if good)
            if len(answers) == 1:
                self._ready = answers[0]
            else:
                pairs = zip(self.pool.upstreams, answers, strict=True)
                detail = "; ".join(f"{u.url}: {why}" for u, (_, why) in pairs)
                self._ready = (ok > 0, f"{ok} of {len(answers)} upstreams ready ({detail})")
            self._ready_at = time.monotonic()
        except Exception:  # a bug here must not leave /ready stuck on an old answer
            log.exception("checking the upstreams failed")
            self._ready, self._ready_at = (False, "checking the upstreams failed"), time.monotonic()
        finally:
            self._refreshing = None

    async def _probe(self, upstream: Upstream) -> tuple[bool, str]:
        """Ask one replica for its models; what it says also decides whether requests go to it."""
        try:
            async with self._client().get(
                upstream.url + "/v1/models",
                headers=self._auth_header(),
                timeout=aiohttp.ClientTimeout(
                    total=5.0, sock_connect=min(5.0, self._connect_timeout_s)
                ),
            ) as r:
                await r.read()
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            why = f"upstream unreachable: {type(exc).__name__}"
            self.pool.mark_down(upstream, why)
            return False, why
        self.pool.mark_up(upstream)
        return status == 200, f"upstream answered {status}"

    def _auth_header(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def models(self, call: ApiCall[None]) -> Response:
        return await self._forward("GET", "/v1/models", call)

    async def chat_completions(self, call: ApiCall[ChatCompletionRequest]) -> Response:
        return await self._forward("POST", "/v1/chat/completions", call)

    async def completions(self, call: ApiCall[CompletionRequest]) -> Response:
        return await self._forward("POST", "/v1/completions", call)

    async def _forward(self, method: str, path: str, call: ApiCall[Any]) -> Response:
        body, strip_usage = self._upstream_body(call) if method == "POST" else (None, False)
        replica, upstream = await self._open(method, path, call, body)
        if self.pool.answered(replica, upstream.status):
            self.metrics.upstream_ejections.labels(replica.url).inc()
            log.warning("upstream %s ejected: %s", replica.url, replica.last_error)
        released = False

        def release() -> None:  # the request's place on the replica, once its answer is done
            nonlocal released
            if not released:
                released = True
                replica.in_flight -= 1

        headers = {
            k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS
        }
        media = upstream.headers.get("content-type", "")
        if "text/event-stream" not in media:
            try:
                content = await unless_disconnected(call.http, upstream.read())
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise BadGateway(
                    f"The upstream response broke off ({type(exc).__name__})."
                ) from None
            finally:
                upstream.close()  # a no-op once the body is read (the connection is pooled)
                release()
            call.ctx.first_token_at = call.ctx.first_token_at or time.perf_counter()
            self._note_usage(call, content, upstream.status)
            return Response(content, status_code=upstream.status, headers=headers)
        response = ManagedStreamingResponse(
            self._relay(upstream, call, UsageTap(strip_usage)),
            status_code=upstream.status,
            headers=headers,
        )
        # After a full stream the connection is already back in the pool and this does
        # nothing; a stream cut short (the client left) closes it, so the upstream sees the
        # disconnect and stops generating.
        response.on_close(upstream.close)
        response.on_close(release)
        return response

    async def _open(
        self, method: str, path: str, call: ApiCall[Any], body: bytes | None
    ) -> tuple[Upstream, aiohttp.ClientResponse]:
        """Send the request to a replica and return its response once the headers are in,
        the replica's in-flight count raised (the caller lowers it when the answer is done).
        A replica that refuses the connection is marked down and the next one is tried."""
        # The request's deadline bounds all of it, the streamed body included.
        timeout = aiohttp.ClientTimeout(
            total=max(1.0, call.deadline - time.monotonic()), sock_connect=self._connect_timeout_s
        )
        tried: list[Upstream] = []
        while (replica := self.pool.pick(tried)) is not None:
            tried.append(replica)
            request = self._client().request(
                method,
                replica.url + path,  # a base URL may carry a path prefix: append, don't resolve
                data=body,
                headers=self._headers(call),
                timeout=timeout,
            )
            replica.in_flight += 1
            try:
                upstream = await unless_disconnected(call.http, request)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Refused, or no connection in time (a hung or unplugged host): the request
                # never reached the replica, so it is safe to send it to another one.
                replica.in_flight -= 1
                self.pool.mark_down(replica, type(exc).__name__)
                self._connect_failures.labels(replica.url).inc()
                log.warning("upstream %s: no connection (%r); trying another", replica.url, exc)
                continue
            except BaseException as exc:
                replica.in_flight -= 1
                if isinstance(exc, asyncio.TimeoutError):
                    raise GatewayTimeout("The upstream server did not answer in time.") from None
                if isinstance(exc, aiohttp.ClientError):
                    raise Unavailable(
                        f"The upstream server is unreachable ({type(exc).__name__})."
                    ) from None
                raise
            self.pool.mark_up(replica)
            return replica, upstream
        if len(tried) == 1:
            raise Unavailable(f"The upstream server is unreachable ({tried[0].last_error}).")
        raise Unavailable(f"No upstream server is reachable ({len(tried)} tried).")

    def _upstream_body(self, call: ApiCall[Any]) -> tuple[bytes, bool]:
        """The client's bytes, or the same request asking for usage on a stream that did not
        (True: the usage event is the gateway's and is not relayed) and carrying its key's
        cache salt (`salt_by_key`)."""
        streaming = getattr(call.body, "stream", False)
        options = getattr(call.body, "stream_options", None)
        add_usage = self.ask_usage and streaming and not (options and options.include_usage)
        salt = cache_salt(call) if self.salt_by_key else None
        # Ours, not vLLM's or OpenAI's: an upstream may refuse a field it does not know.
        ours = "cache_share_system" in getattr(call.body, "model_fields_set", ())
        if not add_usage and salt is None and not ours:
            return call.raw, False
        data = json.loads(call.raw)
        data.pop("cache_share_system", None)
        if add_usage:
            data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
        if salt is not None:
            data["cache_salt"] = salt
        return json.dumps(data, ensure_ascii=False).encode("utf-8"), bool(add_usage)

    async def _relay(
        self, upstream: aiohttp.ClientResponse, call: ApiCall[Any], tap: UsageTap
    ) -> AsyncIterator[bytes]:
        first = True
        try:
            async for chunk in upstream.content.iter_any():
                data = tap.feed(chunk)
                if not data:
                    continue
                if first:
                    first = False
                    ttft = call.ctx.mark_first_token()
                    if ttft is not None and call.ctx.model:
                        self.metrics.ttft.labels(call.ctx.model).observe(ttft)
                yield data
            rest = tap.flush()
            if rest:
                yield rest
        except asyncio.TimeoutError:
            err: OpenAIError = GatewayTimeout("The request timed out before the upstream finished.")
            call.ctx.error_code = err.code
            yield sse_error(err)
        except aiohttp.ClientError as exc:
            err = BadGateway(f"The upstream stream broke off ({type(exc).__name__}).")
            call.ctx.error_code = err.code
            yield sse_error(err)
        finally:
            if tap.usage is not None:
                self._record_usage(call, tap.usage)

    def _note_usage(self, call: ApiCall[Any], body: bytes, status: int) -> None:
        if status != 200 or b'"usage"' not in body:
            return
        try:
            usage = json.loads(body).get("usage")
        except (ValueError, AttributeError):
            return
        if isinstance(usage, dict):
            self._record_usage(call, usage)

    def _record_usage(self, call: ApiCall[Any], usage: dict[str, Any]) -> None:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not (isinstance(prompt, int) and isinstance(completion, int)):
            return
        call.ctx.add_tokens(prompt=prompt, completion=completion)
        details = usage.get("prompt_tokens_details")  # vLLM reports it when asked to
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        hit = isinstance(cached, int) and cached > 0
        if hit:
            call.ctx.cached_tokens = cached
        if call.ctx.model:
            self.metrics.prompt_tokens.labels(call.ctx.model).inc(prompt)
            self.metrics.completion_tokens.labels(call.ctx.model).inc(completion)
            if hit:
                self.metrics.cached_prompt_tokens.labels(call.ctx.model).inc(cached)
