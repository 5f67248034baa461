"""Where a worker of a role goes on a multi-node Ray cluster, and which nodes joined or left.

Decision core (pure: node snapshots and the current placement in, a typed decision out):

    parse_nodes(ray.nodes())                     -> tuple[NodeInfo, ...]
    place(role, nodes, placed, policy)           -> Placement (raises NoCapacity)
    fill_plan(nodes, placed, policy)             -> Placements filling pinned nodes' free slots
    diff_nodes(old, new)                         -> NodeDiff(joined, left)
    workers_on(node_ids, placed)                 -> worker ids to fail when their node left

A pool is pinned to a node group in one of two ways (``PlacementPolicy``):

* a custom resource per role (``kvrelay_prefill`` / ``kvrelay_decode`` / ``kvrelay_colocated``,
  what ``kvrelay node --role`` advertises): its count on a node is that node's worker slots for
  the role, and the worker's actor options request one unit, so Ray enforces the slots too;
* node labels (``pool_labels``: role -> {label: value}), e.g. ``{"decode": {"pool": "decode"}}``.

A role with no pinned node anywhere may go to any node with a free compute slot, nodes not
pinned to another role first. Compute slots: one worker per GPU on CUDA nodes
(``gpus_per_worker``), otherwise one per ``cpus_per_worker`` cores; every kvrelay worker on a
node uses one, whatever its role. The chosen node is fixed with a hard ``NodeAffinity``, so
the controller knows each worker's node and address before the worker starts.

The Ray side (reading nodes, watching them, the controller's bookkeeping) is in node_pools.py.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from kvrelay.workers.types import ROLES

ROLE_RESOURCES: Mapping[str, str] = MappingProxyType(
    {"prefill": "kvrelay_prefill", "decode": "kvrelay_decode", "colocated": "kvrelay_colocated"}
)
DEVICES = ("auto", "cpu", "cuda")
ROLE_LABEL = "kvrelay.io/role"  # the label ``kvrelay node --role`` sets


class NoCapacity(RuntimeError):
    """No alive node has a free slot for the role (the message says why)."""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    ip: str  # the node's routable address (Ray's NodeManagerAddress)
    alive: bool
    resources: Mapping[str, float]  # totals, e.g. {"CPU": 2.0, "kvrelay_decode": 1.0}
    labels: Mapping[str, str]
    is_head: bool = False

    @property
    def num_gpus(self) -> float:
        return float(self.resources.get("GPU", 0.0))


class PlacedWorker(NamedTuple):
    worker_id: str
    role: str
    node_id: str


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    cpus_per_worker: float = 1.0  # CPU nodes: the slice of cores one worker owns
    gpus_per_worker: float = 1.0  # CUDA nodes: one worker per GPU
    role_resources: Mapping[str, str] = field(default_factory=lambda: ROLE_RESOURCES)
    pool_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    interface: str | None = None  # KV transport NIC name, passed as GLOO_SOCKET_IFNAME
    device: str = "auto"  # auto: a GPU share where the node has GPUs; cpu: never; cuda: only

    @classmethod
    def from_prefix(cls, prefix: str = "kvrelay_", **kw: Any) -> PlacementPolicy:
        """Role resources named ``<prefix><role>`` (``kvrelay serve --placement-resource-prefix``,
        the Helm chart's ``rayStartParams``)."""
        if not prefix or not prefix.replace("_", "a").isalnum():
            raise ValueError(f"resource prefix must be alphanumeric or '_', got {prefix!r}")
        return cls(role_resources=MappingProxyType({r: f"{prefix}{r}" for r in ROLES}), **kw)

    def __post_init__(self) -> None:
        if not (self.cpus_per_worker > 0 and math.isfinite(self.cpus_per_worker)):
            raise ValueError(f"cpus_per_worker must be positive: {self.cpus_per_worker}")
        if not (self.gpus_per_worker > 0 and math.isfinite(self.gpus_per_worker)):
            raise ValueError(f"gpus_per_worker must be positive: {self.gpus_per_worker}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        for role in (*self.role_resources, *self.pool_labels):
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} in placement policy; expected {ROLES}")


@dataclass(frozen=True, slots=True)
class Placement:
    role: str
    node_id: str
    node_ip: str
    num_cpus: float
    num_gpus: float
    resources: Mapping[str, float]  # custom resources the actor requests
    threads: int  # torch threads for the worker: its slice of cores
    env: Mapping[str, str]  # environment for the worker process (transport interface)

    def actor_options(self) -> dict[str, Any]:
        """Keyword arguments for ``WorkerActor.options(...)``."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(self.node_id, soft=False),
        }
        if self.resources:
            opts["resources"] = dict(self.resources)
        if self.env:
            opts["runtime_env"] = {"env_vars": dict(self.env)}
        return opts


class NodeDiff(NamedTuple):
    joined: tuple[NodeInfo, ...]
    left: tuple[NodeInfo, ...]


# ---- decision core ---------------------------------------------------------------------------
def parse_nodes(raw: Iterable[Mapping[str, Any]]) -> tuple[NodeInfo, ...]:
    """``ray.nodes()`` dicts -> NodeInfo, sorted by node id. Raises ValueError on a malformed
    entry (a node without id or address) rather than placing work on it."""
    out = []
    for entry in raw:
        node_id, ip = entry.get("NodeID"), entry.get("NodeManagerAddress")
        if not isinstance(node_id, str) or not node_id or not isinstance(ip, str) or not ip:
            raise ValueError(f"malformed Ray node entry: {dict(entry)!r}")
        resources = {str(k): float(v) for k, v in (entry.get("Resources") or {}).items()}
        labels = {str(k): str(v) for k, v in (entry.get("Labels") or {}).items()}
        out.append(
            NodeInfo(
                node_id=node_id,
                ip=ip,
                alive=bool(entry.get("Alive", entry.get("alive", False))),
                resources=MappingProxyType(resources),
                labels=MappingProxyType(labels),
                is_head="node:__internal_head__" in resources,
            )
        )
    return tuple(sorted(out, key=lambda n: n.node_id))


def diff_nodes(old: Iterable[NodeInfo], new: Iterable[NodeInfo]) -> NodeDiff:
    """Alive in ``new`` but not in ``old`` -> joined; alive in ``old`` but dead or absent in
    ``new`` -> left. A node that died and came back under the same id counts as joined."""
    was = {n.node_id for n in old if n.alive}
    now = {n.node_id: n for n in new if n.alive}
    joined = tuple(n for nid, n in sorted(now.items()) if nid not in was)
    left_ids = sorted(was - now.keys())
    old_by_id = {n.node_id: n for n in old}
    return NodeDiff(joined, tuple(old_by_id[nid] for nid in left_ids))


def workers_on(node_ids: Iterable[str], placed: Iterable[PlacedWorker]) -> list[str]:
    gone = set(node_ids)
    return sorted(w.worker_id for w in placed if w.node_id in gone)


def pinned_roles(node: NodeInfo, policy: PlacementPolicy) -> frozenset[str]:
    """Roles this node is set aside for, by custom resource or by labels."""
    roles = {r for r, res in policy.role_resources.items() if node.resources.get(res, 0.0) > 0}
    for role, selector in policy.pool_labels.items():
        if selector and all(node.labels.get(k) == v for k, v in selector.items()):
            roles.add(role)
    return frozenset(roles)


def uses_gpus(node: NodeInfo, policy: PlacementPolicy) -> bool:
    return node.num_gpus > 0 and policy.device != "cpu"


def compute_slots(node: NodeInfo, policy: PlacementPolicy) -> int:
    """How many kvrelay workers the node's GPUs (or cores) hold in total."""
    cpu_slots = int(node.resources.get("CPU", 0.0) // policy.cpus_per_worker)
    if uses_gpus(node, policy):
        # a fractional share may read 0.4999... as 1/2: allow for float rounding
        return min(int(node.num_gpus / policy.gpus_per_worker + 1e-6), cpu_slots)
    if policy.device == "cuda":
        return 0  # a GPU-only deployment places nothing on CPU nodes
    return cpu_slots


def gpu_share(gpus: float, workers: int, setting: float | None) -> float:
    """GPU per worker: ``setting`` when given; otherwise one GPU each, or an equal share when
    the machine has fewer GPUs than workers (one GPU serving 1P + 1D: 0.5 each)."""
    if setting is not None:
        return setting
    if gpus <= 0 or workers <= gpus:
        return 1.0
    return gpus / workers


def free_slots(
    role: str, node: NodeInfo, placed: Sequence[PlacedWorker], policy: PlacementPolicy
) -> int:
    """Workers of ``role`` the node can still take (0 when it is dead or set aside for others)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    if not node.alive:
        return 0
    here = [w for w in placed if w.node_id == node.node_id]
    free = compute_slots(node, policy) - len(here)
    res = policy.role_resources.get(role)
    if res is not None and node.resources.get(res, 0.0) > 0:
        free = min(free, int(node.resources[res]) - sum(w.role == role for w in here))
    return max(free, 0)


def eligible_nodes(role: str, nodes: Sequence[NodeInfo], policy: PlacementPolicy) -> list[NodeInfo]:
    """Nodes pinned to ``role`` when any alive node is; otherwise every alive node, nodes
    pinned to no role first (so an unpinned pool does not eat a pinned pool's machines)."""
    alive = [n for n in nodes if n.alive]
    pinned = [n for n in alive if role in pinned_roles(n, policy)]
    if pinned:
        return pinned
    return sorted(alive, key=lambda n: bool(pinned_roles(n, policy)))


def place(
    role: str,
    nodes: Sequence[NodeInfo],
    placed: Sequence[PlacedWorker],
    policy: PlacementPolicy = PlacementPolicy(),
) -> Placement:
    """The node for one more ``role`` worker: among eligible nodes, the one with the most free
    slots for the role (spreads a pool over its group), ties by fewest workers, then node id."""
    candidates = eligible_nodes(role, nodes, policy)
    if not candidates:
        raise NoCapacity(f"no alive Ray node to place a {role} worker on")
    ranked = []
    for node in candidates:
        free = free_slots(role, node, placed, policy)
        if free > 0:
            others = pinned_roles(node, policy) - {role}
            load = sum(w.node_id == node.node_id for w in placed)
            ranked.append(((bool(others), -free, load, node.node_id), node))
    if not ranked:
        names = ", ".join(f"{n.ip} ({n.node_id[:8]})" for n in candidates)
        raise NoCapacity(
            f"no free slot for a {role} worker on {names}: each worker takes "
            f"{policy.cpus_per_worker:g} CPU (or {policy.gpus_per_worker:g} GPU) and one unit of "
            f"{policy.role_resources.get(role, '-')} where the node advertises it"
        )
    node = min(ranked, key=lambda kv: kv[0])[1]
    return _placement(role, node, policy)


def fill_plan(
    nodes: Sequence[NodeInfo],
    placed: Sequence[PlacedWorker],
    policy: PlacementPolicy = PlacementPolicy(),
    *,
    only: Iterable[str] | None = None,
) -> list[Placement]:
    """Workers to start so that every free slot of a pinned node (optionally only the nodes in
    ``only``, e.g. the ones that just joined) holds a worker of its role. Unpinned nodes get
    nothing: they do not say which pool they belong to."""
    wanted = None if only is None else set(only)
    plan: list[Placement] = []
    sim = list(placed)
    for node in nodes:
        if not node.alive or (wanted is not None and node.node_id not in wanted):
            continue
        for role in sorted(pinned_roles(node, policy), key=ROLES.index):
            for _ in range(free_slots(role, node, sim, policy)):
                plan.append(_placement(role, node, policy))
                sim.append(PlacedWorker(f"planned-{len(sim)}", role, node.node_id))
    return plan


def node_ip_for_transport(node: NodeInfo) -> str:
    """The address a worker on ``node`` binds its KV transport to: the node's Ray address,
    which other nodes already reach (Ray's own traffic uses it). Loopback only on a
    single-node cluster."""
    return node.ip


def check_transport_host(host: str, nodes: Sequence[NodeInfo]) -> None:
    """Refuse a loopback rendezvous / bind address on a cluster that spans hosts: the other
    hosts would try to connect to their own loopback and time out much later."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    ips = {n.ip for n in nodes if n.alive}
    remote = sorted(ips - {host})
    # one node (whatever address Ray gave it) is one host: loopback reaches every worker
    if loopback and len(ips) > 1 and any(not _is_loopback(ip) for ip in remote):
        raise ValueError(
            f"KV transport address {host} is loopback but the Ray cluster spans hosts "
            f"{', '.join(remote)}: use --transport-host auto (the node's address) or a routable IP"
        )


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


def _placement(role: str, node: NodeInfo, policy: PlacementPolicy) -> Placement:
    res = policy.role_resources.get(role)
    resources = {res: 1.0} if res is not None and node.resources.get(res, 0.0) > 0 else {}
    gpus = policy.gpus_per_worker if uses_gpus(node, policy) else 0.0
    env = {"GLOO_SOCKET_IFNAME": policy.interface} if policy.interface else {}
    return Placement(
        role=role,
        node_id=node.node_id,
        node_ip=node_ip_for_transport(node),
        num_cpus=policy.cpus_per_worker,
        num_gpus=gpus,
        resources=MappingProxyType(resources),
        threads=max(1, int(policy.cpus_per_worker)),
        env=MappingProxyType(env),
    )
