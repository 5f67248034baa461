"""Cost estimates for conditional disaggregation and pulls."""

from __future__ import annotations

import pytest

from kvrelay.cluster.routing.cost import (
    PrefillPlace,
    PrefixSource,
    disaggregation,
    pull_or_recompute,
)

KV = 23_040.0  # bytes per token, SmolLM2-135M fp16: 30 layers x (K, V) x 3 kv heads x 64 x 2 B


def test_decode_holding_most_of_prompt_prefills_locally() -> None:
    est = disaggregation(
        prompt_tokens=2000,
        matched_on_decode=1900,
        decode_prefill_tokens_per_s=5000,
        prefill_tokens_per_s=10_000,
        transfer_bytes_per_s=1e9,
        kv_bytes_per_token=KV,
    )
    assert est.choice is PrefillPlace.LOCAL_ON_DECODE
    assert est.local_s == pytest.approx(100 / 5000)
    assert est.handoff_s == pytest.approx(2000 / 10_000 + 100 * KV / 1e9)


def test_cold_decode_worker_hands_off() -> None:
    est = disaggregation(2000, 0, 5000, 10_000, 1e9, KV)
    assert est.choice is PrefillPlace.PREFILL_AND_HANDOFF and est.handoff_s < est.local_s


def test_slow_link_and_overhead_tip_the_balance() -> None:
    fast = disaggregation(2000, 1000, 5000, 50_000, 1e10, KV, matched_on_prefill=1000)
    slow = disaggregation(2000, 1000, 5000, 50_000, 1e10, KV, 1000, handoff_overhead_s=1.0)
    assert fast.choice is PrefillPlace.PREFILL_AND_HANDOFF
    assert slow.choice is PrefillPlace.LOCAL_ON_DECODE


def test_pull_vs_recompute() -> None:
    fast_link = pull_or_recompute(1024, 5000, 10e9, KV)
    assert fast_link.choice is PrefixSource.PULL and fast_link.pull_s < fast_link.recompute_s
    slow_link = pull_or_recompute(1024, 5000, 1e6, KV)
    assert slow_link.choice is PrefixSource.RECOMPUTE
    nothing = pull_or_recompute(0, 5000, 1e9, KV, pull_overhead_s=0.1)
    assert nothing.choice is PrefixSource.RECOMPUTE and nothing.pull_s == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt_tokens=0),
        dict(matched_on_decode=3000),
        dict(decode_prefill_tokens_per_s=0.0),
        dict(transfer_bytes_per_s=float("inf")),
        dict(kv_bytes_per_token=-1.0),
        dict(handoff_overhead_s=-0.1),
    ],
)
def test_bad_input_is_a_clear_error(kwargs: dict) -> None:
    args = dict(
        prompt_tokens=2000,
        matched_on_decode=0,
        decode_prefill_tokens_per_s=1.0,
        prefill_tokens_per_s=1.0,
        transfer_bytes_per_s=1.0,
        kv_bytes_per_token=1.0,
    )
    args.update(kwargs)
    with pytest.raises(ValueError):
        disaggregation(**args)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pull_or_recompute(-1, 1.0, 1.0, 1.0)
