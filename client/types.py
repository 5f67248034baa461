"""What the client SDK returns: plain frozen values, independent of protobuf."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Timing:
    queue_s: float  # waiting for admission at the frontend
    ttft_s: float  # request arrival -> first token
    e2e_s: float  # request arrival -> last event


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """One streamed event. The first has only ``request_id``; the last has ``finish_reason``
    ("stop" | "length" | "abort"), ``usage`` and ``timing``."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    timing: Timing | None = None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    timing: Timing


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    max_context: int
    vocab_size: int


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    worker_id: str
    role: str
    healthy: bool
    draining: bool
    node: str
    kv_blocks: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # tier->state->n
    running: int = 0
    waiting: int = 0


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    workers: tuple[WorkerStatus, ...]
    in_flight: int
