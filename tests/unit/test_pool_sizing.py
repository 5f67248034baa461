"""SLO-aware pool sizing: brute force, M/D/1 against a discrete-event simulation, load steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrelay.cluster.sizing.pool_sizing import (
    DecodeProfile,
    SizingInput,
    decode_itl,
    md1_ttft,
    md1_ttft_attainment,
    predict_split,
    size_pools,
)


def base(**kw) -> SizingInput:
    args = dict(
        ttft_slo_s=1.0,
        itl_slo_s=0.05,
        arrival_rate=8.0,
        mean_prompt_tokens=512,
        mean_output_tokens=128,
        prefill_tps=8000.0,
        decode=DecodeProfile(0.02, 0.0004),
        total_workers=8,
    )
    args.update(kw)
    return SizingInput(**args)


def simulate_md1(rate: float, service: float, n: int = 200_000, seed: int = 1) -> np.ndarray:
    """Times to first token in a FIFO single-server queue, Poisson arrivals, fixed service."""
    gaps = np.random.default_rng(seed).exponential(1 / rate, n)
    wait = np.empty(n)
    w = 0.0
    for i in range(n):  # Lindley: W_{i+1} = max(0, W_i + D - A_{i+1})
        wait[i] = w
        w = max(0.0, w + service - gaps[i])
    return wait[n // 10 :] + service  # drop the warm-up


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.8])
def test_md1_formula_matches_simulation(rho: float) -> None:
    service = 0.064
    sim = simulate_md1(rho / service, service)
    assert abs(md1_ttft(rho / service, service) - sim.mean()) / sim.mean() < 0.05
    for slack in (0.5, 2.0, 6.0, 19.0, 25.0):
        slo = (1 + slack) * service
        got = md1_ttft_attainment(rho / service, service, slo)
        assert abs(got - (sim <= slo).mean()) < 0.02, slack


def test_decode_model_is_consistent_with_littles_law() -> None:
    inp = base()
    rate = 5.0
    itl = decode_itl(rate, inp)
    batch = rate * inp.mean_output_tokens * itl  # Little
    assert itl == pytest.approx(inp.decode.a_s + inp.decode.b_s * batch)
    assert decode_itl(1 / (inp.mean_output_tokens * inp.decode.b_s), inp) == math.inf


def test_profile_fit_recovers_the_line() -> None:
    batches = [1, 2, 4, 8, 16, 32]
    steps = [0.02 + 0.0004 * b + 1e-5 * (-1) ** b for b in batches]
    p = DecodeProfile.fit(batches, steps)
    assert p.a_s == pytest.approx(0.02, abs=5e-5) and p.b_s == pytest.approx(0.0004, rel=0.05)
    with pytest.raises(ValueError, match="two or more"):
        DecodeProfile.fit([4, 4], [0.1, 0.1])


def _key(p, target):
    return (
        p.attainment >= target,
        p.goodput_rps if p.attainment >= target else p.attainment,
        p.goodput_rps,
    )


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(2, 24),
    rate=st.floats(0.0, 60.0),
    prompt=st.floats(16, 4096),
    out=st.floats(1, 1024),
    tps=st.floats(500, 50_000),
    a=st.floats(0.002, 0.08),
    b=st.floats(0.0, 0.002),
    ttft=st.floats(0.05, 5),
    itl=st.floats(0.01, 0.2),
    max_batch=st.integers(1, 512),
)
def test_choice_matches_brute_force(n, rate, prompt, out, tps, a, b, ttft, itl, max_batch) -> None:
    inp = SizingInput(ttft, itl, rate, prompt, out, tps, DecodeProfile(a, b), n, max_batch)
    got = size_pools(inp)
    assert got.prefill_workers + got.decode_workers == n
    best = max((predict_split(inp, k) for k in range(1, n)), key=lambda p: _key(p, inp.target))
    kg, kb = _key(got, inp.target), _key(best, inp.target)
    assert kg[0] == kb[0]
    assert kg[1:] == pytest.approx(kb[1:], rel=1e-9, abs=1e-12)


def test_load_step_towards_prefill_shifts_workers_to_prefill() -> None:
    short = size_pools(base(mean_prompt_tokens=256))
    long_ = size_pools(base(mean_prompt_tokens=2048))
    assert long_.prefill_workers > short.prefill_workers
    more_out = size_pools(base(mean_prompt_tokens=256, mean_output_tokens=512))
    assert more_out.decode_workers > short.decode_workers
    for p in (short, long_, more_out):
        assert p.attainment >= 0.9 and p.ttft_s <= 1.0 and p.itl_s <= 0.05


def test_overload_reports_what_it_can() -> None:
    p = size_pools(base(arrival_rate=500.0))
    assert p.attainment < 0.9 and p.goodput_rps < 500.0
    assert p.prefill_workers + p.decode_workers == 8


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 workers"):
        base(total_workers=1)
    with pytest.raises(ValueError):
        base(ttft_slo_s=0)
    with pytest.raises(ValueError):
        predict_split(base(), 8)
