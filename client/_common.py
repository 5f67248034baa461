"""What the sync and asyncio clients share: request building, response conversion, the retry
policy and channel settings. No I/O here."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import Message as ProtoMessage

from kvrelay.client.errors import KvrelayError, ResourceExhaustedError, UnavailableError
from kvrelay.client.types import (
    ClusterStatus,
    GenerationChunk,
    GenerationResult,
    ModelInfo,
    Timing,
    Usage,
    WorkerStatus,
)
from kvrelay.proto.kvrelay.v1 import admin_pb2 as apb
from kvrelay.proto.kvrelay.v1 import generation_pb2 as gpb

GENERATION = "/kvrelay.v1.Generation/"
ADMIN = "/kvrelay.v1.Admin/"
_FINISH = {
    gpb.FINISH_REASON_STOP: "stop",
    gpb.FINISH_REASON_LENGTH: "length",
    gpb.FINISH_REASON_ABORT: "abort",
}
Message = Mapping[str, str] | tuple[str, str]


def serialize(msg: ProtoMessage) -> bytes:
    return msg.SerializeToString()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter. Only calls that cannot have had an effect are
    retried: UNAVAILABLE (no response yet) and RESOURCE_EXHAUSTED with the server's
    ``retry-after-ms`` hint (refused at admission; the hint is the lower bound of the wait).
    A stream that produced any event is never retried."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def delay(self, attempt: int, err: KvrelayError, remaining_s: float | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (attempt counts from 1), or None to
        give up and raise ``err``."""
        if attempt >= self.max_attempts:
            return None
        if not isinstance(err, (UnavailableError, ResourceExhaustedError)):
            return None
        if isinstance(err, ResourceExhaustedError) and err.retry_after is None:
            return None  # no hint: not admission (e.g. a message over the size limit)
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        wait = random.uniform(0.0, cap)
        if isinstance(err, ResourceExhaustedError) and err.retry_after is not None:
            wait = max(wait, err.retry_after)
        if remaining_s is not None and wait >= remaining_s:
            return None
        return wait


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    target: str
    api_key: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    tls_server_name: str | None = None

    @classmethod
    def build(
        cls,
        target: str,
        api_key: str | None,
        tls: bool,
        root_cert: str | bytes | Path | None,
        tls_server_name: str | None,
    ) -> ChannelConfig:
        root: bytes | None = None
        if root_cert is not None:
            root = root_cert if isinstance(root_cert, bytes) else Path(root_cert).read_bytes()
        return cls(target, api_key, tls or root is not None, root, tls_server_name)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def options(self) -> list[tuple[str, str | int]]:
        opts: list[tuple[str, str | int]] = [("grpc.max_receive_message_length", 64 << 20)]
        if self.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return opts

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if not self.api_key:
            return ()
        return (("authorization", f"Bearer {self.api_key}"),)


def generate_request(
    prompt: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    messages: Iterable[Message] | None = None,
    model: str = "",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    priority: int = 0,
    tenant: str = "",
    request_id: str = "",
) -> gpb.GenerateRequest:
    given = sum(x is not None for x in (prompt, token_ids, messages))
    if given != 1:
        raise ValueError("give exactly one of prompt, token_ids, messages")
    req = gpb.GenerateRequest(
        model=model, priority=priority, tenant_id=tenant, request_id=request_id
    )
    if prompt is not None:
        req.text = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        assert messages is not None
        req.chat.SetInParent()
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
            req.chat.messages.add(role=role, content=content)
    sp = req.sampling
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("min_p", min_p),
        ("repetition_penalty", repetition_penalty),
        ("seed", seed),
    ):
        if value is not None:
            setattr(sp, name, value)
    sp.stop.extend([stop] if isinstance(stop, str) else stop)
    sp.stop_token_ids.extend(stop_token_ids)
    sp.ignore_eos = ignore_eos
    return req


def chunk_from_proto(msg: gpb.GenerateResponse) -> GenerationChunk:
    finished = msg.finish_reason != gpb.FINISH_REASON_UNSPECIFIED
    return GenerationChunk(
        request_id=msg.request_id,
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        finish_reason=_FINISH.get(msg.finish_reason) if finished else None,
        usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens)
        if finished
        else None,
        timing=Timing(msg.timing.queue_s, msg.timing.ttft_s, msg.timing.e2e_s)
        if finished
        else None,
    )


class ResultBuilder:
    """Folds a stream of chunks into one GenerationResult."""

    def __init__(self) -> None:
        self.request_id = ""
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.last: GenerationChunk | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.request_id = chunk.request_id or self.request_id
        self.tokens.extend(chunk.token_ids)
        self.text.append(chunk.text)
        if chunk.finish_reason is not None:
            self.last = chunk

    def result(self) -> GenerationResult:
        last = self.last
        if last is None or last.usage is None or last.timing is None or not last.finish_reason:
            raise UnavailableError("the stream ended without a final event")
        return GenerationResult(
            self.request_id,
            "".join(self.text),
            tuple(self.tokens),
            last.finish_reason,
            last.usage,
            last.timing,
        )


def models_from_proto(msg: gpb.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(m.id, m.max_context, m.vocab_size) for m in msg.models]


def status_from_proto(msg: apb.ClusterStatusResponse) -> ClusterStatus:
    workers = tuple(
        WorkerStatus(
            worker_id=w.worker_id,
            role=w.role,
            healthy=w.healthy,
            draining=w.draining,
            node=w.node,
            kv_blocks={t: dict(b.blocks_by_state) for t, b in w.kv_blocks.items()},
            running=w.running,
            waiting=w.waiting,
        )
        for w in msg.workers
    )
    return ClusterStatus(workers, msg.in_flight)


# unary method -> (service path prefix, response class)
UNARY = {
    "Cancel": (GENERATION, gpb.CancelResponse),
    "ListModels": (GENERATION, gpb.ListModelsResponse),
    "ClusterStatus": (ADMIN, apb.ClusterStatusResponse),
    "Drain": (ADMIN, apb.DrainResponse),
    "Undrain": (ADMIN, apb.DrainResponse),
    "NotifyPreemption": (ADMIN, apb.NotifyPreemptionResponse),
}
