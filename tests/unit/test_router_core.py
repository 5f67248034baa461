"""Router: filters, scorers, weights, picker, baselines (pure snapshots)."""

from __future__ import annotations

import pytest

from kvrelay.cluster.routing.baselines import LeastLoadedRouter, RoundRobinRouter
from kvrelay.cluster.routing.config import RouterConfig
from kvrelay.cluster.routing.kv_directory import PrefixMatch
from kvrelay.cluster.routing.router import KVAwareRouter
from kvrelay.cluster.routing.types import NoWorker, RouteDecision, RouteRequest, WorkerLoad
from kvrelay.workers.types import Role

BS = 16
REQ = RouteRequest("r1", block_hashes=tuple(range(8)), num_prompt_tokens=8 * BS)


def load(
    wid: str,
    role: Role = Role.DECODE,
    *,
    healthy: bool = True,
    draining: bool = False,
    free: int = 100,
    total: int = 100,
    running: int = 0,
    waiting: int = 0,
) -> WorkerLoad:
    return WorkerLoad(wid, role, healthy, draining, free, total, running, waiting)


def pm(gpu: int, cpu: int = 0) -> PrefixMatch:
    return PrefixMatch(gpu + cpu, gpu, cpu, (gpu + cpu) * BS)


def decide(router, workers, matches=None, prefill=False) -> RouteDecision:  # type: ignore[no-untyped-def]
    route = router.route_prefill if prefill else router.route_decode
    out = route(REQ, workers, matches or {})
    assert isinstance(out, RouteDecision), out
    return out


def test_filters_exclude_unhealthy_draining_full_and_wrong_role() -> None:
    r = KVAwareRouter()
    workers = [
        load("a", healthy=False),
        load("b", draining=True),
        load("c", free=3),
        load("p", Role.PREFILL),
        load("ok", free=8),
    ]
    # c holds 3 of 8 needed blocks free: too few for the decode pool; ok has exactly 8
    assert decide(r, workers).worker_id == "ok"
    assert decide(r, [*workers[:3], load("ok", free=5)], {"ok": pm(3)}).worker_id == "ok"
    # a CPU hit needs a GPU block to promote into: 3 CPU-matched blocks do not reduce the need
    assert isinstance(r.route_decode(REQ, [load("x", free=5)], {"x": pm(0, 3)}), NoWorker)
    assert r.route_decode(REQ, workers[:2], {}) == NoWorker("no decode worker is not draining")
    assert r.route_decode(REQ, [workers[0]], {}) == NoWorker("no decode worker is healthy")
    assert r.route_decode(REQ, [workers[2]], {}) == NoWorker("no decode worker has capacity")
    assert r.route_prefill(REQ, [load("d")], {}) == NoWorker("no prefill worker registered")


def test_prefill_needs_only_a_chunk_and_colocated_serves_both() -> None:
    r = KVAwareRouter(RouterConfig(chunk_tokens=2 * BS))
    assert decide(r, [load("p", Role.PREFILL, free=2)], prefill=True).worker_id == "p"
    assert isinstance(r.route_prefill(REQ, [load("p", Role.PREFILL, free=1)], {}), NoWorker)
    assert decide(r, [load("c", Role.COLOCATED)], prefill=True).worker_id == "c"
    assert decide(r, [load("c", Role.COLOCATED)]).worker_id == "c"


def test_prefix_scorer_prefers_holder_and_gpu_over_cpu() -> None:
    r = KVAwareRouter()
    workers = [load("a"), load("b"), load("c")]
    d = decide(r, workers, {"b": pm(6)})
    assert d.worker_id == "b" and d.matched_tokens == 6 * BS and d.matched_gpu_tokens == 6 * BS
    assert d.scores_by_scorer["prefix"] == pytest.approx(6 / 8)
    d = decide(r, workers, {"a": pm(0, 6), "c": pm(6)})
    assert d.worker_id == "c"
    cpu_only = decide(r, [load("a")], {"a": pm(0, 6)})
    assert cpu_only.scores_by_scorer["prefix"] == pytest.approx(0.5 * 6 / 8)


def test_weights_respected() -> None:
    # b holds the prefix, a has the shorter queue
    workers = [load("a", waiting=0), load("b", waiting=10)]
    matches = {"b": pm(8)}
    assert decide(KVAwareRouter(RouterConfig(prefix_weight=3.0)), workers, matches).worker_id == "b"
    cfg = RouterConfig(prefix_weight=0.5, queue_weight=3.0)
    d = decide(KVAwareRouter(cfg), workers, matches)
    assert d.worker_id == "a" and d.scores_by_scorer["queue"] == 1.0
    # tenant and slo score 1 for both (no tenant load, no SLO figure): 0.5 + 0.5
    assert d.score == pytest.approx(0.5 * 0 + 1.0 * 1.0 + 3.0 * 1.0 + 0.5 + 0.5)
    only_kv = KVAwareRouter(
        RouterConfig(prefix_weight=0, queue_weight=0, tenant_weight=0, slo_weight=0)
    )
    d = decide(only_kv, [load("a", free=10), load("b", free=90)], matches)
    assert d.worker_id == "b" and set(d.scores_by_scorer) == {"kv_util"}


def test_scores_clamped_to_unit_interval() -> None:
    r = KVAwareRouter()
    d = decide(r, [load("a", free=500, total=100)], {"a": pm(50)})  # inconsistent figures
    assert all(0.0 <= v <= 1.0 for v in d.scores_by_scorer.values())
    assert d.matched_tokens == REQ.num_prompt_tokens


def test_ties_deterministic_and_seeded_random() -> None:
    workers = [load("c"), load("a"), load("b")]
    r = KVAwareRouter()
    assert {decide(r, workers).worker_id for _ in range(5)} == {"a"}
    assert decide(r, list(reversed(workers))).worker_id == "a"

    def draws(seed: int, ws: list[WorkerLoad]) -> list[str]:
        rr = KVAwareRouter(RouterConfig(tie_break="random", seed=seed))
        return [decide(rr, ws).worker_id for _ in range(30)]

    first = draws(7, workers)
    assert first == draws(7, list(reversed(workers)))  # order of the snapshot does not matter
    assert set(first) == {"a", "b", "c"}


def test_config_validation() -> None:
    for bad in (
        dict(prefix_weight=-1.0),
        dict(prefix_weight=0, kv_util_weight=0, queue_weight=0, tenant_weight=0, slo_weight=0),
        dict(tenant_weight=-0.5),
        dict(cpu_hit_value=1.5),
        dict(chunk_tokens=0),
        dict(block_size=0),
        dict(tie_break="first"),
        dict(queue_weight=float("nan")),
    ):
        with pytest.raises(ValueError):
            RouterConfig(**bad)  # type: ignore[arg-type]


def test_round_robin_cycles_over_eligible_workers() -> None:
    r = RoundRobinRouter(BS)
    workers = [load("b"), load("a"), load("x", healthy=False), load("c")]
    got = [decide(r, workers, {"c": pm(8)}).worker_id for _ in range(6)]
    assert got == ["a", "b", "c", "a", "b", "c"]
    assert decide(r, [load("p", Role.PREFILL)], prefill=True).worker_id == "p"  # own counter


def test_least_loaded() -> None:
    r = LeastLoadedRouter(BS)
    workers = [load("a", running=3), load("b", running=1, waiting=1), load("c", running=2)]
    assert decide(r, workers).worker_id == "b"
    tied = [load("a", running=1, free=50), load("b", running=1, free=60)]
    assert decide(r, tied).worker_id == "b"


def test_tenant_scorer_spreads_a_flooding_tenant() -> None:
    from dataclasses import replace

    req = replace(REQ, tenant="heavy")
    busy = replace(load("a"), tenant_load={"heavy": 6})
    idle = replace(load("b"), tenant_load={"light": 6})
    cfg = RouterConfig(prefix_weight=0, kv_util_weight=0, queue_weight=0, slo_weight=0)
    d = KVAwareRouter(cfg).route_decode(req, [busy, idle], {})
    assert isinstance(d, RouteDecision) and d.worker_id == "b"
    assert d.scores_by_scorer["tenant"] == 1.0


def test_slo_scorer_prefers_headroom() -> None:
    from dataclasses import replace

    tight = replace(load("a"), slo_headroom=0.05)
    roomy = replace(load("b"), slo_headroom=0.8)
    cfg = RouterConfig(prefix_weight=0, kv_util_weight=0, queue_weight=0, tenant_weight=0)
    d = KVAwareRouter(cfg).route_decode(REQ, [tight, roomy], {})
    assert isinstance(d, RouteDecision) and d.worker_id == "b"
    assert d.scores_by_scorer["slo"] == pytest.approx(0.8)
