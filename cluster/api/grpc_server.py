"""The gRPC frontend (grpc.aio): ``kvrelay.v1.Generation`` and ``kvrelay.v1.Admin``, plus the
standard health and reflection services.

Handlers take raw request bytes (identity deserializer) and parse them here, so bytes that are
not a valid protobuf message get INVALID_ARGUMENT instead of grpc's generic INTERNAL.
A client that disconnects (or whose deadline passes) cancels the handler task; the stream's
``finally`` closes the backend iterator, which frees the request's blocks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvrelay.cluster.api.auth import Caller
from kvrelay.cluster.api.backend import ClusterStatus
from kvrelay.cluster.api.core import FrontendCore, RequestStream
from kvrelay.cluster.api.errors import ApiError, invalid
from kvrelay.cluster.api.validation import RawGenerate
from kvrelay.proto.kvrelay.v1 import admin_pb2 as apb
from kvrelay.proto.kvrelay.v1 import generation_pb2 as gpb
from kvrelay.workers.types import FinishReason, TokenEvent

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

_FINISH = {
    FinishReason.STOP: gpb.FINISH_REASON_STOP,
    FinishReason.LENGTH: gpb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: gpb.FINISH_REASON_ABORT,
}
GENERATION = "kvrelay.v1.Generation"
ADMIN = "kvrelay.v1.Admin"


def _parse(cls: type[M], data: bytes) -> M:
    try:
        return cls.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise invalid(f"request is not a valid {cls.DESCRIPTOR.full_name} message") from exc


def raw_from_proto(req: gpb.GenerateRequest) -> RawGenerate:
    sp = req.sampling
    kind = req.WhichOneof("prompt")

    def opt(name: str) -> Any:
        return getattr(sp, name) if sp.HasField(name) else None

    return RawGenerate(
        model=req.model,
        text=req.text if kind == "text" else None,
        token_ids=tuple(req.token_ids.ids) if kind == "token_ids" else None,
        messages=tuple((m.role, m.content) for m in req.chat.messages) if kind == "chat" else None,
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        top_k=opt("top_k"),
        min_p=opt("min_p"),
        repetition_penalty=opt("repetition_penalty"),
        seed=opt("seed"),
        max_tokens=opt("max_tokens"),
        stop=tuple(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        priority=req.priority,
        tenant=req.tenant_id,
        request_id=req.request_id,
        default_max_tokens=None if kind == "chat" else 16,
    )


def status_to_proto(status: ClusterStatus) -> apb.ClusterStatusResponse:
    out = apb.ClusterStatusResponse(in_flight=status.in_flight)
    for w in status.workers:
        pw = out.workers.add(
            worker_id=w.worker_id,
            role=w.role,
            healthy=w.healthy,
            draining=w.draining,
            node=w.node,
            running=w.running,
            waiting=w.waiting,
        )
        for tier, states in w.kv_blocks.items():
            pw.kv_blocks[tier].blocks_by_state.update(states)
    return out


async def _abort(context: grpc.aio.ServicerContext, err: ApiError) -> None:
    trailers: tuple[tuple[str, str], ...] = ()
    if err.retry_after_s is not None:
        trailers = (("retry-after-ms", str(math.ceil(err.retry_after_s * 1000))),)
    await context.abort(err.code.grpc_status, err.message, trailing_metadata=trailers)


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _event(stream: RequestStream, ev: TokenEvent) -> gpb.GenerateResponse:
    msg = gpb.GenerateResponse(request_id=stream.request_id, token_ids=ev.token_ids, text=ev.text)
    if ev.finish_reason is not None:
        u, t = stream.usage, stream.timing()
        msg.finish_reason = _FINISH[ev.finish_reason]
        msg.usage.CopyFrom(
            gpb.Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                cached_tokens=u.cached_tokens,
            )
        )
        msg.timing.CopyFrom(gpb.Timing(queue_s=t.queue_s, ttft_s=t.ttft_s, e2e_s=t.e2e_s))
    return msg


class GrpcFrontend:
    def __init__(self, core: FrontendCore) -> None:
        self.core = core

    async def generate(
        self, data: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        stream: RequestStream | None = None
        try:
            caller = self.core.authorize(_authorization(context), admin=False)
            raw = raw_from_proto(_parse(gpb.GenerateRequest, data))
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.time() + remaining
            stream = await self.core.start(raw, deadline_s=deadline, caller=caller)
            await context.send_initial_metadata((("x-request-id", stream.request_id),))
            yield gpb.GenerateResponse(request_id=stream.request_id).SerializeToString()
            async for ev in stream.events():
                yield _event(stream, ev).SerializeToString()
        except ApiError as err:
            await _abort(context, err)
        except Exception:
            log.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            if stream is not None:
                await stream.close()

    async def cancel(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._unary(context, False, self._cancel, data)

    async def _cancel(self, data: bytes, caller: Caller) -> Message:
        req = _parse(gpb.CancelRequest, data)
        if not req.request_id:
            raise invalid("request_id is empty", "request_id")
        return gpb.CancelResponse(cancelled=await self.core.cancel(req.request_id, caller))

    async def list_models(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._unary(context, False, self._list_models, data)

    async def _list_models(self, data: bytes, caller: Caller) -> Message:
        _parse(gpb.ListModelsRequest, data)
        return gpb.ListModelsResponse(
            models=[
                gpb.Model(id=m.id, max_context=m.max_context, vocab_size=m.vocab_size)
                for m in self.core.backend.models()
            ]
        )

    async def cluster_status(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._unary(context, True, self._cluster_status, data)

    async def _cluster_status(self, data: bytes, caller: Caller) -> Message:
        _parse(apb.ClusterStatusRequest, data)
        return status_to_proto(await self.core.backend.cluster_status())

    async def drain(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._unary(context, True, self._drain, data)

    async def _drain(self, data: bytes, caller: Caller) -> Message:
        req = _parse(apb.DrainRequest, data)
        if not req.worker_id:
            raise invalid("worker_id is empty", "worker_id")
        return apb.DrainResponse(accepted=await self.core.backend.drain(req.worker_id))

    async def undrain(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._unary(context, True, self._undrain, data)

    async def _undrain(self, data: bytes, caller: Caller) -> Message:
        req = _parse(apb.DrainRequest, data)
        if not req.worker_id:
            raise invalid("worker_id is empty", "worker_id")
        return apb.DrainResponse(accepted=await self.core.backend.undrain(req.worker_id))

    async def notify_preemption(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._unary(context, True, self._notify, data)

    async def _notify(self, data: bytes, caller: Caller) -> Message:
        req = _parse(apb.NotifyPreemptionRequest, data)
        if not req.worker_id:
            raise invalid("worker_id is empty", "worker_id")
        if not (math.isfinite(req.deadline_in_s) and req.deadline_in_s >= 0):
            raise invalid(f"deadline_in_s must be finite and >= 0; got {req.deadline_in_s}")
        ok = await self.core.backend.notify_preemption(
            req.worker_id, time.time() + req.deadline_in_s
        )
        return apb.NotifyPreemptionResponse(accepted=ok)

    async def _unary(
        self,
        context: grpc.aio.ServicerContext,
        admin: bool,
        fn: Callable[[bytes, Caller], Awaitable[Message]],
        data: bytes,
    ) -> bytes:
        try:
            caller = self.core.authorize(_authorization(context), admin=admin)
            return (await fn(data, caller)).SerializeToString()
        except ApiError as err:
            await _abort(context, err)
        except Exception:
            log.exception("%s failed", getattr(fn, "__name__", "call"))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable: abort raises")

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        # No (de)serializers: the methods get and return bytes.
        gen = {
            "Generate": grpc.unary_stream_rpc_method_handler(self.generate),
            "Cancel": grpc.unary_unary_rpc_method_handler(self.cancel),
            "ListModels": grpc.unary_unary_rpc_method_handler(self.list_models),
        }
        adm = {
            "ClusterStatus": grpc.unary_unary_rpc_method_handler(self.cluster_status),
            "Drain": grpc.unary_unary_rpc_method_handler(self.drain),
            "Undrain": grpc.unary_unary_rpc_method_handler(self.undrain),
            "NotifyPreemption": grpc.unary_unary_rpc_method_handler(self.notify_preemption),
        }
        return [
            grpc.method_handlers_generic_handler(GENERATION, gen),
            grpc.method_handlers_generic_handler(ADMIN, adm),
        ]


async def start_grpc_server(
    core: FrontendCore,
    *,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start the gRPC server on the running loop; returns (server, bound port, health)."""
    max_bytes = core.limits.max_message_bytes
    lim = core.limits
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.max_connection_idle_ms", 300_000),  # an idle connection goes after 5 min
        ],
        # a bound on calls in progress, far enough above admission's own (streams + queue)
        # that clients normally meet admission's RESOURCE_EXHAUSTED with its retry hint first
        maximum_concurrent_rpcs=2 * (lim.max_streams + lim.max_queue) + 64,
    )
    server.add_generic_rpc_handlers(GrpcFrontend(core).handlers())
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        GENERATION,
        ADMIN,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    address = f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"gRPC server could not bind {address}")
    await server.start()
    # "" and GENERATION follow the backend's readiness (frontend_health.py); ADMIN always serves
    await health_servicer.set(ADMIN, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC frontend listening on %s:%d (tls=%s)", host, bound, credentials is not None)
    return server, bound, health_servicer
