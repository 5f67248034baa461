"""Preemption notices: what every notice source (Kubernetes watcher, cloud metadata poller,
admin RPC, SIGTERM) hands the controller, and the sink they hand it through.

Sources run in threads (the Kubernetes client blocks) or on the event loop (the poller); both
call a ``NoticeSink``. ``queue_sink`` turns an ``asyncio.Queue`` into one that is safe to call
from any thread, so the controller consumes one queue whatever the source.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone


class NoticeKind(str, enum.Enum):
    WORKER = "worker"  # target is a worker id
    NODE = "node"  # target is a Kubernetes node (or host) name: every worker on it leaves
    POD = "pod"  # target is "namespace/pod"; ``node`` names the node it runs on


@dataclass(frozen=True, slots=True)
class PreemptionNotice:
    target: str
    kind: NoticeKind
    deadline_s: float  # absolute time.time() by which the target is gone
    source: str  # "k8s-node", "k8s-pod", "metadata", "admin", "sigterm"
    reason: str  # human-readable: the taint, the endpoint's answer, ...
    node: str = ""  # the node a POD or WORKER target runs on, when known


NoticeSink = Callable[[PreemptionNotice], None]


def queue_sink(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[PreemptionNotice]
) -> NoticeSink:
    """A sink that any thread may call: it schedules ``queue.put_nowait`` on ``loop``."""

    def put(notice: PreemptionNotice) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, notice)

    return put


def parse_rfc3339(text: str) -> float:
    """'2026-11-24T01:02:03Z' (Kubernetes and AWS timestamps, optional fraction or offset)
    -> time.time() seconds. Raises ValueError on anything else."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"not a timestamp: {text!r}")
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()
