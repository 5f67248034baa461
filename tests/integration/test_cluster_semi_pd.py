"""Semi-PD workers on a real local Ray cluster (the path ``kvrelay serve --semi-pd`` takes):
16 concurrent streams, greedy and seeded, against the single-process colocated engine; the
handoff stays inside the worker (zero transport bytes), prefix caching and the KV directory
see the one pool, a spot notice migrates streams to another semi-PD worker over the copy path,
and a killed semi-PD worker's streams resume on the other: the same tokens, no leaked block."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import pytest

from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster
from kvrelay.workers.llm import LLM
from kvrelay.workers.types import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
N = 16
NOTICE_S = 5.0  # the spot notice the victim gets


def _params(i: int, n: int) -> SamplingParams:
    if i % 2:
        return SamplingParams(max_tokens=n, temperature=0.8, top_k=40, seed=11 + i, ignore_eos=True)
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(None)


def _prompts(llm: LLM) -> list[list[int]]:
    return [
        llm.tokenizer.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": f"Tell me story number {i} about a lighthouse."
                    + " Add detail." * (i % 4),
                }
            ]
        )
        for i in range(N)
    ]


def _cluster(**kw: object) -> Cluster:
    cfg = ServeConfig(
        grpc_port=None,
        http_port=None,
        threads_per_worker=1,
        semi_pd=True,
        prefill_workers=0,
        decode_workers=0,
        preemption_grace_s=NOTICE_S,
        **kw,
    )  # type: ignore[arg-type]
    return Cluster.start(cfg)


def _no_leaks(cluster: Cluster) -> dict[str, dict[str, int]]:
    cluster.check_state()
    figures = cluster.integrity()
    for wid, f in figures.items():
        assert f["used"] == 0 and f.get("cpu_used", 0) == 0, (wid, f)
        assert f["requests"] == 0 and f["reservations"] == 0 and f["transit"] == 0, (wid, f)
    return figures


def _streams_decoding(
    cluster: Cluster, prompts: list[list[int]], params: list[SamplingParams], committed: int, wait
) -> tuple[cf.ThreadPoolExecutor, list[cf.Future]]:
    """Start one stream per prompt and return once every one has ``committed`` tokens out."""
    pool = cf.ThreadPoolExecutor(len(prompts))
    futures = [pool.submit(cluster.complete, p, sp) for p, sp in zip(prompts, params, strict=True)]
    wait(
        lambda: (
            len(flights := cluster.call("debug_flights")) == len(prompts)
            and all(f["committed"] >= committed for f in flights)
        ),
        timeout=300,
    )
    return pool, futures


def test_semi_pd_worker_serves_like_colocated(ray_session: None, llm: LLM) -> None:
    prompts = _prompts(llm)
    params = [_params(i, 24) for i in range(N)]
    expected = [list(o.token_ids) for o in llm.generate(prompts, params)]
    # the SLO-aware split on too (recorded, not enforced, on CPU): the flag's path to the actor
    with _cluster(colocated_workers=1, semi_pd_adaptive=True, semi_pd_window_s=0.05) as cluster:
        infos = cluster.call("worker_infos")
        assert [(i["role"], i["semi_pd"]) for i in infos.values()] == [("colocated", True)]
        with cf.ThreadPoolExecutor(N) as pool:
            futures = [
                pool.submit(cluster.complete, p, sp) for p, sp in zip(prompts, params, strict=True)
            ]
            got = [f.result(timeout=300)[0] for f in futures]
        assert got == expected
        figures = _no_leaks(cluster)
        # every handoff happened inside the worker, by block ids: no byte crossed a transport
        assert [f["handovers"] for f in figures.values()] == [N]
        assert cluster.counters()["handoffs"] == 0
        assert all(t.get("bytes_sent", 0) == 0 for t in cluster.call("transport_totals").values())
        # the one pool's blocks reached the KV directory: the prompt is cached on the worker
        (wid,) = infos
        bs = infos[wid]["block_size"]
        assert cluster.call("match_prefix", prompts[3])[wid] == len(prompts[3]) // bs * bs


def test_semi_pd_streams_migrate_on_notice(ray_session: None, llm: LLM, wait) -> None:
    prompts = _prompts(llm)[:8]
    # 100 tokens: a notice covers them only if a stream decodes > 20 tokens/s (92 left in
    # 5 - 0.5 s; ~5/s on 2 cores here), so the streams must move
    params = [_params(i, 100) for i in range(8)]
    expected = [list(o.token_ids) for o in llm.generate(prompts, params)]
    with _cluster(colocated_workers=2) as cluster:
        # every stream decoding (8 tokens out) before the notice
        pool, futures = _streams_decoding(cluster, prompts, params, 8, wait)
        victim = next(iter(cluster.workers()))
        assert cluster.call("notify_preemption", victim, time.time() + NOTICE_S)
        wait(
            lambda: (
                (recs := cluster.call("migration_records"))
                and recs[0]["outcomes"]
                and len(recs[0]["outcomes"]) == len(recs[0]["actions"])
            ),
            timeout=300,
        )
        cluster.kill_worker(victim)
        got = [f.result(timeout=600)[0] for f in futures]
        pool.shutdown()
        assert got == expected
        record = cluster.call("migration_records")[0]
        moved = [rid for rid, a in record["actions"].items() if a.startswith("migrate")]
        assert moved and all(record["outcomes"][rid] == "migrated" for rid in moved)
        # the migration took the copy path between the two workers
        assert (
            sum(t.get("bytes_received", 0) for t in cluster.call("transport_totals").values()) > 0
        )
        _no_leaks(cluster)


def test_semi_pd_worker_killed_mid_stream(ray_session: None, llm: LLM, wait) -> None:
    """SIGKILL of a semi-PD worker (both lanes die with their process) while its streams
    decode: they resume on the other semi-PD worker from prompt + committed tokens, with the
    undisturbed tokens, and the survivors' storage holds no block for anyone."""
    prompts = _prompts(llm)[:8]
    params = [_params(i, 48) for i in range(8)]  # the kill comes 4 tokens in
    expected = [list(o.token_ids) for o in llm.generate(prompts, params)]
    with _cluster(colocated_workers=2) as cluster:
        pool, futures = _streams_decoding(cluster, prompts, params, 4, wait)
        victim = next(iter(cluster.workers()))
        os.kill(cluster.call("worker_pid", victim), signal.SIGKILL)
        got = [f.result(timeout=600)[0] for f in futures]
        pool.shutdown()
        assert got == expected  # no gap, no repeated token
        assert cluster.counters()["resubmissions"] >= 1
        wait(lambda: victim not in cluster.workers(), timeout=120)
        _no_leaks(cluster)
