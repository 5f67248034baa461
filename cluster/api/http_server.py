"""The OpenAI-compatible HTTP frontend (aiohttp, on the same event loop as the gRPC server).

Routes: POST /v1/completions, POST /v1/chat/completions (SSE when ``stream``), GET /v1/models,
GET /health (liveness), GET /ready (readiness, frontend_health.py), and optionally GET /metrics.
The listener bounds connections and header / body read times (http_guard.py). Errors use OpenAI's JSON shape with the HTTP status
of ``ErrorCode``; 429 carries ``Retry-After``. The runner cancels a handler whose client went
away (``handler_cancellation``), so the stream's ``finally`` frees the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from kvrelay.cluster.api.core import FrontendCore, RequestStream
from kvrelay.cluster.api.errors import ApiError, ErrorCode, invalid
from kvrelay.cluster.api.health import ReadinessTracker
from kvrelay.cluster.api.http_guard import GuardedListener, HttpLimits
from kvrelay.cluster.api.openai_schema import (
    ChatBody,
    CompletionBody,
    chat_chunk,
    chat_json,
    completion_chunk,
    completion_json,
    usage_chunk,
)
from kvrelay.workers.types import TokenEvent

log = logging.getLogger(__name__)
# /metrics: an aiohttp handler, or a callable returning the exposition bytes (sync or async)
MetricsHook = Callable[..., Any]


def error_response(err: ApiError) -> web.Response:
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
        headers["retry-after-ms"] = str(math.ceil(err.retry_after_s * 1000))
    return web.json_response(err.openai_body(), status=err.code.http_status, headers=headers)


def _sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class HttpFrontend:
    def __init__(
        self,
        core: FrontendCore,
        metrics: MetricsHook | None = None,
        ready: ReadinessTracker | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        self.core = core
        self.metrics = metrics
        self.ready = ready
        self.limits = limits or HttpLimits()
        self.listener: GuardedListener | None = None

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.core.limits.max_message_bytes, middlewares=[self._seen]
        )
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.readiness)
        if self.metrics is not None:
            app.router.add_get("/metrics", self.serve_metrics)
        return app

    @web.middleware
    async def _seen(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.listener is None:
            return await handler(request)  # type: ignore[no-any-return]
        self.listener.request_started(request.transport)  # the head arrived: its timer is over
        try:
            return await handler(request)  # type: ignore[no-any-return]
        finally:  # the next bytes on this connection begin the next request's head
            self.listener.request_done(request.transport)

    # -- routes ----------------------------------------------------------------------------
    async def readiness(self, request: web.Request) -> web.Response:
        """Readiness (frontend_health.py): 200 only when every configured pool can take work."""
        if self.ready is not None and self.ready.draining:
            return web.json_response({"status": "shutting down"}, status=503)
        state = self.core.backend.readiness()
        if state.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": state.reason()}, status=503,
                                 headers={"Retry-After": "1"})

    async def health(self, request: web.Request) -> web.Response:
        """Liveness: the process and its event loop answer."""
        ok = bool(self.core.backend.models())
        return web.json_response({"status": "ok" if ok else "no model"}, status=200 if ok else 503)

    async def serve_metrics(self, request: web.Request) -> web.StreamResponse:
        assert self.metrics is not None
        params = inspect.signature(self.metrics).parameters
        result = self.metrics(request) if params else self.metrics()
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, web.StreamResponse):
            return result
        return web.Response(
            body=result,
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type": "version=0.0.4"},
        )

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            self.core.authorize(request.headers.get("Authorization"), admin=False)
        except ApiError as err:
            return error_response(err)
        data = [
            {
                "id": m.id,
                "object": "model",
                "created": 0,
                "owned_by": "kvrelay",
                "max_model_len": m.max_context,
            }
            for m in self.core.backend.models()
        ]
        return web.json_response({"object": "list", "data": data})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CompletionBody, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, ChatBody, chat=True)

    # -- generation ------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            data = await asyncio.wait_for(request.read(), self.limits.body_timeout_s)
        except TimeoutError as exc:
            raise BodyTimeout(
                f"request body not received within {self.limits.body_timeout_s:g} s"
            ) from exc
        except web.HTTPRequestEntityTooLarge as exc:
            raise invalid(
                f"request body larger than {self.core.limits.max_message_bytes} bytes"
            ) from exc
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise invalid(f"request body is not valid JSON: {str(exc)[:200]}") from exc
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        return body

    async def _generate(
        self,
        request: web.Request,
        schema: type[ChatBody] | type[CompletionBody],
        *,
        chat: bool,
    ) -> web.StreamResponse:
        stream: RequestStream | None = None
        try:
            caller = self.core.authorize(request.headers.get("Authorization"), admin=False)
            body = await self._body(request)
            parsed = schema.parse(body)  # every field's type, once; ranges: core.start
            streaming, include_usage = parsed.stream_mode()
            raw = parsed.raw()
            stream = await self.core.start(
                raw, id_prefix="chatcmpl-" if chat else "cmpl-", caller=caller
            )
            if streaming:
                return await self._stream(request, stream, chat, include_usage)
            return await self._collect(stream, chat)
        except BodyTimeout as exc:  # the connection cannot be reused: its body is half-read
            resp = web.json_response(
                ApiError(ErrorCode.DEADLINE_EXCEEDED, str(exc)).openai_body(), status=408,
                headers={"Connection": "close"},
            )
            resp.force_close()
            return resp
        except ApiError as err:
            return error_response(err)
        except Exception:
            log.exception("request %s failed", stream.request_id if stream else "(not started)")
            return error_response(ApiError(ErrorCode.INTERNAL, "internal error"))
        finally:
            if stream is not None:
                await stream.close()

    async def _collect(self, stream: RequestStream, chat: bool) -> web.Response:
        parts = [ev.text async for ev in stream.events()]
        build = chat_json if chat else completion_json
        body = build(
            stream.request_id,
            int(time.time()),
            stream.request.model,
            "".join(parts),
            stream.finish_reason,
            stream.usage,
        )
        return web.json_response(body, headers={"x-request-id": stream.request_id})

    async def _stream(
        self, request: web.Request, stream: RequestStream, chat: bool, include_usage: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "x-request-id": stream.request_id,
            }
        )
        rid, model, created = stream.request_id, stream.request.model, int(time.time())
        send: Callable[[bytes], Awaitable[None]] = resp.write
        # the status line waits for the first event, so a request that cannot be placed
        # (UNAVAILABLE after the bounded wait) still gets its 503 rather than an in-band error
        events = aiter(stream.events())
        try:
            head: TokenEvent | None = await anext(events)
        except StopAsyncIteration:
            head = None
        await resp.prepare(request)
        try:
            if chat:
                first = chat_chunk(
                    rid, created, model, {"role": "assistant", "content": ""}, None, include_usage
                )
                await send(_sse(first))
            async for ev in _chain(head, events):
                if not ev.text and ev.finish_reason is None:
                    continue
                if chat:
                    if ev.text:
                        delta = {"content": ev.text}
                        await send(
                            _sse(chat_chunk(rid, created, model, delta, None, include_usage))
                        )
                    if ev.finish_reason is not None:
                        await send(
                            _sse(
                                chat_chunk(rid, created, model, {}, ev.finish_reason, include_usage)
                            )
                        )
                    continue
                chunk = completion_chunk(
                    rid, created, model, ev.text, ev.finish_reason, include_usage
                )
                await send(_sse(chunk))
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                await send(_sse(usage_chunk(rid, created, model, obj, stream.usage)))
            await send(b"data: [DONE]\n\n")
        except ConnectionResetError:
            log.debug("client of %s went away", rid)
        except Exception as exc:  # the stream has started: report in-band, then end it
            err = (
                exc if isinstance(exc, ApiError) else ApiError(ErrorCode.INTERNAL, "internal error")
            )
            if not isinstance(exc, ApiError):
                log.exception("stream %s failed", rid)
            with contextlib.suppress(ConnectionResetError):
                await send(_sse(err.openai_body()))
        return resp


async def _chain(
    first: TokenEvent | None, rest: AsyncIterator[TokenEvent]
) -> AsyncIterator[TokenEvent]:
    if first is None:
        return
    yield first
    async for ev in rest:
        yield ev


class BodyTimeout(Exception):
    """The client promised a body (Content-Length) and did not send it in time."""


class HttpServer:
    """The running HTTP frontend: aiohttp's runner behind a GuardedListener."""

    def __init__(self, runner: web.AppRunner, listener: GuardedListener) -> None:
        self.runner = runner
        self.listener = listener

    async def cleanup(self) -> None:
        await self.listener.close()
        await self.runner.cleanup()


async def start_http_server(
    core: FrontendCore,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    metrics: MetricsHook | None = None,
    ready: ReadinessTracker | None = None,
    limits: HttpLimits | None = None,
) -> tuple[HttpServer, int]:
    frontend = HttpFrontend(core, metrics, ready, limits)
    runner = web.AppRunner(
        frontend.app(), handler_cancellation=True, access_log=None,
        keepalive_timeout=frontend.limits.keepalive_timeout_s,
        # after an error reply aiohttp drains the unread body for up to this long: a client
        # that never sends it must not hold the connection 10 s (the default) more
        lingering_time=1.0,
    )
    await runner.setup()
    try:
        listener = await GuardedListener.start(runner, host, port, ssl_context, frontend.limits)
    except BaseException:
        await runner.cleanup()
        raise
    frontend.listener = listener
    log.info("HTTP frontend listening on %s:%d (tls=%s)", host, listener.port,
             ssl_context is not None)
    return HttpServer(runner, listener), listener.port
