"""asyncio client: ``await AsyncClient("host:50051").generate("Hello", max_tokens=16)``.

Same surface as ``Client``; streaming is ``generate_stream(...)`` (an async iterator; closing it
early cancels the request on the server) or ``await generate(..., stream=True)``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message as ProtoMessage

from kvrelay.client._common import (
    GENERATION,
    UNARY,
    ChannelConfig,
    Message,
    ResultBuilder,
    RetryPolicy,
    chunk_from_proto,
    generate_request,
    models_from_proto,
    serialize,
    status_from_proto,
)
from kvrelay.client.errors import from_rpc_error
from kvrelay.client.types import ClusterStatus, GenerationChunk, GenerationResult, ModelInfo
from kvrelay.proto.kvrelay.v1 import admin_pb2 as apb
from kvrelay.proto.kvrelay.v1 import generation_pb2 as gpb


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class AsyncClient:
    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_cert: str | bytes | Path | None = None,
        tls_server_name: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._cfg = ChannelConfig.build(target, api_key, tls, root_cert, tls_server_name)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel: grpc.aio.Channel | None = None  # made on first use, on the caller's loop

    def _chan(self) -> grpc.aio.Channel:
        if self._channel is None:
            creds = self._cfg.credentials()
            if creds is None:
                self._channel = grpc.aio.insecure_channel(
                    self._cfg.target, options=self._cfg.options()
                )
            else:
                self._channel = grpc.aio.secure_channel(
                    self._cfg.target, creds, options=self._cfg.options()
                )
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    # -- generation ------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Iterable[Message] | None = None,
        stream: bool = False,
        timeout: float | None = None,
        **params: Any,
    ) -> GenerationResult | AsyncIterator[GenerationChunk]:
        chunks = self.generate_stream(
            prompt, token_ids=token_ids, messages=messages, timeout=timeout, **params
        )
        if stream:
            return chunks
        builder = ResultBuilder()
        async for chunk in chunks:
            builder.add(chunk)
        return builder.result()

    async def chat(
        self, messages: Iterable[Message], *, stream: bool = False, **params: Any
    ) -> GenerationResult | AsyncIterator[GenerationChunk]:
        return await self.generate(messages=list(messages), stream=stream, **params)

    async def generate_stream(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Iterable[Message] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> AsyncIterator[GenerationChunk]:
        req = generate_request(prompt, token_ids=token_ids, messages=messages, **params)
        deadline = self._deadline(timeout)
        rpc = self._chan().unary_stream(
            GENERATION + "Generate",
            request_serializer=serialize,
            response_deserializer=gpb.GenerateResponse.FromString,
        )
        attempt = 0
        while True:
            attempt += 1
            call = rpc(req, timeout=_remaining(deadline), metadata=self._cfg.metadata())
            produced = False
            try:
                async for msg in call:
                    produced = True
                    yield chunk_from_proto(msg)
                return
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                wait = None if produced else self.retry.delay(attempt, err, _remaining(deadline))
                if wait is None:
                    raise err from None
            finally:
                call.cancel()  # no-op once finished; tells the server when we stop early
            await asyncio.sleep(wait)

    # -- unary calls -----------------------------------------------------------------------
    async def _unary(self, name: str, request: ProtoMessage, timeout: float | None) -> Any:
        prefix, resp_cls = UNARY[name]
        rpc = self._chan().unary_unary(
            prefix + name,
            request_serializer=serialize,
            response_deserializer=resp_cls.FromString,  # type: ignore[attr-defined]
        )
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await rpc(
                    request, timeout=_remaining(deadline), metadata=self._cfg.metadata()
                )
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                wait = self.retry.delay(attempt, err, _remaining(deadline))
                if wait is None:
                    raise err from None
            await asyncio.sleep(wait)

    async def cancel(self, request_id: str, *, timeout: float | None = None) -> bool:
        resp = await self._unary("Cancel", gpb.CancelRequest(request_id=request_id), timeout)
        return bool(resp.cancelled)

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        resp = await self._unary("ListModels", gpb.ListModelsRequest(), timeout)
        return models_from_proto(resp)

    async def cluster_status(self, *, timeout: float | None = None) -> ClusterStatus:
        resp = await self._unary("ClusterStatus", apb.ClusterStatusRequest(), timeout)
        return status_from_proto(resp)

    async def undrain(self, worker: str, *, timeout: float | None = None) -> bool:
        resp = await self._unary("Undrain", apb.DrainRequest(worker_id=worker), timeout)
        return bool(resp.accepted)

    async def drain(self, worker: str, *, timeout: float | None = None) -> bool:
        resp = await self._unary("Drain", apb.DrainRequest(worker_id=worker), timeout)
        return bool(resp.accepted)

    async def notify_preemption(
        self, worker: str, deadline_s: float, *, timeout: float | None = None
    ) -> bool:
        """``deadline_s``: seconds from now until the worker disappears."""
        req = apb.NotifyPreemptionRequest(worker_id=worker, deadline_in_s=deadline_s)
        return bool((await self._unary("NotifyPreemption", req, timeout)).accepted)
