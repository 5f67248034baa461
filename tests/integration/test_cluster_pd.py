"""Disaggregated prefill/decode on a real local Ray cluster, against the colocated engine.

Every test sends at least 16 concurrent requests (greedy and seeded) and compares each
request's tokens with the single-process colocated engine's; faults are real process exits or
real hangs (the worker's chaos hooks).
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import pytest

from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster
from kvrelay.workers.llm import LLM
from kvrelay.workers.types import SamplingParams

pytestmark = pytest.mark.slow

TOPICS = [
    "the moon",
    "volcanoes",
    "a lighthouse keeper",
    "bread baking",
    "chess openings",
    "rivers",
    "the history of paper",
    "octopuses",
    "a rainy city",
    "jazz",
    "glaciers",
    "bees",
    "the first computer",
    "desert plants",
    "a train journey",
    "origami",
]
NEW_TOKENS = 24


def _params(i: int) -> SamplingParams:
    if i % 2:
        return SamplingParams(
            max_tokens=NEW_TOKENS, temperature=0.8, top_k=40, seed=1000 + i, ignore_eos=True
        )
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> str:
    """A 2-layer random-weight Llama with the default tokenizer: the handoffs carry its KV as
    they would a large model's, and its steps take milliseconds (the default model's ~60 ms
    a token on one CPU thread made this file ~95 s)."""
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def workload(model: str) -> tuple[list[list[int]], list[SamplingParams], list[list[int]]]:
    """16 prompts of different lengths, their parameters and the colocated engine's tokens."""
    llm = LLM(model)
    prompts = [
        llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Tell me about {t}." + " Please be detailed." * (i % 5)}]
        )
        for i, t in enumerate(TOPICS)
    ]
    params = [_params(i) for i in range(len(prompts))]
    expected = [list(o.token_ids) for o in llm.generate(prompts, params)]
    return prompts, params, expected


def _cluster(model: str, **kw: object) -> Cluster:
    kw = {"model": model, "handoff_timeout_s": 20.0, **kw}
    cfg = ServeConfig(grpc_port=None, http_port=None, threads_per_worker=1, **kw)  # type: ignore[arg-type]
    return Cluster.start(cfg)


def _run_all(
    cluster: Cluster, prompts: list[list[int]], params: list[SamplingParams]
) -> list[list[int]]:
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [
            pool.submit(cluster.complete, p, sp) for p, sp in zip(prompts, params, strict=True)
        ]
        return [f.result(timeout=240)[0] for f in futures]


def _assert_no_leaks(cluster: Cluster) -> None:
    cluster.check_state()  # the controller's own tables hold their invariants
    for wid, figures in cluster.integrity().items():
        assert figures["used"] == 0 and figures.get("cpu_used", 0) == 0, (wid, figures)
        assert figures["requests"] == 0 and figures["reservations"] == 0, (wid, figures)


@pytest.mark.parametrize("pools", [(1, 1), (2, 2)], ids=["1P1D", "2P2D"])
def test_pd_matches_colocated(
    ray_session: None, model: str, workload, pools: tuple[int, int]
) -> None:
    prompts, params, expected = workload
    with _cluster(model, prefill_workers=pools[0], decode_workers=pools[1]) as cluster:
        got = _run_all(cluster, prompts, params)
        assert got == expected
        counters = cluster.counters()
        assert counters["handoffs"] == len(prompts)
        # each request's KV crossed P->D exactly once: the prompt's blocks, no more
        info = cluster.call("worker_infos")
        block_bytes = next(iter(info.values()))["block_bytes"]
        bs = next(iter(info.values()))["block_size"]
        expected_bytes = sum(-(-len(p) // bs) for p in prompts) * block_bytes
        assert counters["handoff_bytes"] == expected_bytes
        sent = sum(t.get("bytes_sent", 0) for t in cluster.call("transport_totals").values())
        received = sum(
            t.get("bytes_received", 0) for t in cluster.call("transport_totals").values()
        )
        assert sent == received == expected_bytes
        _assert_no_leaks(cluster)


def test_decode_refusal_falls_back(ray_session: None, model: str, workload) -> None:
    prompts, params, expected = workload
    # a decode pool (64 tokens) too small for most requests (prompt + max_tokens): the handoff
    # skips or is refused by it, and the prefill worker decodes; none ends early at 64 tokens
    with _cluster(
        model, prefill_workers=1, decode_workers=1, num_blocks_by_role={"decode": 4}
    ) as cluster:
        got = _run_all(cluster, prompts, params)
        assert got == expected
        assert cluster.counters()["handoff_fallbacks"] > 0
        _assert_no_leaks(cluster)


def test_decode_killed_mid_transfer(ray_session: None, model: str, workload) -> None:
    prompts, params, expected = workload
    # round robin: the victim surely gets handoffs (the KV-aware router may favour the other)
    with _cluster(model, prefill_workers=1, decode_workers=2, router="round_robin") as cluster:
        victim = next(w for w, role in cluster.workers().items() if role == "decode")
        cluster.inject_fault(victim, "exit_in_recv")
        got = _run_all(cluster, prompts, params)
        assert got == expected
        assert victim not in cluster.workers()
        _assert_no_leaks(cluster)


def test_a_wedged_transfer_ends_its_handoff_and_the_prefill_worker_decodes(
    ray_session: None, model: str, workload
) -> None:
    """Both sides of every handoff hang past the transfer's deadline (a wedged transport, the
    processes alive): the controller stops waiting ``transfer_slack_s`` after that deadline,
    gives the reservation up and lets the prefill worker decode; nothing is lost or leaked."""
    prompts, params, expected = workload
    with _cluster(
        model, prefill_workers=1, decode_workers=1, handoff_timeout_s=3.0, transfer_slack_s=2.0
    ) as cluster:
        workers = cluster.workers()
        for wid, role in workers.items():
            cluster.inject_fault(wid, "hang_in_send" if role == "prefill" else "hang_in_recv")
        got = _run_all(cluster, prompts, params)
        assert got == expected
        counters = cluster.counters()
        assert counters["handoff_fallbacks"] == len(prompts) and counters["handoffs"] == 0
        assert cluster.workers() == workers  # wedged, not dead
        _assert_no_leaks(cluster)


def test_prefill_killed_after_first_token(ray_session: None, model: str, workload) -> None:
    prompts, params, expected = workload
    with _cluster(model, prefill_workers=2, decode_workers=1) as cluster:
        victim = next(w for w, role in cluster.workers().items() if role == "prefill")
        cluster.inject_fault(victim, "exit_after_first_token")
        got = _run_all(cluster, prompts, params)
        assert got == expected
        assert victim not in cluster.workers()
        assert cluster.counters()["resubmissions"] > 0
        _assert_no_leaks(cluster)


def test_first_token_before_the_submit_reply(ray_session: None, model: str, workload) -> None:
    """The prefill worker's first token reaches the controller before its answer to
    ``submit`` (a busy event loop reorders them): the handoff still happens."""
    prompts, params, expected = workload
    with _cluster(
        model, prefill_workers=1, decode_workers=1, conditional_disagg=False, prefix_pull=False
    ) as cluster:
        (prefill,) = [w for w, role in cluster.workers().items() if role == "prefill"]
        cluster.inject_fault(prefill, "late_submit_reply")
        got = _run_all(cluster, prompts[:4], params[:4])
        assert got == expected[:4]
        assert cluster.counters()["handoffs"] == 4
        _assert_no_leaks(cluster)
