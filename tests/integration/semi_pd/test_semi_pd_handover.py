"""Handovers inside one KV storage, engine by engine (fp32, CPU; the random-weight 2-layer
Llama of ``tiny_model_dir``: a handover is the same on any weights): what the prefill engine
hands over (block ids, their hashes) the decode engine adopts without copying, hashing or
committing again; an overlapped engine holds the blocks it frees, and the hashes of those it
fills, until its step in flight is read; a burst of handovers is adopted in one command. The
worker-level tests are in test_semi_pd.py and test_semi_pd_split_rule.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.kv.tiers import check_owned
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.semi_pd.worker import SemiPDWorker
from kvrelay.workers.types import FinishReason, SamplingParams
from kvrelay_testing.semi_pd import (
    CONFIG,
    Collector,
    assert_clean,
    colocated_tokens,
    mixed_params,
    paused,
    submit_all,
)


def test_overlapped_lane_holds_freed_blocks_until_its_step_is_read(
    loaded: LoadedModel, prompts: list[list[int]]
) -> None:
    """The two lanes' engines over one storage, stepped by hand: a block the overlapped decode
    engine frees with a step in flight (a finish read one step late, an abort between steps)
    stays out of the other engine's reach, owned by the decode engine, until the decode
    engine has read a step launched after the release; then it is back in the pool."""
    decode = Engine(loaded, replace(CONFIG, overlap_schedule=True), defer_releases=True)
    other = Engine(loaded, replace(CONFIG, overlap_schedule=False), storage=decode.storage)
    pool = decode.pool

    def reachable(blocks: list[int]) -> set[int]:
        """Of ``blocks``, those the other engine can allocate now (everything it can, back)."""
        got = other.reserve(pool.num_available) or []
        other.unreserve(got)
        return set(blocks) & set(got)

    def owned() -> None:  # exact ownership: sequences and held releases, nothing else
        decode.check_integrity()
        seqs = decode.seqs.values()
        check_owned(pool, [*(b for s in seqs for b in s.block_ids), *decode.deferred_blocks()])

    short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    endless = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    decode.add_request("short", prompts[0], short)
    decode.add_request("long", prompts[1], endless)
    # 1. a finish: read while the next step (without it) already runs
    finished: list[int] = []
    while not finished:
        blocks = list(decode.seqs["short"].block_ids)
        if any(e.finish_reason is not None for e in decode.step()):
            finished = blocks
    assert reachable(finished) == set()
    assert decode.has_unfinished() and set(decode.deferred_blocks()) == set(finished)
    owned()
    decode.step()  # reads the step that was in flight at the finish
    assert decode.deferred_blocks() == [] and reachable(finished) == set(finished)
    owned()
    # 2. an abort between steps, a step in flight
    blocks = list(decode.seqs["long"].block_ids)
    assert decode.abort("long")
    assert reachable(blocks) == set()
    owned()
    decode.step()  # nothing to schedule: reads the last step, gives everything back
    assert not decode.has_unfinished() and reachable(blocks) == set(blocks)
    owned()
    assert pool.stats().used == 0
    # 3. shutting down with a step in flight: what an abort left held goes back
    decode.add_request("last", prompts[2], endless)
    while len(decode.seqs["last"].output_ids) < 2:
        decode.step()
    assert decode.abort("last") and decode.deferred_blocks()
    decode.close()
    assert decode.deferred_blocks() == [] and pool.stats().used == 0


def test_an_overlapped_engine_commits_a_block_once_its_step_is_read(
    loaded: LoadedModel, prompts: list[list[int]]
) -> None:
    """An overlapped engine over a shared storage launches step N+1 before it reads step N: the
    blocks step N+1 fills are not in the pool's prefix index (where the other lane's lookup
    would read them before their KV is written) until a read shows the step done. A request
    aborted with its commit waiting leaves its blocks unhashed."""
    engine = Engine(loaded, replace(CONFIG, overlap_schedule=True), defer_releases=True)
    pool, bs = engine.pool, CONFIG.block_size
    prompt = [t for p in prompts * 2 for t in p][:200]  # 48-token chunks: 5 steps of prefill
    assert len(prompt) == 200
    engine.add_request("a", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    seq = engine.seqs["a"]
    engine.step()  # launches chunk 1 (3 full blocks); nothing read
    assert seq.num_committed_blocks == 3 and seq.block_hashes[:3]
    assert pool.lookup(seq.block_hashes[:3]) == []  # held, not in the index
    engine.step()  # chunk 2 launched, then chunk 1 read (it sampled nothing)
    assert pool.lookup(seq.block_hashes[:6]) == seq.block_ids[:3]  # chunk 1's only
    while not any(e.request_id == "a" for e in engine.step()):
        pass  # until the first token is read: the prompt's last chunk is done
    full = len(prompt) // bs
    assert pool.lookup(seq.block_hashes[:full]) == seq.block_ids[:full]  # all published
    assert engine.stats().extra["overlap_held_commits"] == full
    # an abort with a commit waiting: the commit is dropped, the blocks come back unhashed
    engine.add_request("b", prompts[3] * 3, SamplingParams(max_tokens=40, temperature=0.0))
    engine.step()
    b = engine.seqs["b"]
    held_hashes, held_blocks = list(b.block_hashes), list(b.block_ids)
    assert held_hashes and pool.lookup(held_hashes) == []
    assert engine.abort("b")
    while engine.has_unfinished():
        engine.step()
    assert pool.lookup(held_hashes) == []
    assert all(pool.block_hash(x) is None for x in held_blocks)
    engine.check_integrity()
    assert pool.stats().used == 0
    engine.close()


def test_an_adopted_request_keeps_its_block_hashes_without_hashing_again(
    loaded: LoadedModel, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handover inside one storage carries the prefill lane's block hashes: the decode engine
    neither hashes nor commits the prompt's blocks again, ends with the same hashes as one
    that did, and its tokens equal the colocated engine's."""
    from kvrelay.workers.engine import scheduler as sched_mod
    from kvrelay.workers.receiving import continue_prefilled

    greedy = SamplingParams(max_tokens=CONFIG.block_size + 4, temperature=0.0, ignore_eos=True)
    prompt = prompts[4] * 3  # several full blocks; the output fills at least one more
    colocated = Engine(loaded, CONFIG)
    colocated.add_request("r", prompt, greedy)
    want: list[int] = []
    while colocated.has_unfinished():
        want += [t for e in colocated.step() for t in e.token_ids]

    decode = Engine(loaded, CONFIG)
    prefill = Engine(loaded, CONFIG, storage=decode.storage)
    prefill.add_request("r", prompt, greedy, prefill_only=True)
    first: list[int] = []
    while not first:
        first = [t for e in prefill.step() for t in e.token_ids]
    seq = prefill.hand_over("r")
    full = len(prompt) // CONFIG.block_size
    assert seq.num_committed_blocks == full and len(seq.block_hashes) == full

    hashed: list[int] = []
    real = sched_mod.block_hashes
    monkeypatch.setattr(
        sched_mod, "block_hashes", lambda ids, *a: hashed.append(len(ids)) or real(ids, *a)
    )
    committed: list[int] = []
    real_commit = decode.pool.commit_many
    monkeypatch.setattr(
        decode.pool, "commit_many", lambda b, h: committed.extend(b) or real_commit(b, h)
    )
    continue_prefilled(
        decode, "r", seq.prompt_ids, seq.output_ids, seq.params, seq.block_ids,
        tenant=seq.tenant, priority=seq.priority, num_computed=seq.num_computed,
        block_hashes=seq.block_hashes, committed_blocks=seq.num_committed_blocks,
    )  # fmt: skip
    adopted = decode.seqs["r"]
    assert hashed == [] and committed == []  # nothing hashed or committed again
    assert adopted.block_hashes == real(prompt[: full * CONFIG.block_size], CONFIG.block_size,
                                        decode.scheduler.hash_root)  # fmt: skip
    got = list(first)
    while decode.has_unfinished():
        got += [t for e in decode.step() for t in e.token_ids]
    assert got == want
    assert hashed  # later blocks are hashed as they fill (the chain goes on)
    decode.check_integrity()
    assert decode.pool.stats().used == 0 or decode.pool.stats().used == decode.pool.stats().cached


def test_prompt_hashes_given_at_submit_spare_admission_the_hashing(
    loaded: LoadedModel, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prompt_block_hashes`` equals what admission computes, and a request queued with them
    is admitted (and hits the prefix cache) without hashing on the engine's thread."""
    from kvrelay.workers.engine import scheduler as sched_mod

    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompt = prompts[4] * 3
    plain = Engine(loaded, CONFIG)
    plain.add_request("a", prompt, greedy)
    plain.step()
    hashes = plain.prompt_block_hashes(prompt)
    assert hashes and plain.seqs["a"].block_hashes[: len(hashes)] == hashes
    while plain.has_unfinished():
        plain.step()

    hashed: list[int] = []
    real = sched_mod.block_hashes
    monkeypatch.setattr(
        sched_mod, "block_hashes", lambda ids, *a: hashed.append(len(ids)) or real(ids, *a)
    )
    plain.add_request("b", prompt, greedy, block_hashes=hashes)
    while plain.has_unfinished():
        plain.step()
    assert all(n > len(hashes) * CONFIG.block_size for n in hashed)  # only later blocks
    assert plain.scheduler.prefix_hits >= len(hashes) * CONFIG.block_size  # b reused a's
    with pytest.raises(ValueError, match="block_hashes"):
        plain.add_request("c", prompt, greedy, block_hashes=hashes[:-1])


def test_a_burst_of_handovers_is_adopted_in_one_command(
    loaded: LoadedModel, prompts: list[list[int]]
) -> None:
    """Requests the prefill lane hands over while the decode lane is busy wait in transit for
    one adoption command (one storage-lock acquisition on the decode lane, not one each);
    their tokens are still the colocated worker's and nothing leaks."""
    sink = Collector()
    params = mixed_params(len(prompts))
    semi = SemiPDWorker(
        "s", "colocated", model=loaded, engine_config=CONFIG, sink=sink,
        prefill_tokens=4096,
    )  # fmt: skip
    try:
        want = colocated_tokens(loaded, prompts, params)
        rids = [f"b-{i}" for i in range(len(prompts))]
        with paused(semi.loop, semi.storage_lock):
            submit_all(semi, rids, prompts, params)
            sink.wait(lambda: all(r in sink.tokens for r in rids))  # every first token out
            sink.wait(lambda: len(semi.inside.in_transit()) == len(rids))  # all handed over
            assert semi.loop._commands.qsize() == 1  # one adoption command for the burst
        sink.wait_done(rids)
        assert [sink.tokens[r] for r in rids] == want
        assert semi.inside.handovers == len(rids)
        assert_clean(semi)
    finally:
        semi.shutdown()


def test_first_tokens_held_for_the_decode_lane_go_out_with_the_adoption(
    loaded: LoadedModel, prompts: list[list[int]]
) -> None:
    """``first_token="decode"``: a handed over request's first token waits in the worker while
    the decode lane is busy (none reaches the sink though every request is in transit), goes
    out with the adoption, ahead of the request's later tokens (equal to the colocated
    worker's); a request aborted in transit sends nothing and leaks nothing."""
    sink = Collector()
    params = mixed_params(len(prompts))
    semi = SemiPDWorker(
        "s", "colocated", model=loaded, engine_config=CONFIG, sink=sink, first_token="decode",
    )  # fmt: skip
    try:
        want = colocated_tokens(loaded, prompts, params)
        rids = [f"h-{i}" for i in range(len(prompts))]
        with paused(semi.loop, semi.storage_lock):
            submit_all(semi, rids, prompts, params)
            sink.wait(lambda: len(semi.inside.in_transit()) == len(rids))  # all handed over
            assert not any(r in sink.tokens for r in rids)  # every first token held
            # aborted in transit (the abort then waits for the paused decode lane)
            aborting = ThreadPoolExecutor(1).submit(semi.abort, rids[0])
            sink.wait(lambda: rids[0] not in semi.inside.in_transit())
        assert aborting.result(timeout=120)
        sink.wait_done(rids[1:])
        assert [sink.tokens[r] for r in rids[1:]] == want[1:]
        assert rids[0] not in sink.tokens and not semi.inside.held()
        assert semi.inside.handovers == len(rids) - 1
        assert_clean(semi)
    finally:
        semi.shutdown()


def test_first_token_lane_is_checked() -> None:
    with pytest.raises(ValueError, match="first_token"):
        SemiPDWorker("s", "colocated", model=None, engine_config=CONFIG, first_token="later")


def test_a_held_first_token_goes_out_before_the_abort_when_the_adoption_fails(
    loaded: LoadedModel, prompts: list[list[int]]
) -> None:
    """The decode lane stops with the adoption command queued (``first_token="decode"``): the
    request's stream still gets its first token (the colocated worker's), then ends aborted."""
    sink = Collector()
    params = mixed_params(1)
    semi = SemiPDWorker(
        "s", "colocated", model=loaded, engine_config=CONFIG, sink=sink, first_token="decode",
    )  # fmt: skip
    try:
        want = colocated_tokens(loaded, prompts[:1], params)
        with paused(semi.loop, semi.storage_lock):
            semi.submit("f", prompts[0], params[0])
            sink.wait(lambda: len(semi.inside.in_transit()) == 1)
            assert "f" not in sink.tokens
            stopping = ThreadPoolExecutor(1).submit(semi.loop.stop)
            sink.wait(lambda: semi.loop._stop.is_set())
        stopping.result(timeout=60)
        sink.wait_done(["f"])
        assert sink.finish["f"] is FinishReason.ABORT
        assert sink.tokens["f"] == want[0][:1]
    finally:
        semi.shutdown()
