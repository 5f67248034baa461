"""What the frontends (gRPC, OpenAI HTTP) need from the cluster: one narrow async interface.

For a served cluster, ``RemoteBackend`` (cluster/runtime/remote_backend.py) implements it over
the controller's Ray actor handle, so the frontends run in the ``kvrelay serve`` process rather
than in the controller; tests implement it over one in-process engine. Frontends validate and
tokenize at the edge, then call these methods; nothing here blocks the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvrelay.workers.types import SamplingParams, TokenEvent


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    max_context: int  # prompt + output tokens a request may hold
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    model: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: int = 0  # lower runs first
    tenant: str = ""
    # wall-clock time (time.time()) the request reached the frontend, stamped by it; workers
    # order and time requests by it (a re-dispatched or moved request keeps its place). 0: unknown
    arrival_s: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    worker_id: str
    role: str  # prefill | decode | colocated
    healthy: bool
    draining: bool
    node: str = ""
    kv_blocks: dict[str, dict[str, int]] = field(default_factory=dict)  # tier -> state -> blocks
    running: int = 0
    waiting: int = 0


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    workers: tuple[WorkerStatus, ...]
    in_flight: int


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    missing: tuple[str, ...] = ()  # configured roles with no worker that can take work
    problem: str = ""  # not ready for another reason (the controller is gone)
    # the longest prompt (tokens) the pools hold now (``admit``'s bound); None: not known
    largest_prompt: int | None = None

    def reason(self) -> str:
        if self.ready:
            return "ready"
        if self.problem:
            return self.problem
        return "no healthy worker in pool(s): " + ", ".join(self.missing)


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, token_ids: Sequence[int]) -> str: ...
    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]: ...


class ClusterBackend(Protocol):
    def models(self) -> Sequence[ModelInfo]: ...
    def tokenizer(self, model: str) -> TokenizerLike: ...
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's events; the last one has ``finish_reason`` set. Closing the
        iterator early (client gone) cancels the request and frees its blocks."""
        ...

    async def admit(self, request: GenerateRequest) -> None:
        """Called once before ``generate``: wait (bounded) until the cluster can take the
        request. Raises ``ApiError``: UNAVAILABLE when nothing can take it in time (startup,
        every worker drained or dead), INVALID_ARGUMENT when it can never fit."""
        ...

    def readiness(self) -> Readiness:
        """Whether every configured pool has a worker that can take work (``/ready``)."""
        ...

    async def cancel(self, request_id: str) -> bool: ...
    async def cluster_status(self) -> ClusterStatus: ...
    async def drain(self, worker_id: str) -> bool: ...

    async def undrain(self, worker_id: str) -> bool: ...
    async def notify_preemption(self, worker_id: str, deadline_s: float) -> bool: ...
