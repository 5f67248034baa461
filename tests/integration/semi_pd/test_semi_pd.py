"""The semi-PD worker (fp32, CPU): a prefill lane and a decode lane over one KV storage,
against the colocated worker on the same weights.

The weights are the 2-layer random-weight Llama of ``tiny_model_dir`` (the default model's
tokenizer): the lanes' locking, handoffs and preemptions are the same on any model, and its
steps take milliseconds, so each test runs many more lane iterations a second than the default
model's ~60 ms ones (this file: 90 s on the default model, 12 s on this one).
test_cluster_semi_pd.py serves the default model through a semi-PD cluster;
test_semi_pd_split_rule.py has the SM-share tests (the split rule, a graph set per share);
the fixtures these files share (the model, its prompts, the colocated reference) are conftest.py's.

Real parts throughout: real engines on their loop threads, the real gloo transport for the
copy path a cross-worker handoff still takes, the real pools' integrity checks. A test that
needs a request to stand still at an iteration boundary pauses a lane with a command that
gives the storage lock back while it waits (as the lane's forward pass does).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.model.sparse_attention import SparseConfig
from kvrelay.workers.semi_pd.worker import SemiPDWorker
from kvrelay.workers.transport.kv_transport import start_rendezvous_store
from kvrelay.workers.types import FinishReason, Phase, SamplingParams
from kvrelay.workers.worker import Worker
from kvrelay_testing.semi_pd import (
    CONFIG,
    Collector,
    Reference,
    assert_clean,
    decode_lane_held,
    generate,
    mixed_params,
    paused,
)

# the decode lane's step: plain (the default) or overlapped, its releases held back
OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
# ... and the prefill lane's: plain, overlapped alone (the serving default, "prefill"), or
# overlapped with the decode lane's ("both")
LANES = pytest.mark.parametrize(
    ("overlap", "prefill_overlap"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["plain", "overlap", "prefill", "both"],
)


@LANES
def test_tokens_match_colocated(
    loaded: LoadedModel,
    prompts: list[list[int]],
    colocated: Reference,
    overlap: bool,
    prefill_overlap: bool,
) -> None:
    sink = Collector()
    params = mixed_params(len(prompts))
    semi = SemiPDWorker(
        "s", "colocated", model=loaded, engine_config=CONFIG, sink=sink, decode_overlap=overlap,
        prefill_overlap=prefill_overlap,
    )  # fmt: skip
    try:
        assert semi.engine.overlap is overlap and semi.prefill_engine.overlap is prefill_overlap
        want = colocated(prompts, params)
        got = generate(semi, sink, prompts, params, "s")
        assert got == want
        assert all(
            len(t) == 24 or sink.finish[f"s-{i}"] is FinishReason.STOP for i, t in enumerate(got)
        )
        # every request crossed from the prefill lane to the decode lane inside the worker
        assert semi.inside.handovers == len(prompts)
        hb = semi.heartbeat()
        assert hb.stats.prompt_tokens_computed >= sum(len(p) for p in prompts) - 16 * len(prompts)
        assert semi.info().semi_pd and semi.info().role == "colocated"
        figures = assert_clean(semi)
        assert figures["transit"] == 0
        # the overlapped decode lane held back what it freed with a step in flight (every finish)
        assert (decode_lane_held(semi) > 0) is overlap
        # an overlapped prefill lane's full blocks were committed once their step was read
        held = semi.prefill_loop.call(lambda e: e.stats().extra["overlap_held_commits"])
        assert (held > 0) is prefill_overlap
        # each step held the storage lock for its bookkeeping, not for its forward pass
        for lane, phases in semi.lane_times().items():
            step, locked = phases["step"], phases["held"]
            assert locked["count"] == step["count"] > 0, lane
            assert locked["total_s"] < 0.5 * step["total_s"], (lane, locked, step)
            # the bookkeeping it held the lock for, by part, plain and overlapped steps alike
            assert phases["schedule"]["count"] >= step["count"], lane
            assert phases["commit"]["count"] > 0, lane
            overlapped = overlap if lane == "decode" else prefill_overlap
            assert ("reclaim" in phases) is overlapped, lane
        # the handoff's parts, once a request: handed over -> adopted -> first decode event
        decode = semi.lane_times()["decode"]
        parts = [decode[p] for p in ("adopt_wait", "first_decode", "handoff_gap")]
        assert [p["count"] for p in parts] == [len(prompts)] * 3
        assert parts[2]["total_s"] == pytest.approx(parts[0]["total_s"] + parts[1]["total_s"])
    finally:
        semi.shutdown()


def test_decode_lock_first_hands_the_lock_over_inside_the_prefill_schedule(
    loaded: LoadedModel, prompts: list[list[int]], colocated: Reference
) -> None:
    """``decode_lock_first``: the first time the prefill lane's scheduler offers the lock (the
    test has it wait there until the decode lane queues for it, a command of the test's), the
    decode lane runs its command inside the prefill lane's schedule, which then goes on with
    its admissions; with first tokens sent by the decode lane too, tokens equal the colocated
    worker's and nothing leaks."""
    sink = Collector()
    params = mixed_params(len(prompts))
    semi = SemiPDWorker(
        "s", "colocated", model=loaded, engine_config=CONFIG, sink=sink, decode_lock_first=True,
        first_token="decode",
    )  # fmt: skip
    try:
        lock, offer = semi.storage_lock, semi.prefill_engine.scheduler.yield_point
        assert offer is not None
        ran: list[str] = []

        def first_offer_waits_for_the_decode_lane() -> None:
            if ran:
                offer()
                return
            ran.append("offered")
            # the decode lane's command must wait: this thread holds the lock
            cmd = semi.loop.submit(lambda e: ran.append("decode command"))
            deadline = time.monotonic() + 60
            while not lock._urgent:
                assert time.monotonic() < deadline and not cmd.done()
                time.sleep(0.001)
            offer()
            ran.append("admissions go on")  # the command ran (under the lock) before this

        semi.prefill_loop.call(
            lambda e: setattr(e.scheduler, "yield_point", first_offer_waits_for_the_decode_lane)
        )
        want = colocated(prompts, params)
        got = generate(semi, sink, prompts, params, "s")
        assert got == want
        assert ran == ["offered", "decode command", "admissions go on"] and lock.yields >= 1
        assert semi.heartbeat().stats.extra["semi_pd_lock_yields"] == lock.yields
        assert semi.lane_times()["prefill"]["yield"]["count"] == lock.yields
        assert_clean(semi)
    finally:
        semi.shutdown()


@pytest.mark.parametrize("prefill_overlap", [False, True], ids=["plain", "overlap"])
def test_the_prefill_lane_samples_without_the_storage_lock(
    loaded: LoadedModel, prompts: list[list[int]], prefill_overlap: bool
) -> None:
    """Sampling reads no KV: the prefill lane gives the storage lock back around it, so the
    decode lane is not kept waiting meanwhile. With the decode lane held at an iteration
    boundary (without the lock), nobody else holds the lock while the prefill lane samples."""
    sink = Collector()
    semi = SemiPDWorker(
        "s", "colocated", model=loaded, engine_config=CONFIG, sink=sink,
        prefill_overlap=prefill_overlap,
    )  # fmt: skip
    free: list[bool] = []
    sampler = semi.prefill_engine.sampler
    sample = sampler.sample

    def spying(*args: object, **kw: object) -> torch.Tensor:
        got = semi.storage_lock.acquire(blocking=False)
        if got:
            semi.storage_lock.release()
        free.append(got)
        return sample(*args, **kw)  # type: ignore[arg-type]

    sampler.sample = spying  # type: ignore[method-assign]
    try:
        with paused(semi.loop, semi.storage_lock):
            semi.submit("a", prompts[0], SamplingParams(max_tokens=2, temperature=0.0))
            sink.wait(lambda: "a" in sink.tokens)  # its first token, from the prefill lane
        sink.wait_done(["a"])
        assert free and all(free)
        assert_clean(semi)
    finally:
        semi.shutdown()


def test_decode_lane_batch_passes_max_num_seqs_up_to_decode_seqs(
    loaded: LoadedModel, prompts: list[list[int]], colocated: Reference
) -> None:
    """The decode lane adopts every request handed over, not ``max_num_seqs`` of them: its
    batch grows past the config's cap, so its engine (and on CUDA its decode graphs) is sized
    by ``decode_seqs``, as a decode worker's; the prefill lane keeps the config's cap, as
    prefill and colocated workers do. Tokens as colocated."""
    sink = Collector()
    config = replace(CONFIG, max_num_seqs=2)
    n = len(prompts)
    for role, want, graphs in (("decode", n, n), ("prefill", 2, n), ("colocated", 2, 0)):
        worker = Worker(role, role, model=loaded, engine_config=config, sink=sink,
                        decode_seqs=n)  # fmt: skip
        try:
            # a prefill worker may become a decode worker: its graphs are sized for that too
            assert worker.engine.config.max_num_seqs == want, role
            assert worker.engine.config.decode_graph_batch == graphs, role
            for new, cap in (("decode", n), ("prefill", 2), ("decode", n)):  # set_role's caps
                if role != "colocated":
                    worker.set_role(new)
                    assert worker.loop.call(lambda e: e.scheduler.max_num_seqs) == cap, new
        finally:
            worker.shutdown()
    with pytest.raises(ValueError, match="decode_seqs"):
        SemiPDWorker("x", "colocated", model=loaded, engine_config=config, sink=sink,
                     decode_seqs=0)  # fmt: skip
    semi = SemiPDWorker(
        "s", "colocated", model=loaded, engine_config=config, sink=sink, decode_seqs=len(prompts)
    )
    try:
        assert semi.loop.call(lambda e: e.config.max_num_seqs) == len(prompts)
        assert semi.prefill_loop.call(lambda e: e.config.max_num_seqs) == 2
        params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True) for _ in prompts]
        assert generate(semi, sink, prompts, params, "s") == colocated(prompts, params)
        rows = semi.loop.call(lambda e: e.runner.max_decode_rows)
        assert 2 < rows <= len(prompts)
        assert_clean(semi)
    finally:
        semi.shutdown()


@pytest.mark.parametrize("prefill_tokens", [16, 48, 4096], ids=["below", "chunked", "whole"])
def test_prefill_lane_budget(
    loaded: LoadedModel, prompts: list[list[int]], prefill_tokens: int
) -> None:
    """The prefill lane's per-step budget is ``prefill_tokens``, never below the config's 48: a
    prompt longer than that prefills in one prefill-lane step with a budget that holds it, in
    48-token chunks otherwise; the tokens are the colocated engine's either way."""
    sink = Collector()
    prompt = [t for p in prompts for t in p]  # the six questions back to back
    assert len(prompt) > CONFIG.max_num_batched_tokens
    semi = SemiPDWorker(
        "s", "colocated", model=loaded, engine_config=CONFIG, sink=sink,
        prefill_tokens=prefill_tokens,
    )  # fmt: skip
    try:
        params = [SamplingParams(max_tokens=4, temperature=0.0)]
        got = generate(semi, sink, [prompt], params, "b")
        steps = semi.prefill_loop.call(lambda e: e.stats().steps)
        chunk = max(prefill_tokens, CONFIG.max_num_batched_tokens)
        assert steps == -(-len(prompt) // chunk) > 0
        reference = Worker("c", "colocated", model=loaded, engine_config=CONFIG, sink=sink)
        try:
            assert got == generate(reference, sink, [prompt], params, "c")
        finally:
            reference.shutdown()
        assert_clean(semi)
    finally:
        semi.shutdown()


def test_sparse_attention_decodes_on_the_decode_lane_only(
    loaded: LoadedModel, prompts: list[list[int]]
) -> None:
    """With ``--sparse-attention both`` only the decode lane keeps key bounds (the prefill lane
    never decodes); a budget beyond the context decodes exactly like dense."""
    sink = Collector()
    params = [SamplingParams(max_tokens=12, temperature=0.0) for _ in prompts]
    sparse = replace(CONFIG, sparse=SparseConfig(mode="both", budget=4096))
    colocated = Worker("c", "colocated", model=loaded, engine_config=CONFIG, sink=sink)
    semi = SemiPDWorker("s", "colocated", model=loaded, engine_config=sparse, sink=sink)
    try:
        pre, dec = semi.prefill_engine.sparse, semi.loop.engine.sparse
        assert pre is not None and dec is not None
        assert pre.bounds.shape[0] == 0 and dec.bounds.shape[0] == semi.storage.pool.num_blocks
        assert generate(semi, sink, prompts, params, "s") == generate(
            colocated, sink, prompts, params, "c"
        )
        assert semi.heartbeat().stats.extra["sparse_decode_selected_tokens"] > 0
        assert_clean(semi)
    finally:
        colocated.shutdown()
        semi.shutdown()


def test_handoff_moves_block_ids_and_no_bytes(
    loaded: LoadedModel, prompts: list[list[int]]
) -> None:
    """Inside the worker a handoff moves ownership of the same block ids (the transport and
    the tier copier count zero bytes); to another worker it still takes the copy path, whose
    bytes the same counters do count."""
    store, port = start_rendezvous_store("127.0.0.1", 0)
    sink = Collector()
    semi = SemiPDWorker(
        "s",
        "colocated",
        model=loaded,
        engine_config=CONFIG,
        sink=sink,
        rendezvous=("127.0.0.1", port),
    )
    other = Worker(
        "d", "decode", model=loaded, engine_config=CONFIG, sink=sink, rendezvous=("127.0.0.1", port)
    )
    try:
        greedy = SamplingParams(max_tokens=8, temperature=0.0)
        # 1. inside: park on the prefill lane, then let the decode lane take it
        semi.submit("in", prompts[2], greedy, prefill_only=True)
        sink.wait(lambda: semi.prefill_loop.call(lambda e: "in" in e.handoffs))
        parked = semi.prefill_loop.call(lambda e: e.handoff_blocks("in"))
        assert len(parked) == -(-len(prompts[2]) // CONFIG.block_size)
        with paused(semi.loop, semi.storage_lock):
            semi.continue_local("in")
            assert semi.check_integrity()["transit"] == 1  # owned by the worker meanwhile
            adopted = semi.loop.submit(lambda e: list(e.seqs["in"].block_ids))
        assert adopted.result(60)[: len(parked)] == parked  # the same blocks, no copy
        sink.wait_done(["in"])
        totals = semi.transport_totals()
        assert totals.get("bytes_sent", 0) == 0 and totals.get("bytes_received", 0) == 0
        assert semi.storage.copier.bytes == 0
        assert semi.inside.handovers == 1

        # 2. to another worker: the copy path over gloo, counted by the same counters
        semi.submit("out", prompts[3], greedy, prefill_only=True)
        sink.wait(lambda: semi.prefill_loop.call(lambda e: "out" in e.handoffs))
        n = semi.handoff_size("out")
        assert other.reserve("out", n, time.time() + 60) is not None
        sent: list[int] = []
        sender = threading.Thread(target=lambda: sent.append(semi.send_kv("out", "d", "t1", 60)))
        sender.start()
        received = other.recv_kv("out", "s", "t1", 60)
        sender.join(60)
        other.accept_prefilled("out", prompts[3], sink.tokens["out"], greedy)
        semi.finish_handoff("out")
        sink.wait_done(["out"])
        bytes_moved = n * semi.engine.block_bytes
        assert sent == [bytes_moved] and received == bytes_moved
        assert semi.transport_totals()["bytes_sent"] == bytes_moved  # the copy, and only it
        assert semi.inside.handovers == 1
        assert_clean(semi)
        assert_clean(other)
    finally:
        semi.shutdown()
        other.shutdown()
        del store


def test_the_decode_lane_keeps_the_requests_arrival(
    loaded: LoadedModel, prompts: list[list[int]]
) -> None:
    """A request submitted with the frontend's stamp (``arrival_s``, 30 s ago) is as old on
    the decode lane, after its handover, as on the prefill lane: its place in the decode
    lane's order (and the deadline policy's lateness) is the request's, not the handover's."""
    sink = Collector()
    semi = SemiPDWorker("s", "colocated", model=loaded, engine_config=CONFIG, sink=sink)
    try:
        params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
        semi.submit("r", prompts[0], params, arrival_s=time.time() - 30.0)
        sink.wait(lambda: semi.loop.call(lambda e: "r" in e.seqs))
        age = semi.loop.call(lambda e: time.monotonic() - e.seqs["r"].arrival_time)
        assert 30.0 <= age < 60.0
        assert semi.abort("r")
        sink.wait(lambda: semi.loop.call(lambda e: "r" not in e.seqs))
        assert_clean(semi)
    finally:
        semi.shutdown()


@LANES
def test_faults_leave_storage_clean(
    loaded: LoadedModel, prompts: list[list[int]], overlap: bool, prefill_overlap: bool
) -> None:
    """Abort mid-prefill, mid-decode and in transit between the lanes: no block leaks and
    none is owned twice (exact ownership over both lanes)."""
    sink = Collector()
    config = EngineConfig(max_num_batched_tokens=16, num_blocks=256, cpu_num_blocks=64)
    semi = SemiPDWorker(
        "s", "colocated", model=loaded, engine_config=config, sink=sink, prefill_tokens=16,
        decode_overlap=overlap, prefill_overlap=prefill_overlap,
    )  # fmt: skip
    long_prompt = [t for p in prompts for t in p][:320]  # 20 prefill steps of 16 tokens
    endless = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    try:
        # mid-prefill
        semi.submit("p", long_prompt, endless)
        sink.wait(
            lambda: any(
                r.request_id == "p" and r.phase is Phase.PREFILL for r in semi.requests_info()
            )
        )
        assert semi.abort("p")
        assert "p" not in sink.tokens
        assert_clean(semi)

        # mid-decode
        semi.submit("d", prompts[0], endless)
        sink.wait(lambda: len(sink.tokens.get("d", ())) >= 4)
        assert semi.abort("d")
        assert_clean(semi)

        # in transit: the prefill lane handed it over, the decode lane has not adopted it
        aborted: list[bool] = []
        with paused(semi.loop, semi.storage_lock):
            semi.submit("t", prompts[1], endless)
            sink.wait(lambda: semi.check_integrity()["transit"] == 1)
            # the abort's last look (the decode lane) waits for the pause to end
            killer = threading.Thread(target=lambda: aborted.append(semi.abort("t")))
            killer.start()
            sink.wait(lambda: semi.check_integrity()["transit"] == 0)
        killer.join(60)
        assert aborted == [True]
        assert semi.loop.call(lambda e: "t" not in e.seqs)  # the adopt found nothing to take
        assert len(sink.tokens["t"]) == 1  # the first token, nothing after
        assert_clean(semi)
        assert not semi.abort("t")
        # the overlapped lane aborted "d" with a step in flight: its blocks were held back
        assert (decode_lane_held(semi) > 0) is overlap
    finally:
        semi.shutdown()


@OVERLAP
def test_decode_lane_preemption_keeps_tokens(
    loaded: LoadedModel, prompts: list[list[int]], colocated: Reference, overlap: bool
) -> None:
    """A pool too small for the batch: the decode lane preempts (swap to the shared CPU tier,
    or recompute) and every request still gives the colocated engine's greedy tokens."""
    sink = Collector()
    params = [SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)] * 4
    tight = EngineConfig(max_num_batched_tokens=48, num_blocks=28, cpu_num_blocks=64)
    semi = SemiPDWorker(
        "s", "colocated", model=loaded, engine_config=tight, sink=sink, decode_overlap=overlap
    )
    try:
        want = colocated(prompts[:4], params)
        got = generate(semi, sink, prompts[:4], params, "s")
        assert got == want
        decode_stats = semi.loop.call(lambda e: e.stats())
        assert decode_stats.preemptions > 0
        assert_clean(semi)
    finally:
        semi.shutdown()


@LANES
def test_concurrent_stress_never_double_allocates(
    loaded: LoadedModel,
    prompts: list[list[int]],
    colocated: Reference,
    overlap: bool,
    prefill_overlap: bool,
) -> None:
    """Both lanes busy on a pool too small for the load (evictions, preemption on either lane), while
    another thread aborts a third of the requests at different points (before their first
    token, right after it, while decoding): exact ownership holds afterwards, and every request that was not aborted
    gives the colocated engine's greedy tokens."""
    sink = Collector()
    words = [t for p in prompts for t in p]
    lens = [20, 70, 35, 110, 50, 90, 25, 60, 80, 40, 100, 30]
    batch = [words[i * 7 : i * 7 + n] for i, n in enumerate(lens)]
    params = [
        SamplingParams(max_tokens=8 + 3 * (i % 5), temperature=0.0, ignore_eos=True)
        for i in range(len(batch))
    ]
    tight = EngineConfig(max_num_batched_tokens=32, num_blocks=24, cpu_num_blocks=16)
    semi = SemiPDWorker(
        "s", "colocated", model=loaded, engine_config=tight, sink=sink, decode_overlap=overlap,
        prefill_overlap=prefill_overlap,
    )  # fmt: skip
    victims = {f"s-{i}": i % 4 for i in range(0, len(batch), 3)}  # abort at this many tokens
    aborted: set[str] = set()

    def killer() -> None:
        pending = dict(victims)
        deadline = time.monotonic() + 240
        while pending and time.monotonic() < deadline:
            for rid, at in list(pending.items()):
                if len(sink.tokens.get(rid, ())) >= at:
                    if semi.abort(rid):
                        aborted.add(rid)
                    del pending[rid]
            time.sleep(0.005)

    try:
        want = colocated(batch, params)
        thread = threading.Thread(target=killer)
        for i, (p, sp) in enumerate(zip(batch, params, strict=True)):
            semi.submit(f"s-{i}", p, sp)
            if i == 0:
                thread.start()
        sink.wait(
            lambda: all(f"s-{i}" in sink.finish or f"s-{i}" in aborted for i in range(len(batch)))
        )
        thread.join(60)
        assert aborted  # the faults happened
        for i in range(len(batch)):
            rid = f"s-{i}"
            if rid not in aborted:
                assert sink.tokens[rid] == want[i], rid
        hb = semi.heartbeat()
        # the pool ran dry: allocations had to evict cached blocks (the prompts, 710 tokens at
        # offsets that share no block, need more than its 24 blocks). Whether a lane was also
        # preempted depends on how the aborts fall, so that is not asserted
        assert hb.stats.pool.extra["evictions"] > 0
        assert (decode_lane_held(semi) > 0) is overlap
        assert_clean(semi)
    finally:
        semi.shutdown()
