"""The Ray side of placement: read the cluster's nodes, notice joins and leaves, and keep the
controller's record of which worker runs on which node (decisions are in placement.py).

How the controller uses it (one event loop; no await between a decision and its record, so
concurrent ``add_worker`` calls never take the same slot)::

    pools = NodePools(PlacementPolicy.from_prefix(cfg.placement_resource_prefix, ...))
    await pools.refresh()                              # the nodes at start: not "joined"
    p = await pools.place(role, worker_id)             # Placement, recorded; raises NoCapacity
    handle = WorkerActor.options(name=..., **p.actor_options()).remote(...)
    ...
    change = await pools.poll()                        # the controller's node loop, every ~1 s
    for wid in change.failed: ...fail the worker (its node is gone)...
    for p in change.start: ...add_worker(p.role, placement=p)...  (then pools.record)
    pools.forget(worker_id)                            # a worker removed for any reason
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from kvrelay.cluster.placement.placement import (
    NodeDiff,
    NodeInfo,
    PlacedWorker,
    Placement,
    PlacementPolicy,
    diff_nodes,
    fill_plan,
    parse_nodes,
    place,
    workers_on,
)

NodeReader = Callable[[], tuple[NodeInfo, ...]]


def read_nodes() -> tuple[NodeInfo, ...]:
    """The connected Ray cluster's nodes (a blocking GCS call: use a thread from async code)."""
    import ray

    return parse_nodes(ray.nodes())


def local_node_ip(setting: str | None) -> str | None:
    """Resolve an address setting: ``"auto"`` -> this process's Ray node address (inside a Ray
    actor: the node it runs on, i.e. its ``--node-ip-address``), anything else as given."""
    if setting != "auto":
        return setting
    import ray

    return str(ray.util.get_node_ip_address())


class NodeWatcher:
    """Remembers the last node snapshot; ``poll()`` returns what changed since."""

    def __init__(self, read: NodeReader = read_nodes) -> None:
        self._read = read
        self.nodes: tuple[NodeInfo, ...] = ()

    def poll(self) -> NodeDiff:
        new = self._read()
        diff = diff_nodes(self.nodes, new)
        self.nodes = new
        return diff


@dataclass(frozen=True, slots=True)
class NodeChange:
    joined: tuple[NodeInfo, ...]
    left: tuple[NodeInfo, ...]
    failed: tuple[str, ...]  # workers that ran on the nodes that left (already forgotten)
    start: tuple[Placement, ...]  # workers to start on the pinned nodes that joined


class NodePools:
    def __init__(
        self, policy: PlacementPolicy, read: NodeReader = read_nodes, *, fill_joined: bool = True
    ) -> None:
        self.policy = policy
        self._read = read
        self._watcher = NodeWatcher(read)
        self._fill_joined = fill_joined
        self._placed: dict[str, PlacedWorker] = {}

    @property
    def nodes(self) -> tuple[NodeInfo, ...]:
        return self._watcher.nodes

    def placed(self) -> list[PlacedWorker]:
        return list(self._placed.values())

    def node_of(self, worker_id: str) -> NodeInfo | None:
        w = self._placed.get(worker_id)
        return next((n for n in self.nodes if w is not None and n.node_id == w.node_id), None)

    async def refresh(self) -> tuple[NodeInfo, ...]:
        """Take a snapshot as the baseline: what is there now is not reported as joined."""
        await asyncio.to_thread(self._watcher.poll)
        return self.nodes

    async def place(self, role: str, worker_id: str) -> Placement:
        """Choose a node for a new worker from a fresh node list and record it at once."""
        nodes = await asyncio.to_thread(self._read)
        decision = place(role, nodes, self.placed(), self.policy)
        self.record(worker_id, decision)
        return decision

    def record(self, worker_id: str, placement: Placement) -> None:
        if worker_id in self._placed:
            raise ValueError(f"worker {worker_id!r} is already placed")
        self._placed[worker_id] = PlacedWorker(worker_id, placement.role, placement.node_id)

    def forget(self, worker_id: str) -> bool:
        return self._placed.pop(worker_id, None) is not None

    async def poll(self) -> NodeChange:
        diff = await asyncio.to_thread(self._watcher.poll)
        failed = workers_on([n.node_id for n in diff.left], self.placed())
        for wid in failed:
            self.forget(wid)
        start: list[Placement] = []
        if self._fill_joined and diff.joined:
            start = fill_plan(
                self.nodes, self.placed(), self.policy, only=[n.node_id for n in diff.joined]
            )
        return NodeChange(diff.joined, diff.left, tuple(failed), tuple(start))

    def check_integrity(self) -> dict[str, int]:
        """No recorded worker sits on a node the last snapshot saw dead or gone (``poll`` forgets
        those); a node newer than the snapshot is fine. Returns counts."""
        seen = {n.node_id: n.alive for n in self.nodes}
        placed = self.placed()
        for w in placed:
            if seen.get(w.node_id, True) is False:
                raise AssertionError(f"worker {w.worker_id} is recorded on dead node {w.node_id}")
        return {"workers": len(placed), "nodes": len(seen), "alive_nodes": sum(seen.values())}
