"""Semi-PD's SLO-aware split rule (workers/semi_pd/split_rule.py) against brute force: the
least-squares fit against numpy's solver, each decision against an enumeration of the moves
in closed form, and the behaviour the paper's test names (a load step raises x within one
window; both SLOs met leaves the split alone)."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest

from kvrelay.workers.semi_pd.sm_partition import Lane, Split
from kvrelay.workers.semi_pd.split_rule import (
    FULL,
    Fit,
    SplitRuleConfig,
    Window,
    decide,
    effective,
    fit_inverse,
    fits,
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


def lam_of(w: Window) -> float:
    return w.arrival_rate * w.prefill_s * effective(w.split, Lane.PREFILL)


def numpy_fit(pts: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares of y = a u + b over (u, y); None with fewer than two distinct u."""
    if len({u for u, _ in pts}) < 2:
        return None
    design = np.array([[u, 1.0] for u, _ in pts])
    (a, b), *_ = np.linalg.lstsq(design, np.array([y for _, y in pts]), rcond=None)
    return float(a), float(b)


@pytest.mark.parametrize("seed", range(50))
def test_fits_give_each_window_its_own_lambda(seed: int) -> None:
    rng = random.Random(seed)
    shares = list(range(20, 101, 10))
    windows = [
        Window(
            Split(rng.choice(shares), rng.choice(shares)),
            ttft_s=rng.choice([0.0, rng.uniform(0.01, 3.0)]),
            tpot_s=rng.choice([0.0, rng.uniform(0.001, 0.3)]),
            arrival_rate=rng.uniform(0.0, 2.0),
            prefill_s=rng.uniform(0.001, 0.05),
        )
        for _ in range(rng.randint(2, 8))
    ]
    f = fits(windows)
    lam = lam_of(windows[-1])
    ttft_pts = [
        (1 / (effective(w.split, Lane.PREFILL) - lam_of(w)), w.ttft_s)
        for w in windows
        if w.ttft_s > 0 and effective(w.split, Lane.PREFILL) > lam_of(w)
    ]
    tpot_pts = [(1 / effective(w.split, Lane.DECODE), w.tpot_s) for w in windows if w.tpot_s > 0]
    now = windows[-1]
    x_now, y_now = effective(now.split, Lane.PREFILL), effective(now.split, Lane.DECODE)
    for lane, pts, prior, share, measured, lane_lam in (
        (Lane.PREFILL, ttft_pts, now.prefill_s * x_now, x_now, now.ttft_s, lam),
        (Lane.DECODE, tpot_pts, now.tpot_s * y_now, y_now, now.tpot_s, 0.0),
    ):
        fit = f[lane]
        if measured == 0:  # nothing measured now: nothing to protect
            assert (fit.a, fit.b) == (0.0, 0.0)
            continue
        want = numpy_fit(pts)
        slope = want[0] if want is not None and want[0] > 0 else prior
        assert fit.a == pytest.approx(slope, rel=1e-6, abs=1e-9)
        if share > lane_lam:  # through the current window's point
            assert fit(share) == pytest.approx(measured, rel=1e-9, abs=1e-12)
        assert fit.lam == pytest.approx(lane_lam)


def brute_decide(cfg: SplitRuleConfig, now: Window, fit: dict[Lane, Fit]) -> Split:
    """The rule written out case by case, with the moves in closed form."""
    slo = {Lane.PREFILL: cfg.ttft_slo_s, Lane.DECODE: cfg.tpot_slo_s}
    got = {Lane.PREFILL: now.ttft_s, Lane.DECODE: now.tpot_s}
    hot = {k: got[k] > cfg.margin * slo[k] for k in Lane}
    fails = {k: got[k] > slo[k] for k in Lane}
    if not any(hot.values()):
        if now.split == cfg.home:
            return now.split
        x, y, hx, hy = now.split.prefill, now.split.decode, cfg.home.prefill, cfg.home.decode
        if x < hx:  # a lane below home rises before one above it falls
            nxt = Split(min(hx, x + cfg.step), y)
        elif y < hy:
            nxt = Split(x, min(hy, y + cfg.step))
        elif x > hx:
            nxt = Split(max(hx, x - cfg.step), y)
        else:
            nxt = Split(x, max(hy, y - cfg.step))
        ok = all(fit[k](effective(nxt, k)) <= cfg.margin * slo[k] for k in Lane)
        return nxt if ok else now.split
    if all(hot.values()):
        if fails[Lane.PREFILL] == fails[Lane.DECODE]:
            return now.split
        favour = Lane.PREFILL if fails[Lane.PREFILL] else Lane.DECODE
    else:
        favour = Lane.PREFILL if hot[Lane.PREFILL] else Lane.DECODE
    give = Lane.DECODE if favour is Lane.PREFILL else Lane.PREFILL
    limit = slo[give] if hot[give] else cfg.margin * slo[give]
    best = now.split
    for k in range(1, cfg.max_steps + 1):
        cand = brute_moves(now.split, favour, k, cfg)
        if cand is None or fit[give](effective(cand, give)) > limit:
            break
        best = cand
        if fit[favour](effective(cand, favour)) <= cfg.margin * slo[favour]:
            break
    return best


@pytest.mark.parametrize("seed", range(300))
def test_decisions_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    shares = list(range(20, 101, 10))
    cfg = SplitRuleConfig(
        ttft_slo_s=rng.uniform(0.2, 2.0),
        tpot_slo_s=rng.uniform(0.02, 0.2),
        step=rng.choice([5, 10, 20]),
        max_steps=rng.randint(1, 5),
        min_share=10,
        margin=rng.choice([0.5, 0.8, 1.0]),
        home=Split(rng.choice(shares), rng.choice(shares)),
    )
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
    got = decide(cfg, windows)
    fit = fits(windows)
    assert (got.ttft_fit, got.tpot_fit) == (fit[Lane.PREFILL], fit[Lane.DECODE])
    assert got.split == brute_decide(cfg, windows[-1], fit), got.reason
    assert got.reason.startswith("keep") == (got.split == windows[-1].split)


def test_load_step_moves_the_split_within_one_window_and_back() -> None:
    """Steady decode streams, then a burst of long prompts: TTFT fails in the burst's first
    window and the split moves then (x is 100: the decode share gives way, as far as the TPOT
    fit says decode stays within its margin); once the burst is over, it walks back to 100/100
    one step a window."""
    cfg = SplitRuleConfig(ttft_slo_s=1.0, tpot_slo_s=0.05)
    steady = Window(FULL, ttft_s=0.15, tpot_s=0.012, arrival_rate=2.0, prefill_s=0.01)
    windows = [steady] * 3
    for k in range(1, 4):
        assert decide(cfg, windows[:k]).split == FULL  # both clear: nothing moves
    burst = replace(steady, ttft_s=2.5, arrival_rate=10.0, prefill_s=0.15)  # 6k-token prompts
    first = decide(cfg, [*windows, burst])
    assert first.split.prefill == 100 and first.split.decode < 100, first.reason
    assert first.reason.startswith("TTFT 2.5000 s fails")
    # the decode share given away is what the TPOT fit allows inside 0.8 x 50 ms
    assert first.tpot_fit(effective(first.split, Lane.DECODE)) <= 0.8 * 0.05
    windows = [*windows, burst]
    split = first.split
    for _ in range(2):  # the burst goes on: the rule keeps the decode lane inside its margin
        now = replace(burst, split=split, tpot_s=0.012 * 50 / effective(split, Lane.DECODE))
        windows.append(now)
        split = decide(cfg, windows).split
        assert now.tpot_s <= 0.8 * 0.05
    low = split
    back = [low]
    for _ in range(12):  # calm again
        windows.append(replace(steady, split=back[-1]))
        back.append(decide(cfg, windows).split)
    assert back[-1] == FULL
    steps = [b.decode - a.decode for a, b in pairwise(back) if a != b]
    assert steps and all(0 < s <= cfg.step for s in steps)  # one step a window, upward


def test_decode_itl_near_its_slo_caps_the_prefill_share() -> None:
    """ITL p99 past 0.8 x SLO with TTFT clear: the prefill share falls (y is already 100), no
    further than the TTFT fit allows; a TTFT that is near too (both near) keeps the split."""
    cfg = SplitRuleConfig(ttft_slo_s=1.0, tpot_slo_s=0.05)
    hot = Window(FULL, ttft_s=0.3, tpot_s=0.045, arrival_rate=4.0, prefill_s=0.05)
    d = decide(cfg, [hot])
    assert d.split.decode == 100 and d.split.prefill < 100 and d.reason.startswith("TPOT")
    assert d.ttft_fit(effective(d.split, Lane.PREFILL)) <= 0.8
    both = replace(hot, ttft_s=0.9)
    assert decide(cfg, [both]).split == FULL
    assert decide(cfg, [both]).reason == "keep: both SLOs near"
    # TTFT fails, ITL only near: TTFT's side wins, ITL may rise to its SLO, not past it
    fail = replace(hot, ttft_s=1.5, tpot_s=0.042)
    d = decide(cfg, [fail])
    assert d.split.decode < 100 and d.tpot_fit(effective(d.split, Lane.DECODE)) <= 0.05


def test_idle_windows_return_home() -> None:
    """Windows that measured nothing (0) are no fit points and count as clear."""
    cfg = SplitRuleConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, home=Split(90, 100))
    idle = Window(Split(60, 100), 0.0, 0.0, 0.0, 0.0)
    d = decide(cfg, [idle])
    assert d.split == Split(70, 100) and d.reason.startswith("relax toward 90/100")
    assert decide(cfg, [replace(idle, split=Split(90, 100))]).reason == "keep: both SLOs clear"
    assert decide(cfg, [replace(idle, split=Split(100, 100))]).split == Split(90, 100)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_tuner_closes_windows_and_logs_changes() -> None:
    from kvrelay.workers.semi_pd.tuner import SplitTuner, percentile

    clock = Clock()
    split = Split(50, 50)
    cfg = SplitRuleConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, home=split)
    tuner = SplitTuner(cfg, window_s=5.0, clock=clock)

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
    assert [e.decision.split for e in tuner.log] == [split, burst.split]  # every window logged
    assert [e.samples for e in tuner.log] == [(2, 6), (2, 6)] and tuner.log[-1].at_s == 10.0
    assert percentile([], 0.9) == 0.0 and percentile([3.0, 1.0, 2.0], 0.5) == 2.0


def test_tuner_counts_a_waiting_request_in_its_window() -> None:
    """A prompt that has not had its first token when the window closes counts with its wait so
    far: a step whose prefills outlast the window shows in that window."""
    from kvrelay.workers.semi_pd.tuner import SplitTuner

    clock = Clock()
    cfg = SplitRuleConfig(ttft_slo_s=1.0, tpot_slo_s=0.05)
    tuner = SplitTuner(cfg, window_s=1.0, clock=clock)
    tuner.on_submit("long", 8000)
    tuner.on_submit("short", 10)
    clock.t = 0.1
    tuner.on_first_token("short", finished=True)  # done at its first token: no ITL to follow
    clock.t = 1.0
    d = tuner.tick(FULL, prefill_tokens_per_s=1000.0)
    assert d is not None and tuner.windows[-1].ttft_s == 1.0 and tuner.log[-1].samples == (2, 0)
    assert d.split != FULL and d.reason.startswith("TTFT 1.0000 s near")
    clock.t = 1.5
    tuner.on_first_token("long")
    clock.t = 2.0
    tuner.tick(d.split, prefill_tokens_per_s=1000.0)
    assert tuner.windows[-1].ttft_s == 1.5 and tuner.log[-1].samples == (1, 0)
    tuner.on_token("long", finished=True)
    clock.t = 3.0
    tuner.tick(d.split, prefill_tokens_per_s=1000.0)
    assert tuner.log[-1].samples == (0, 1)  # "short" left no decode gap behind


