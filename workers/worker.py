"""A worker: one engine on its loop thread, its KV transport, and its role.

A plain class: the cluster wraps it as a Ray actor (cluster/runtime/actors.py, a threaded actor so a
blocking transfer does not stop other calls), tests and the GPU machine use it in plain
processes. Roles:

    prefill    requests run with ``prefill_only``: first token, then the KV is handed off
    decode     receives KV into reserved blocks and decodes; also prefills when told to
    colocated  both, the single-worker baseline (``workers/semi_pd/``'s worker is a colocated
               worker whose prefill and decode lanes share one KV storage)

Handoff, decode side D and prefill side P (the controller drives it)::

    D.reserve(rid, n)  -> block ids | None (refusal)
    P.send_kv(rid, D) || D.recv_kv(rid, P)   packed blocks over the pair's group
    D.accept_prefilled(rid, ...)             the request continues on D
    P.finish_handoff(rid)                    P releases (full blocks stay as prefix cache)

Every engine access goes through the loop thread. The decode side's reservations, the receive
into them and what continues there are receiving.py's (``Reservations``).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from kvrelay.workers.engine.config import EngineConfig, EngineStats
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.kernel_compiles import COMPILES
from kvrelay.workers.engine.loop import EngineLoop
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.engine.sequence import Sequence as EngineSequence
from kvrelay.workers.engine.sequence import arrival_from_wall
from kvrelay.workers.model.loader import LoadedModel, load_model
from kvrelay.workers.receiving import Reservations
from kvrelay.workers.transport.kv_transport import KVTransport
from kvrelay.workers.types import ROLES, KVEvent, Phase, SamplingParams, TokenEvent

FAULTS = (
    "exit_after_first_token",
    "exit_in_recv",
    "exit_in_send",
    "hang_in_recv",
    "hang_in_send",
    "late_submit_reply",
)
LATE_REPLY_S = 0.5  # late_submit_reply: how long after the first token the reply leaves
EventSink = Callable[[str, list[TokenEvent]], None]


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: str
    role: str
    node_ip: str
    pid: int
    model_id: str
    block_size: int
    num_blocks: int
    block_bytes: int
    max_context: int
    node_name: str = ""  # Kubernetes node (KVRELAY_NODE_NAME) or host name
    pod_name: str = ""  # namespace/pod when run in Kubernetes
    device: str = "cpu"  # where the engine computes: cpu, or cuda:N as this process sees it
    dtype: str = "float32"
    semi_pd: bool = False  # prefill and decode lanes over one KV storage (workers/semi_pd/)

    @property
    def max_seq_tokens(self) -> int:
        """The longest sequence (prompt + output tokens) its engine keeps (Engine.max_seq_tokens):
        a request that reaches it ends there (LENGTH)."""
        return min(self.max_context, self.num_blocks * self.block_size)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    worker_id: str
    role: str
    stats: EngineStats
    kv_events: tuple[KVEvent, ...]
    transport: dict[str, float]
    alive: bool
    prefill_tokens_per_s: float | None = None
    decode_step_s: float | None = None


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A request on this worker, for the migration planner's snapshot."""

    request_id: str
    phase: Phase  # QUEUED, PREFILL or DECODE
    prompt_tokens: int
    tokens_done: int
    tokens_left: int
    kv_blocks: int


# a decode worker's (and a semi-PD decode lane's) ``max_num_seqs`` at least: it adopts every
# request handed over, not only max_num_seqs of them (blocks are its bound), so under load its
# batch passes the config's cap (64 by default) and the largest default decode graph (128);
# such a step ran eagerly (and compiled the decode kernel mid-serving, 2026-12-07 H200)
DECODE_SEQS = 256
SWITCHING = ("prefill", "decode")  # the roles set_role moves a worker between, both ways


class Worker:
    def __init__(
        self,
        worker_id: str,
        role: str,
        *,
        model: str | LoadedModel | None = None,
        engine_config: EngineConfig = EngineConfig(),
        sink: EventSink | None = None,
        transport: KVTransport | None = None,
        rendezvous: tuple[str, int] | None = None,
        transport_bind: str | None = None,
        device: str = "cpu",
        notice: Callable[[str, float], None] | None = None,
        grace_s: float = 30.0,
        threads: int | None = None,
        dtype: torch.dtype = torch.float32,
        decode_seqs: int = DECODE_SEQS,
    ) -> None:
        """``decode_seqs``: a decode worker's ``max_num_seqs`` (a semi-PD worker's decode
        lane's) when larger than the engine config's: the batch its decode graphs hold."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        if decode_seqs < 1:
            raise ValueError(f"decode_seqs must be >= 1, got {decode_seqs}")
        self._decode_seqs = decode_seqs
        self._max_num_seqs = engine_config.max_num_seqs  # the config's, before any role's
        if threads:
            torch.set_num_threads(threads)
        self.worker_id = worker_id
        self.role = role
        loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device)
        self._sink = sink
        if transport is None and rendezvous is not None:
            # "auto": this node's routable address (multi-host); None: loopback
            bind = _node_ip() if transport_bind == "auto" else transport_bind
            transport = KVTransport(
                worker_id, rendezvous[0], rendezvous[1], device=device, bind_host=bind
            )
        self.transport = transport
        self._faults: set[str] = set()
        self._first_token: dict[str, threading.Event] = {}  # late_submit_reply waiters
        # the sender thread's lag and its sink calls (outbox.py): delivery_times()
        self.delivery = PhaseTimes()
        # Triton compiles (kernel_compiles.py): in delivery_times, the heartbeat, and logged
        # once the engines have started (a compile then stalls a serving step)
        self._compiles = device.startswith("cuda") and COMPILES.install(self.delivery)
        self.loop = self._start_engines(loaded, engine_config, device)
        self.reservations = Reservations(self.loop)  # the decode side's (receiving.py)
        if self._compiles:
            COMPILES.serving()
        if device.startswith("cuda"):  # serving from here: what stalls a step is counted
            for engine in self._engines():
                engine.runner.stalls = self.delivery
        self.engine = self.loop.engine
        self._notice = notice
        self.grace_s = grace_s
        if notice is not None and threading.current_thread() is threading.main_thread():
            # Kubernetes gives notice with SIGTERM, then kills after the grace period: tell the
            # controller, keep serving until the work has moved
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _engines(self) -> tuple[Engine, ...]:
        """This worker's engines (a semi-PD worker's two lanes)."""
        return (self.loop.engine,)

    def _seqs_of(self, role: str) -> int:
        """The ``max_num_seqs`` of an engine in ``role``: a decode engine (a decode worker's,
        a semi-PD decode lane's) adopts handed over requests, up to ``decode_seqs``."""
        if role == "decode":
            return max(self._max_num_seqs, self._decode_seqs)
        return self._max_num_seqs

    def _start_engines(self, loaded: LoadedModel, config: EngineConfig, device: str) -> EngineLoop:
        """This worker's engine on its loop thread (the semi-PD worker starts two)."""
        if self.role in SWITCHING:  # either may become a decode worker (set_role)
            config = replace(
                config,
                max_num_seqs=self._seqs_of(self.role),
                decode_graph_batch=self._seqs_of("decode"),
            )
        engine = Engine(loaded, config, device=device)
        return EngineLoop(
            engine, self._emit, name=f"engine-{self.worker_id}", delivery=self.delivery
        ).start()

    def _holder(self, request_id: str) -> EngineLoop:
        """The loop whose engine holds ``request_id`` parked (the semi-PD worker has two)."""
        return self.loop

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self._notice is not None:
            self._notice(self.worker_id, time.time() + self.grace_s)

    # ---- plumbing ------------------------------------------------------------------------
    def _emit(self, events: list[TokenEvent]) -> None:
        """The loop's sink, on its sender thread (loop.py). ``engine.handoffs`` is read there
        safely: the step that emits a prefill's first token parks it before queuing the event,
        and only commands, which wait for the sender, take it out."""
        if self._sink is not None:
            self._sink(self.worker_id, events)
        if self._first_token:  # a chaos hook's waiters (rare): no loop over a step's events
            for e in events:
                waiter = self._first_token.get(e.request_id)
                if waiter is not None:
                    waiter.set()
        if "exit_after_first_token" in self._faults and any(
            rid in self.engine.handoffs for rid in (e.request_id for e in events)
        ):
            os._exit(17)  # crash right after a prefill's first token went out

    def inject_fault(self, fault: str) -> None:
        """Chaos hooks: ``exit_after_first_token`` (prefill side), ``exit_in_recv`` and
        ``exit_in_send`` (the process dies mid-transfer; it really exits); ``hang_in_recv``
        (a receive wedged past its deadline: ``recv_kv`` answers nothing until the controller
        gives the reservation up, then fails); ``hang_in_send`` (likewise ``send_kv``, until
        the request's handoff is given up: it decodes here or is aborted);
        ``late_submit_reply`` (``submit`` answers only after the request's first token went
        out, and ``LATE_REPLY_S`` later: the controller sees the token before the reply)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        self._faults.add(fault)

    def info(self) -> WorkerInfo:
        e = self.engine
        return WorkerInfo(
            worker_id=self.worker_id,
            role=self.role,
            node_ip=_node_ip(),
            pid=os.getpid(),
            model_id=e.loaded.model_id,
            block_size=e.config.block_size,
            num_blocks=e.pool.num_blocks,
            block_bytes=e.block_bytes,
            max_context=e.max_context,
            node_name=os.environ.get("KVRELAY_NODE_NAME") or socket.gethostname(),
            pod_name=_pod_name(),
            device=str(e.device),
            dtype=str(e.kv_cache.dtype).removeprefix("torch."),
        )

    def set_role(self, role: str) -> None:
        """Switch role between requests (pool rebalancing): affects only new requests. A
        prefill / decode switch also sets the engine's sequence cap to the new role's (a
        decode worker adopts up to ``decode_seqs``; its decode graphs were sized for that)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if self.role in SWITCHING and role in SWITCHING and role != self.role:
            cap = self._seqs_of(role)
            self.loop.call(lambda e: e.scheduler.set_max_num_seqs(cap))
        self.role = role

    # ---- requests ------------------------------------------------------------------------
    def submit(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        output_ids: Sequence[int] = (),
        tenant: str = "",
        priority: int = 0,
        prefill_only: bool = False,
        arrival_s: float = 0.0,
    ) -> None:
        """Queue a request. ``arrival_s``: the wall-clock time it reached the cluster (the
        frontend's stamp; 0: unknown, now), so that a request re-dispatched or moved here keeps
        its place in the policy's order and the deadline policy counts its wait before us."""
        arrival = arrival_from_wall(arrival_s)
        late = "late_submit_reply" in self._faults
        first = self._first_token.setdefault(request_id, threading.Event()) if late else None
        try:
            self.loop.call(
                lambda e: e.add_request(
                    request_id, prompt_ids, params, output_ids=output_ids, tenant=tenant,
                    priority=priority, prefill_only=prefill_only, arrival_time=arrival,
                )
            )
            if first is not None:
                first.wait(60)
                time.sleep(LATE_REPLY_S)  # the injected fault: a reply that arrives late
        finally:
            if first is not None:
                del self._first_token[request_id]

    def abort(self, request_id: str) -> bool:
        had_reservation = self.unreserve(request_id)
        return self.loop.call(lambda e: e.abort(request_id)) or had_reservation

    def continue_local(self, request_id: str) -> None:
        """No decode worker took the handoff: decode the parked request here."""

        def resume(e: Engine) -> None:
            seq = e.handoffs.pop(request_id)
            seq.prefill_only = False
            e.seqs[request_id] = seq
            e.scheduler.resume(seq)

        self._holder(request_id).call(resume)

    # ---- handoff: prefill side -----------------------------------------------------------
    def handoff_size(self, request_id: str) -> int:
        return len(self._holder(request_id).call(lambda e: e.handoff_blocks(request_id)))

    def send_kv(self, request_id: str, peer_id: str, transfer_id: str, timeout_s: float) -> int:
        """Send the parked request's prompt blocks to ``peer_id``; returns bytes sent."""
        blocks = self._holder(request_id).call(lambda e: e.handoff_blocks(request_id))
        if "exit_in_send" in self._faults:
            os._exit(17)
        if "hang_in_send" in self._faults:
            while self._holder(request_id).call(lambda e: request_id in e.handoffs):
                time.sleep(0.01)  # a chaos hook's wait, not a synchronisation
            raise RuntimeError(f"send of {request_id} wedged (fault hang_in_send)")
        # parked blocks: no step writes them while they are packed
        return self._transport().send_blocks(
            peer_id, transfer_id, self.engine.kv_cache, blocks, timeout_s=timeout_s
        )

    def finish_handoff(self, request_id: str) -> None:
        self._holder(request_id).call(lambda e: e.finish_handoff(request_id))

    # ---- handoff: decode side ------------------------------------------------------------
    def reserve(self, request_id: str, num_blocks: int, deadline_s: float) -> list[int] | None:
        return self.reservations.reserve(request_id, num_blocks, deadline_s)

    def recv_kv(self, request_id: str, peer_id: str, transfer_id: str, timeout_s: float) -> int:
        def fill(block_ids: list[int]) -> int:
            return self._transport().recv_blocks(
                peer_id, transfer_id, self.engine.kv_cache, block_ids, timeout_s=timeout_s
            )

        return self.reservations.receive(request_id, fill, self._faults)

    def accept_prefilled(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        params: SamplingParams,
        *,
        tenant: str = "",
        priority: int = 0,
        num_computed: int | None = None,
        arrival_s: float = 0.0,
    ) -> None:
        """The KV arrived: continue the request here. ``num_computed`` (a migration) says how
        many tokens' KV came along; by default the prompt's (a handoff). ``arrival_s`` as
        ``submit``'s."""
        self.reservations.accept(
            request_id, prompt_ids, output_ids, params,
            tenant=tenant, priority=priority, num_computed=num_computed,
            arrival_time=arrival_from_wall(arrival_s),
        )  # fmt: skip

    def unreserve(self, request_id: str) -> bool:
        return self.reservations.unreserve(request_id)

    def expire_reservations(self, now: float | None = None) -> list[str]:
        return self.reservations.expire(now)

    # ---- migration ------------------------------------------------------------------------
    def requests_info(self) -> list[RequestInfo]:
        return self.loop.call(
            lambda e: [request_info(s) for s in e.seqs.values()], settle=True
        )

    def park(self, request_id: str) -> tuple[list[int], int] | None:
        """Stop decoding a request and hold its KV for a migration (as a prefill holds a
        handoff). Returns (output ids so far, tokens whose KV is computed), or None when it
        has no decode state to move (queued, mid-prefill, finished)."""

        def do(e: Engine) -> tuple[list[int], int] | None:
            seq = e.seqs.get(request_id)
            if seq is None or not e.scheduler.is_running(seq):
                return None
            if seq.num_computed < len(seq.prompt_ids):
                return None
            e.scheduler.park(seq)
            del e.seqs[request_id]
            e.handoffs[request_id] = seq
            return list(seq.output_ids), seq.num_computed

        return self.loop.call(do, settle=True)

    # ---- cross-worker prefix reuse --------------------------------------------------------
    def send_prefix(
        self, block_hashes: Sequence[int], peer_id: str, transfer_id: str, timeout_s: float
    ) -> int:
        """Send the cached blocks holding ``block_hashes`` to a peer that pulls them."""

        def take(e: Engine) -> list[int] | None:
            ids = e.pool.lookup(block_hashes)
            if len(ids) != len(block_hashes):
                return None
            e.pool.acquire(ids)  # pinned while they are packed
            return ids

        ids = self.loop.call(take)
        if ids is None:
            raise RuntimeError("the prefix is no longer cached here")
        try:
            return self._transport().send_blocks(
                peer_id, transfer_id, self.engine.kv_cache, ids, timeout_s=timeout_s
            )
        finally:
            self.loop.call(lambda e: e.pool.release(reversed(ids)))

    def commit_prefix(self, reservation_id: str, block_hashes: Sequence[int]) -> int:
        """Pulled blocks arrived in a reservation: record their hashes and leave them cached,
        so the request submitted next finds them as a prefix hit. Returns blocks kept."""
        return self.reservations.commit_prefix(reservation_id, block_hashes)

    # ---- figures -------------------------------------------------------------------------
    def delivery_times(self, reset: bool = False) -> dict[str, dict[str, float]]:
        """The event sender's ``outbox_wait`` and ``sink_call`` (outbox.py), and on CUDA the
        steps that stalled while serving: Triton compiles (``kernel_compile``,
        kernel_compiles.py), decode steps no CUDA graph held (``eager_decode``) and graphs
        captured on first use (``graph_capture``, runner.py): count, total and mean / p50 /
        p90 / p99 / max ms; ``reset``: start afresh after reading."""
        return self.delivery.summary(reset=reset)

    def heartbeat(self) -> Heartbeat:
        self.expire_reservations()
        stats, events = self.loop.call(lambda e: (e.stats(), tuple(e.drain_kv_events())))
        if self._compiles:  # process totals: the controller turns them into counters
            stats = replace(stats, extra={**stats.extra, **COMPILES.totals()})
        return Heartbeat(
            self.worker_id, self.role, stats, events, self.transport_totals(), self.loop.alive,
            self.loop.prefill_tokens_per_s, self.loop.decode_step_s,
        )

    def transport_totals(self) -> dict[str, float]:
        """Transport counters summed over peers (bytes, transfers, seconds, failures)."""
        out: dict[str, float] = {}
        if self.transport is None:
            return out
        for peer in self.transport.stats().peers.values():
            for name in peer.__dataclass_fields__:
                out[name] = out.get(name, 0.0) + float(getattr(peer, name))
        return out

    def check_integrity(self) -> dict[str, int]:
        """Raises if the pool is inconsistent; returns its figures (tests assert no leaks)."""

        def check(e: Engine) -> dict[str, int]:
            e.check_integrity()
            s = e.pool.stats()
            out = {
                "total": s.total, "free": s.free, "used": s.used, "cached": s.cached,
                "requests": len(e.seqs) + len(e.handoffs),
            }
            cpu = e.stats().cpu_pool
            if cpu is not None:  # a leak in the host tier is a leak too
                out["cpu_used"] = cpu.used
            return out

        out = self.loop.call(check)
        out["reservations"] = len(self.reservations)
        return out

    def clear_prefix_cache(self) -> None:
        self.loop.call(lambda e: e.clear_prefix_cache())  # both tiers

    def shutdown(self) -> None:
        self.loop.stop()
        if self.transport is not None:
            self.transport.close()

    def _transport(self) -> KVTransport:
        if self.transport is None:
            raise RuntimeError(f"worker {self.worker_id} has no KV transport")
        return self.transport


def request_info(seq: EngineSequence) -> RequestInfo:
    if seq.num_computed == 0:
        phase = Phase.QUEUED
    elif seq.num_computed < len(seq.prompt_ids):
        phase = Phase.PREFILL
    else:
        phase = Phase.DECODE
    return RequestInfo(
        seq.request_id, phase, len(seq.prompt_ids), len(seq.output_ids),
        max(0, seq.params.max_tokens - len(seq.output_ids)), len(seq.block_ids),
    )


def _pod_name() -> str:
    pod, ns = os.environ.get("KVRELAY_POD_NAME"), os.environ.get("KVRELAY_POD_NAMESPACE")
    return f"{ns}/{pod}" if pod and ns else ""


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())
