"""KV directory: random event streams against a naive set-of-(hash, worker, tier) model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrelay.cluster.routing.kv_directory import KVDirectory, PrefixMatch
from kvrelay.workers.types import KVEvent, KVEventKind, Tier

BS = 16
STORED, REMOVED = KVEventKind.STORED, KVEventKind.REMOVED
GPU, CPU = Tier.GPU, Tier.CPU


def ev(kind: KVEventKind, tier: Tier, *hashes: int) -> KVEvent:
    return KVEvent(kind=kind, tier=tier, block_hashes=tuple(hashes))


def brute_match(model: set[tuple[int, str, Tier]], chain: list[int]) -> dict[str, PrefixMatch]:
    out = {}
    for w in sorted({w for _, w, _ in model}):
        n = gpu = 0
        for h in chain:
            in_gpu, in_cpu = (h, w, GPU) in model, (h, w, CPU) in model
            if not (in_gpu or in_cpu):
                break
            n += 1
            gpu += in_gpu
        if n:
            out[w] = PrefixMatch(blocks=n, gpu_blocks=gpu, cpu_blocks=n - gpu, tokens=n * BS)
    return out


def test_leading_chain_mixed_tiers_and_stop() -> None:
    d = KVDirectory(BS)
    d.apply("a", [ev(STORED, GPU, 1, 2), ev(STORED, CPU, 3), ev(STORED, GPU, 5)])
    d.apply("b", [ev(STORED, CPU, 1)])
    d.apply("c", [ev(STORED, GPU, 2, 3)])  # no block 1: no leading chain
    got = d.match([1, 2, 3, 4, 5])
    assert got == {
        "a": PrefixMatch(blocks=3, gpu_blocks=2, cpu_blocks=1, tokens=48),
        "b": PrefixMatch(blocks=1, gpu_blocks=0, cpu_blocks=1, tokens=16),
    }
    assert d.match([]) == {}
    assert d.match([9, 1]) == {}
    d.check_integrity()


def test_both_tiers_count_as_gpu_and_tier_move() -> None:
    d = KVDirectory(BS)
    d.apply("a", [ev(STORED, GPU, 1), ev(STORED, CPU, 1)])
    assert d.match([1])["a"].gpu_blocks == 1
    d.apply("a", [ev(REMOVED, GPU, 1)])  # demoted: only CPU now
    assert d.match([1])["a"] == PrefixMatch(1, 0, 1, 16)
    assert d.num_blocks() == 1
    d.apply("a", [ev(REMOVED, CPU, 1)])
    assert d.match([1]) == {} and d.num_blocks() == 0
    d.check_integrity()


def test_duplicates_and_unknown_removals_are_noops() -> None:
    d = KVDirectory(BS)
    d.apply("a", [ev(STORED, GPU, 1, 1, 2), ev(STORED, GPU, 2)])
    d.apply("a", [ev(REMOVED, CPU, 1), ev(REMOVED, GPU, 77)])
    assert d.match([1, 2])["a"].blocks == 2
    d.apply("a", [ev(REMOVED, GPU, 1), ev(REMOVED, GPU, 1)])
    assert d.match([1, 2]) == {}
    assert d.num_blocks() == 1
    d.check_integrity()


def test_remove_worker_disappears_at_once_and_slot_reuse() -> None:
    d = KVDirectory(BS)
    d.apply("a", [ev(STORED, GPU, 1, 2)])
    d.apply("b", [ev(STORED, CPU, 1, 2)])
    assert d.remove_worker("a") is True
    assert d.remove_worker("a") is False
    assert set(d.match([1, 2])) == {"b"}  # gone before any purge
    assert d.workers() == ["b"]
    d.check_integrity()
    assert d.pending_purge() == 2
    assert d.purge(max_entries=1) == 1
    d.check_integrity()
    assert d.purge() == 0
    d.apply("c", [ev(STORED, GPU, 1)])  # reuses a's slot: must not inherit a's blocks
    assert d.match([1, 2])["c"].blocks == 1
    d.remove_worker("b")
    d.remove_worker("c")
    d.apply("b", [ev(STORED, GPU, 9)])  # re-registered under a fresh slot, nothing inherited
    assert d.match([1]) == {} and set(d.match([9])) == {"b"}
    d.check_integrity()
    d.purge()
    assert d.num_blocks() == 1
    d.check_integrity()


def test_many_workers_beyond_one_mask_word() -> None:
    d = KVDirectory(BS)
    for k in range(70):
        d.apply(f"w{k:02d}", [ev(STORED, CPU if k % 2 else GPU, *range(1, k + 2))])
    got = d.match(list(range(1, 80)))
    assert len(got) == 70
    for k in range(70):
        m = got[f"w{k:02d}"]
        assert m.blocks == k + 1 and m.cpu_blocks == (k + 1 if k % 2 else 0)
    d.check_integrity()


def test_integrity_detects_corruption() -> None:
    d = KVDirectory(BS)
    d.apply("a", [ev(STORED, GPU, 1)])
    d._masks[2] = 0
    with pytest.raises(AssertionError):
        d.check_integrity()
    with pytest.raises(ValueError):
        d.purge(-1)


def test_bad_block_size() -> None:
    with pytest.raises(ValueError):
        KVDirectory(0)


WORKERS = ["w0", "w1", "w2", "w3"]
op = st.one_of(
    st.tuples(
        st.sampled_from(WORKERS),
        st.sampled_from([STORED, REMOVED]),
        st.sampled_from([GPU, CPU]),
        st.lists(st.integers(0, 11), max_size=6),
    ),
    st.tuples(st.sampled_from(WORKERS), st.just("remove_worker")),
    st.tuples(st.integers(0, 5), st.just("purge")),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, max_size=40), chains=st.lists(st.lists(st.integers(0, 11)), max_size=4))
def test_random_streams_match_reference(ops: list, chains: list[list[int]]) -> None:
    d = KVDirectory(BS)
    model: set[tuple[int, str, Tier]] = set()
    for o in ops:
        if o[1] == "purge":
            left = d.pending_purge()
            assert d.purge(o[0]) == max(0, left - o[0])
            continue
        if o[1] == "remove_worker":
            d.remove_worker(o[0])
            model = {x for x in model if x[1] != o[0]}
            continue
        w, kind, tier, hashes = o
        d.apply(w, [ev(kind, tier, *hashes)])
        for h in hashes:
            (model.add if kind is STORED else model.discard)((h, w, tier))
    d.check_integrity()
    for chain in [*chains, list(range(12))]:
        assert d.match(chain) == brute_match(model, chain)
    assert d.workers() == sorted({w for _, w, _ in model} | set(d.workers()))
    d.purge()
    d.check_integrity()
    assert d.num_blocks() == len({h for h, _, _ in model})
