"""Semi-PD's SLO-aware split rule (workers/semi_pd/split_rule.py) against brute force: the
least-squares fit against numpy's solver, each decision against an enumeration of the moves
in closed form, and the behaviour the paper's test names (a load step raises x within one
window; both SLOs met leaves the split alone)."""

from __future__ import annotations

import math
import random
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from kvrelay.workers.semi_pd.sm_partition import Lane, Split
from kvrelay.workers.semi_pd.split_rule import (
    Fit,
    SplitRuleConfig,
    Window,
    decide,
    effective,
    fit_inverse,
)


def test_fit_recovers_the_papers_curve() -> None:
    lam = 12.0
    true = Fit(0.6809, 0.022, lam)  # the paper's Llama3-8B TTFT fit
    fit = fit_inverse([(x, true(x)) for x in (30, 50, 70, 90)], lam, prior_a=1.0)
    assert fit.a == pytest.approx(0.6809, rel=1e-9) and fit.b == pytest.approx(0.022, abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_fit_matches_numpy_least_squares(seed: int) -> None:
    rng = random.Random(seed)
    lam = rng.uniform(0, 20)
    pts = [(rng.uniform(lam + 1, 100), rng.uniform(0.01, 2.0)) for _ in range(rng.randint(2, 8))]
    fit = fit_inverse(pts, lam, prior_a=1.0)
    design = np.array([[1 / (x - lam), 1.0] for x, _ in pts])
    (a, b), *_ = np.linalg.lstsq(design, np.array([y for _, y in pts]), rcond=None)
    assert fit.a == pytest.approx(a, rel=1e-6, abs=1e-9) and fit.b == pytest.approx(b, abs=1e-9)


def test_one_share_takes_the_model_slope() -> None:
    fit = fit_inverse([(50.0, 0.4), (50.0, 0.6)], 10.0, prior_a=3.0)
    assert fit.a == 3.0 and fit(50.0) == pytest.approx(0.5)
    assert fit(10.0) == math.inf  # at or below lambda the queue never drains


def brute_moves(split: Split, favour: Lane, k: int, cfg: SplitRuleConfig) -> Split | None:
    """The split after k moves toward ``favour``, in closed form; None if k moves don't fit."""
    mine, other = (
        split.share(favour),
        split.share(Lane.DECODE if favour is Lane.PREFILL else Lane.PREFILL),
    )
    to_full = math.ceil((100 - mine) / cfg.step)
    up = min(k, to_full)
    mine = min(100, mine + up * cfg.step)
    other -= (k - up) * cfg.step
    if other < cfg.min_share:
        return None
    return Split(mine, other) if favour is Lane.PREFILL else Split(other, mine)


def brute_decide(cfg: SplitRuleConfig, now: Window, fit: Fit, favour: Lane, slo: float) -> Split:
    best = now.split
    for k in range(1, cfg.max_steps + 1):
        cand = brute_moves(now.split, favour, k, cfg)
        if cand is None:
            break
        best = cand
        if fit(effective(cand, favour)) <= slo:
            break
    return best


@pytest.mark.parametrize("seed", range(200))
def test_decisions_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    cfg = SplitRuleConfig(
        ttft_slo_s=rng.uniform(0.2, 2.0),
        tpot_slo_s=rng.uniform(0.02, 0.2),
        step=rng.choice([5, 10, 20]),
        max_steps=rng.randint(1, 5),
        min_share=10,
    )
    shares = list(range(20, 101, 10))
    windows = [
        Window(
            Split(rng.choice(shares), rng.choice(shares)),
            ttft_s=rng.uniform(0.0, 3.0),
            tpot_s=rng.uniform(0.0, 0.3),
            arrival_rate=rng.uniform(0.0, 2.0),
            prefill_s=rng.uniform(0.001, 0.05),
        )
        for _ in range(rng.randint(1, 6))
    ]
    now = windows[-1]
    got = decide(cfg, windows)
    ttft_fail, tpot_fail = now.ttft_s > cfg.ttft_slo_s, now.tpot_s > cfg.tpot_slo_s
    if ttft_fail == tpot_fail:
        assert got.split == now.split and got.reason.startswith("keep")
        return
    favour, slo, fit = (
        (Lane.PREFILL, cfg.ttft_slo_s, got.ttft_fit)
        if ttft_fail
        else (Lane.DECODE, cfg.tpot_slo_s, got.tpot_fit)
    )
    assert fit is not None
    assert got.split == brute_decide(cfg, now, fit, favour, slo)
    if got.split != now.split:  # it moved toward the failing lane, never away from it
        assert effective(got.split, favour) > effective(now.split, favour)


def test_load_step_raises_prefill_share_within_one_window() -> None:
    cfg = SplitRuleConfig(ttft_slo_s=1.0, tpot_slo_s=0.05)
    calm = [Window(Split(50, 50), 0.4, 0.03, 1.0, 0.01) for _ in range(4)]
    for k in range(1, len(calm) + 1):  # both met: nothing changes
        assert decide(cfg, calm[:k]).split == Split(50, 50)
    burst = Window(Split(50, 50), 3.0, 0.03, 8.0, 0.01)  # arrivals x8: TTFT misses
    after = decide(cfg, [*calm, burst]).split
    assert after.prefill > 50 and after.decode == 50
    # decode misses instead: y rises; at 100 the other share gives way
    slow = Window(Split(50, 100), 0.4, 0.2, 1.0, 0.01)
    # the fit (TPOT ~ 1/y) says no reachable share meets 50 ms: it moves max_steps times
    assert decide(cfg, [slow]).split == Split(50 - 3 * cfg.step, 100)
    assert decide(cfg, [Window(Split(50, 60), 0.4, 0.2, 1.0, 0.01)]).split.decode > 60


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_tuner_closes_windows_and_logs_changes() -> None:
    from kvrelay.workers.semi_pd.tuner import SplitTuner, percentile

    clock = Clock()
    tuner = SplitTuner(SplitRuleConfig(ttft_slo_s=1.0, tpot_slo_s=0.05), window_s=5.0, clock=clock)
    split = Split(50, 50)

    def window(ttft: float, gap: float) -> object:
        """Two requests arrive, wait ``ttft`` for their first token, then decode 3 steps
        ``gap`` apart; every tick inside the 5 s window gives nothing, the first past it closes
        the window."""
        start = clock.t
        for rid in ("a", "b"):
            tuner.on_submit(rid, 100)
        clock.t += ttft
        for rid in ("a", "b"):
            tuner.on_first_token(rid)
        assert tuner.tick(split, prefill_tokens_per_s=1000.0) is None
        for step in range(3):
            clock.t += gap
            for rid in ("a", "b"):
                tuner.on_token(rid, finished=step == 2)
            assert tuner.tick(split, prefill_tokens_per_s=1000.0) is None
        clock.t = start + 4.999
        assert tuner.tick(split, prefill_tokens_per_s=1000.0) is None
        clock.t = start + 5.0
        decision = tuner.tick(split, prefill_tokens_per_s=1000.0)
        assert decision is not None
        return decision

    calm = window(0.5, 0.02)
    assert calm.split == split and tuner.changes == []  # type: ignore[attr-defined]
    w = tuner.windows[-1]
    assert (w.ttft_s, w.tpot_s, w.prefill_s) == (0.5, pytest.approx(0.02), 0.1)
    assert w.arrival_rate == pytest.approx(2 / 5.0) and tuner.windows_closed == 1
    burst = window(3.0, 0.02)  # TTFT misses: x rises, and the change is logged
    assert burst.split.prefill > 50  # type: ignore[attr-defined]
    (change,) = tuner.changes
    assert change.at_s == 10.0 and tuner.windows_closed == 2
    assert change.old == split and change.new == burst.split and change.reason.startswith("TTFT")
    assert percentile([], 0.9) == 0.0 and percentile([3.0, 1.0, 2.0], 0.5) == 2.0


class FakeGreenContext:
    """Stands in for torch's: records the contexts made and the order they were pushed."""

    made: list[FakeGreenContext] = []
    pushed: list[FakeGreenContext] = []

    def __init__(self, num_sms: int) -> None:
        self.num_sms = num_sms

    @classmethod
    def create(cls, *, num_sms: int, device_id: int) -> FakeGreenContext:
        cls.made.append(cls(num_sms))
        return cls.made[-1]

    def set_context(self) -> None:
        FakeGreenContext.pushed.append(self)

    def pop_context(self) -> None:
        pass


def test_each_lane_has_its_own_context_at_equal_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two lanes at one share must not push one context: torch makes a green context's default
    stream current, so they would run in one stream's issue order."""
    import torch.cuda.green_contexts

    from kvrelay.workers.semi_pd.sm_partition import GreenContextPartition

    FakeGreenContext.made, FakeGreenContext.pushed = [], []
    monkeypatch.setattr(torch.cuda.green_contexts, "GreenContext", FakeGreenContext)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(multi_processor_count=132)
    )
    part = GreenContextPartition(0, [50, 100], Split(100, 100))
    assert sorted(c.num_sms for c in FakeGreenContext.made) == [66, 66, 132, 132]
    for lane in Lane:  # each lane enters on its own thread, as the loops do
        t = threading.Thread(target=part.enter, args=(lane, 100))
        t.start()
        t.join()
    prefill, decode = FakeGreenContext.pushed
    assert prefill is not decode and prefill.num_sms == decode.num_sms == 132
    with pytest.raises(ValueError, match="no green context for a 30% share"):
        part.enter(Lane.DECODE, 30)
