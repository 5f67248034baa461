"""The controller's state, in one object: the worker registry and the request table.

``workers`` maps a worker id to its entry (role, health, its last heartbeat, the requests it
holds); ``flights`` maps a request id to its Flight (committed tokens, phase, owner). Both are
changed only by the controller and the collaborators it hands this object to; the invariants
between them are ``check_integrity()``'s, which tests call when the cluster is idle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvrelay.cluster.controller.flights import Flight
from kvrelay.cluster.controller.worker_client import WorkerClient
from kvrelay.workers.worker import Heartbeat, WorkerInfo


@dataclass(slots=True)
class WorkerEntry:
    client: WorkerClient
    info: WorkerInfo
    role: str
    healthy: bool = True
    draining: bool = False
    heartbeat: Heartbeat | None = None
    assigned: set[str] = field(default_factory=set)  # request ids it owns or prefills


@dataclass(slots=True)
class DispatchCounters:
    """What dispatch did, for ``counters()`` (written by controller.py only)."""

    local_prefills: int = 0  # requests prefilled on their decode worker (no handoff)
    resubmissions: int = 0  # requests restarted after their worker died
    pulls: int = 0  # prefixes pulled from a peer instead of recomputed
    pull_bytes: int = 0
    event_deliveries: int = 0  # ``on_events`` calls received (one per worker sink call)
    event_tokens: int = 0  # tokens in them


@dataclass(slots=True)
class ControllerState:
    workers: dict[str, WorkerEntry] = field(default_factory=dict)  # the registry
    flights: dict[str, Flight] = field(default_factory=dict)  # the request table

    def pool(self, *roles: str) -> list[WorkerEntry]:
        """Workers that may take new work in one of ``roles``: healthy, not draining."""
        return [
            w for w in self.workers.values() if w.healthy and not w.draining and w.role in roles
        ]

    def release(self, flight: Flight) -> None:
        """The request's stream ended: it leaves the table and every worker's assignment."""
        self.flights.pop(flight.request_id, None)
        for w in self.workers.values():
            w.assigned.discard(flight.request_id)

    def check_integrity(self) -> dict[str, int]:
        """Raises AssertionError naming the first broken invariant; else the table's figures.

        Each entry is filed under its own id; every request a worker holds is in the table; a
        live flight's owner, when it has one and is not being moved, is a registered worker."""
        for wid, w in self.workers.items():
            assert w.info.worker_id == wid, f"worker {wid} filed under another id"
            stray = w.assigned - self.flights.keys()
            assert not stray, f"worker {wid} holds requests not in the table: {sorted(stray)}"
        for rid, f in self.flights.items():
            assert f.request_id == rid, f"flight {rid} filed under another id"
            if not f.done and not f.moving and f.owner is not None:
                assert f.owner in self.workers, f"flight {rid} owned by unknown {f.owner}"
        return {
            "workers": len(self.workers),
            "flights": len(self.flights),
            "assigned": sum(len(w.assigned) for w in self.workers.values()),
        }
