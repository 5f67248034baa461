"""Blocking client: ``Client("host:50051").generate("Hello", max_tokens=16)``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

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


class Client:
    """A kvrelay gRPC client. ``timeout`` (seconds) is the default per-call deadline, covering
    retries; every method takes its own ``timeout`` too. Use as a context manager or ``close()``.
    """

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
        creds = self._cfg.credentials()
        if creds is None:
            self._channel = grpc.insecure_channel(target, options=self._cfg.options())
        else:
            self._channel = grpc.secure_channel(target, creds, options=self._cfg.options())
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._generate_rpc = self._channel.unary_stream(
            GENERATION + "Generate",
            request_serializer=serialize,
            response_deserializer=gpb.GenerateResponse.FromString,
        )
        self._unary_rpc = {
            name: self._channel.unary_unary(
                prefix + name,
                request_serializer=serialize,
                response_deserializer=resp.FromString,  # type: ignore[attr-defined]
            )
            for name, (prefix, resp) in UNARY.items()
        }

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    # -- generation ------------------------------------------------------------------------
    @overload
    def generate(
        self, prompt: str | None = ..., *, stream: Literal[False] = ..., **kwargs: Any
    ) -> GenerationResult: ...
    @overload
    def generate(
        self, prompt: str | None = ..., *, stream: Literal[True], **kwargs: Any
    ) -> Iterator[GenerationChunk]: ...

    def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Iterable[Message] | None = None,
        stream: bool = False,
        timeout: float | None = None,
        **params: Any,
    ) -> GenerationResult | Iterator[GenerationChunk]:
        """Generate from a prompt, token ids or chat messages. ``params``: model, max_tokens,
        temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, stop_token_ids,
        ignore_eos, priority, tenant, request_id. ``stream=True`` returns an iterator of
        chunks; closing it early cancels the request on the server."""
        req = generate_request(prompt, token_ids=token_ids, messages=messages, **params)
        chunks = self._stream(req, self._deadline(timeout))
        if stream:
            return chunks
        builder = ResultBuilder()
        for chunk in chunks:
            builder.add(chunk)
        return builder.result()

    def chat(
        self, messages: Iterable[Message], *, stream: bool = False, **params: Any
    ) -> GenerationResult | Iterator[GenerationChunk]:
        return self.generate(messages=list(messages), stream=stream, **params)  # type: ignore[call-overload,no-any-return]

    def _stream(
        self, req: gpb.GenerateRequest, deadline: float | None
    ) -> Iterator[GenerationChunk]:
        attempt = 0
        while True:
            attempt += 1
            call = self._generate_rpc(
                req, timeout=_remaining(deadline), metadata=self._cfg.metadata()
            )
            produced = False
            try:
                for msg in call:
                    produced = True
                    yield chunk_from_proto(msg)
                return
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                wait = None if produced else self.retry.delay(attempt, err, _remaining(deadline))
                if wait is None:
                    raise err from None
            finally:
                call.cancel()  # no-op once finished; tells the server when we stop early
            time.sleep(wait)

    # -- unary calls -----------------------------------------------------------------------
    def _unary(self, name: str, request: ProtoMessage, timeout: float | None) -> Any:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._unary_rpc[name](
                    request, timeout=_remaining(deadline), metadata=self._cfg.metadata()
                )
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                wait = self.retry.delay(attempt, err, _remaining(deadline))
                if wait is None:
                    raise err from None
            time.sleep(wait)

    def cancel(self, request_id: str, *, timeout: float | None = None) -> bool:
        resp = self._unary("Cancel", gpb.CancelRequest(request_id=request_id), timeout)
        return bool(resp.cancelled)

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return models_from_proto(self._unary("ListModels", gpb.ListModelsRequest(), timeout))

    def cluster_status(self, *, timeout: float | None = None) -> ClusterStatus:
        return status_from_proto(self._unary("ClusterStatus", apb.ClusterStatusRequest(), timeout))

    def drain(self, worker: str, *, timeout: float | None = None) -> bool:
        return bool(self._unary("Drain", apb.DrainRequest(worker_id=worker), timeout).accepted)

    def undrain(self, worker: str, *, timeout: float | None = None) -> bool:
        return bool(self._unary("Undrain", apb.DrainRequest(worker_id=worker), timeout).accepted)

    def notify_preemption(
        self, worker: str, deadline_s: float, *, timeout: float | None = None
    ) -> bool:
        """``deadline_s``: seconds from now until the worker disappears."""
        req = apb.NotifyPreemptionRequest(worker_id=worker, deadline_in_s=deadline_s)
        return bool(self._unary("NotifyPreemption", req, timeout).accepted)
