"""Spot preemption and crashes on a real local Ray cluster (2P+2D, 16 streams in flight):
notices lead to live KV migration, kills to recomputation; every stream ends with the tokens
of an undisturbed run, with no token missing or repeated, and no KV block leaks."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import threading
import time
from functools import partial

import pytest

from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster
from kvrelay.workers.llm import LLM
from kvrelay.workers.types import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
N = 16
NOTICE_S = 5.0  # the spot notice (and the SIGTERM grace) the victims get


def _params(i: int) -> SamplingParams:
    # half are short (they finish in place within a notice); the rest are long enough that a
    # notice cannot cover them unless a stream decodes > 26 tokens/s (120 left in 5 - 0.5 s;
    # ~6/s on 2 cores here), so they must move
    n = 24 if i % 4 < 2 else 128  # half short, half long; greedy and seeded in each
    if i % 2:
        return SamplingParams(max_tokens=n, temperature=0.8, top_k=40, seed=7 + i, ignore_eos=True)
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def workload() -> tuple[list[list[int]], list[SamplingParams], list[list[int]]]:
    llm = LLM(None)
    prompts = [
        llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a long story number {i} about a journey."}]
        )
        for i in range(N)
    ]
    params = [_params(i) for i in range(N)]
    return prompts, params, [list(o.token_ids) for o in llm.generate(prompts, params)]


def _cluster(**kw: object) -> Cluster:
    cfg = ServeConfig(
        grpc_port=None,
        http_port=None,
        threads_per_worker=1,
        preemption_grace_s=NOTICE_S,
        **kw,
    )  # type: ignore[arg-type]
    return Cluster.start(cfg)


class Streams:
    """16 streams in flight; each records every event's tokens, in arrival order."""

    def __init__(self, cluster: Cluster, prompts: list[list[int]], params: list[SamplingParams]):
        self.events: list[list[tuple[int, ...]]] = [[] for _ in prompts]
        self.first = threading.Barrier(len(prompts) + 1)
        self.pool = cf.ThreadPoolExecutor(len(prompts))
        self.futures = [
            self.pool.submit(self._run, cluster, i, p, sp)
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]

    def _run(self, cluster: Cluster, i: int, prompt: list[int], params: SamplingParams) -> None:
        seen_first = False
        for event in cluster.generate(cluster.request(prompt, params)):
            if event.token_ids:
                self.events[i].append(event.token_ids)
                if not seen_first and sum(map(len, self.events[i])) >= 8:
                    seen_first = True
                    self.first.wait(timeout=300)  # every stream is decoding
        if not seen_first:
            self.first.wait(timeout=300)

    def wait_all_decoding(self) -> None:
        self.first.wait(timeout=300)

    def results(self) -> list[list[int]]:
        for f in self.futures:
            f.result(timeout=600)
        self.pool.shutdown()
        return [[t for ev in evs for t in ev] for evs in self.events]


def _no_leaks(cluster: Cluster) -> None:
    cluster.check_state()  # the controller's own tables hold their invariants
    for wid, f in cluster.integrity().items():
        assert f["used"] == 0 and f.get("cpu_used", 0) == 0, (wid, f)
        assert f["requests"] == 0 and f["reservations"] == 0, (wid, f)


def test_decode_preempted_with_notice_migrates(ray_session: None, workload, wait) -> None:
    prompts, params, expected = workload
    with _cluster(prefill_workers=2, decode_workers=2) as cluster:
        streams = Streams(cluster, prompts, params)
        streams.wait_all_decoding()
        victim = next(w for w, r in cluster.workers().items() if r == "decode")
        assert cluster.call("notify_preemption", victim, time.time() + NOTICE_S)
        records = partial(cluster.call, "migration_records")
        wait(lambda: any(r["outcomes"] for r in records()), describe=records)
        wait(
            lambda: (recs := records()) and len(recs[0]["outcomes"]) == len(recs[0]["actions"]),
            describe=records,
        )
        cluster.kill_worker(victim)  # the deadline: the instance is gone
        assert streams.results() == expected
        record = cluster.call("migration_records")[0]
        planned = record["actions"]
        assert planned and any(a.startswith("migrate") for a in planned.values())
        for rid, action in planned.items():
            if action.startswith("migrate"):
                assert record["outcomes"][rid] == "migrated", (rid, record["outcomes"][rid])
        assert cluster.counters()["migrations"] >= 1
        _no_leaks(cluster)


def test_sigkill_mid_stream_recomputes_without_gaps(ray_session: None, workload, wait) -> None:
    prompts, params, expected = workload
    with _cluster(prefill_workers=2, decode_workers=2) as cluster:
        streams = Streams(cluster, prompts, params)
        streams.wait_all_decoding()
        victim = next(w for w, r in cluster.workers().items() if r == "decode")
        os.kill(cluster.call("worker_pid", victim), signal.SIGKILL)
        assert streams.results() == expected  # concatenated events: no gap, no repeat
        assert cluster.counters()["resubmissions"] >= 1
        wait(lambda: victim not in cluster.workers())
        _no_leaks(cluster)


def test_sigterm_is_a_notice(ray_session: None, workload, wait) -> None:
    prompts, params, expected = workload
    with _cluster(prefill_workers=1, decode_workers=2) as cluster:
        streams = Streams(cluster, prompts[:8], params[:8])
        streams.wait_all_decoding()
        victim = next(w for w, r in cluster.workers().items() if r == "decode")
        os.kill(cluster.call("worker_pid", victim), signal.SIGTERM)
        wait(lambda: bool(cluster.call("migration_records")))
        assert streams.results() == expected[:8]
        assert cluster.call("migration_records")[0]["leaving"].keys() == {victim}
        _no_leaks(cluster)


def test_prefill_preempted_moves_its_prefills(ray_session: None, workload) -> None:
    prompts, params, expected = workload
    with _cluster(prefill_workers=2, decode_workers=1) as cluster:
        pool = cf.ThreadPoolExecutor(N)
        futures = [
            pool.submit(cluster.complete, p, sp) for p, sp in zip(prompts, params, strict=True)
        ]
        victim = next(w for w, r in cluster.workers().items() if r == "prefill")
        assert cluster.call("notify_preemption", victim, time.time() + NOTICE_S)
        got = [f.result(timeout=600)[0] for f in futures]
        assert got == expected
        _no_leaks(cluster)
