"""The HTTP frontend's listener, with the limits aiohttp does not have on its own.

aiohttp's server waits forever for a request's headers and keeps any number of connections.
``GuardedListener`` sits between the listening socket and aiohttp's protocol factory:

* at most ``max_connections`` open connections; one more is closed at once;
* a connection that has not delivered a complete request head within ``header_timeout_s`` of
  opening, or of the first byte of a later request on a kept-alive connection, is closed
  (slow-header clients); an idle kept-alive connection is aiohttp's ``keepalive_timeout``'s.
  Bytes of a next request pipelined while one is answered do not start the clock;
* request bodies are read under ``body_timeout_s`` by the handler (frontend_http.py), which
  answers 408 and closes the connection.

    listener = await GuardedListener.start(runner, host, port, ssl_context, limits)
    listener.port; await listener.close()   # then runner.cleanup()
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    header_timeout_s: float = 10.0  # open -> complete request head
    body_timeout_s: float = 30.0  # reading a request body
    keepalive_timeout_s: float = 75.0  # an idle kept-alive connection
    max_connections: int = 1024


class _Guarded(asyncio.Protocol):
    """Forwards to aiohttp's RequestHandler; closes the transport when a limit says so."""

    def __init__(self, listener: GuardedListener, inner: Any) -> None:
        self._listener = listener
        self._inner = inner
        self._timer: asyncio.TimerHandle | None = None
        self._in_request = False  # a head arrived and its handler has not returned yet
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        lim = self._listener.limits
        if len(self._listener.open) >= lim.max_connections:
            log.warning("HTTP connection refused: %d open", len(self._listener.open))
            transport.abort()
            return
        self._listener.open[id(transport)] = self
        self._timer = asyncio.get_running_loop().call_later(
            lim.header_timeout_s, self._head_timeout
        )
        self._inner.connection_made(transport)

    def request_started(self) -> None:
        self._in_request = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_done(self) -> None:
        self._in_request = False

    def _head_timeout(self) -> None:
        self._timer = None
        if self.transport is not None:
            log.info("closing an HTTP connection that sent no complete request in time")
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self._in_request and self._timer is None:  # the next request's head begins
            self._timer = asyncio.get_running_loop().call_later(
                self._listener.limits.header_timeout_s, self._head_timeout
            )
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return bool(self._inner.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None and self._listener.open.get(id(self.transport)) is self:
            del self._listener.open[id(self.transport)]
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class GuardedListener:
    def __init__(self, runner: web.AppRunner, limits: HttpLimits) -> None:
        self.runner = runner
        self.limits = limits
        self.open: dict[int, _Guarded] = {}  # id(transport) -> connection
        self._server: asyncio.Server | None = None
        self.port = 0

    def _protocol(self) -> _Guarded:
        assert self.runner.server is not None
        return _Guarded(self, self.runner.server())

    def request_started(self, transport: Any) -> None:
        """A request head arrived on ``transport`` (called by the app's middleware)."""
        conn = self.open.get(id(transport))
        if conn is not None and conn.transport is transport:
            conn.request_started()

    def request_done(self, transport: Any) -> None:
        """The handler of the request on ``transport`` returned (called by the middleware)."""
        conn = self.open.get(id(transport))
        if conn is not None and conn.transport is transport:
            conn.request_done()

    @classmethod
    async def start(cls, runner: web.AppRunner, host: str, port: int,
                    ssl_context: ssl.SSLContext | None, limits: HttpLimits) -> GuardedListener:
        self = cls(runner, limits)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, host, port, ssl=ssl_context, reuse_address=True, backlog=128
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()  # stop listening; runner.cleanup() closes the connections
            self._server = None
