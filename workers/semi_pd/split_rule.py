"""Semi-PD's SLO-aware SM split (algorithms.md §5, Algorithm 1): pure logic, no clock, no torch.

Every window the worker reports the window's p_SLO TTFT and TPOT under the split (x, y) it
ran with, the arrival rate r and the mean prefill time per request. The rule refits

    TTFT(x) = a1 / (x - λ) + b1,   λ = 100 · r · l100   (M/M/1: a share of x% serves a
                                                          request in l_x = (100 / x) · l100)
    TPOT(y) = a2 / y + b2

by least squares over the windows it keeps (each window one point), and moves shares toward the
SLO that fails:

* TTFT fails, TPOT meets: x += step (or y -= step once x is 100), at least once, then on while
  the fit still misses the TTFT SLO, at most ``max_steps`` moves;
* TPOT fails, TTFT meets: the same for y (or x -= step once y is 100) against the TPOT SLO;
* both fail, or neither: keep (x, y).

Shares may overlap (x + y > 100; see sm_partition.py), so a lane's effective share, the one the
fits take, is its share scaled by 100 / max(100, x + y) — the paper's TTFT(x / (x + y)).
Deviation from the paper, on purpose: a failing window always moves at least one step, so a
load step raises x within one window even while the fit (built from calmer windows) still
says the old share suffices. With fewer than two distinct shares a fit takes its slope from the
model instead (a1 = 100 · l100; a2 = TPOT · y with b2 = 0, decode time inversely proportional
to the share).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvrelay.workers.semi_pd.sm_partition import Lane, Split


@dataclass(frozen=True, slots=True)
class SplitRuleConfig:
    ttft_slo_s: float
    tpot_slo_s: float
    step: int = 10  # percent per move
    max_steps: int = 3  # moves per decision
    min_share: int = 10  # no lane goes below this
    history: int = 8  # windows the fits use


@dataclass(frozen=True, slots=True)
class Window:
    """One window's measurements under ``split``."""

    split: Split
    ttft_s: float  # the window's p_SLO TTFT (0 when no request started)
    tpot_s: float  # the window's p_SLO time per output token (0 when nothing decoded)
    arrival_rate: float  # requests per second
    prefill_s: float  # mean prefill compute time of one request at the window's prefill share


@dataclass(frozen=True, slots=True)
class Fit:
    """latency(share) = a / (share - lam) + b, for effective shares in percent."""

    a: float
    b: float
    lam: float = 0.0

    def __call__(self, share: float) -> float:
        return self.a / (share - self.lam) + self.b if share > self.lam else math.inf


@dataclass(frozen=True, slots=True)
class Decision:
    split: Split
    reason: str
    ttft_fit: Fit | None = None
    tpot_fit: Fit | None = None


def effective(split: Split, lane: Lane) -> float:
    return split.share(lane) * 100 / max(100, split.prefill + split.decode)


def fit_inverse(points: Sequence[tuple[float, float]], lam: float, prior_a: float) -> Fit:
    """Least squares of ``y = a / (x - lam) + b`` over ``(x, y)`` points with x > lam; with
    fewer than two distinct x, ``a = prior_a`` and b fits the mean."""
    pts = [(1.0 / (x - lam), y) for x, y in points if x > lam]
    if not pts:
        return Fit(prior_a, 0.0, lam)
    us = [u for u, _ in pts]
    mu = sum(us) / len(us)
    my = sum(y for _, y in pts) / len(pts)
    suu = sum((u - mu) ** 2 for u in us)
    if len(set(us)) < 2 or suu <= 0.0:
        return Fit(prior_a, my - prior_a * mu, lam)
    a = sum((u - mu) * (y - my) for u, y in pts) / suu
    return Fit(a, my - a * mu, lam)


def step_once(split: Split, favour: Lane, config: SplitRuleConfig) -> Split | None:
    """One move toward ``favour``: raise its share, or, at 100, lower the other's; None when
    neither is possible."""
    x, y = split.prefill, split.decode
    if favour is Lane.PREFILL:
        if x < 100:
            return Split(min(100, x + config.step), y)
        return Split(x, y - config.step) if y - config.step >= config.min_share else None
    if y < 100:
        return Split(x, min(100, y + config.step))
    return Split(x - config.step, y) if x - config.step >= config.min_share else None


def _move(split: Split, favour: Lane, fit: Fit, slo: float, config: SplitRuleConfig) -> Split:
    for k in range(config.max_steps):
        if k > 0 and fit(effective(split, favour)) <= slo:
            break
        nxt = step_once(split, favour, config)
        if nxt is None:
            break
        split = nxt
    return split


def decide(config: SplitRuleConfig, windows: Sequence[Window]) -> Decision:
    """The split for the next window, from the windows so far (the last is the current)."""
    if not windows:
        raise ValueError("decide needs at least one window")
    recent = windows[-config.history :]
    now = recent[-1]
    ttft_fail = now.ttft_s > config.ttft_slo_s
    tpot_fail = now.tpot_s > config.tpot_slo_s
    if ttft_fail == tpot_fail:
        why = "both SLOs fail" if ttft_fail else "both SLOs met"
        return Decision(now.split, f"keep: {why}")
    if ttft_fail:
        x_eff = effective(now.split, Lane.PREFILL)
        l100 = now.prefill_s * x_eff / 100
        lam = 100 * now.arrival_rate * l100
        fit = fit_inverse(
            [(effective(w.split, Lane.PREFILL), w.ttft_s) for w in recent], lam, 100 * l100
        )
        new = _move(now.split, Lane.PREFILL, fit, config.ttft_slo_s, config)
        reason = f"TTFT {now.ttft_s:.3f} s > {config.ttft_slo_s:.3f} s"
        return Decision(new, reason, ttft_fit=fit)
    y_eff = effective(now.split, Lane.DECODE)
    fit = fit_inverse(
        [(effective(w.split, Lane.DECODE), w.tpot_s) for w in recent], 0.0, now.tpot_s * y_eff
    )
    new = _move(now.split, Lane.DECODE, fit, config.tpot_slo_s, config)
    reason = f"TPOT {now.tpot_s * 1e3:.1f} ms > {config.tpot_slo_s * 1e3:.1f} ms"
    return Decision(new, reason, tpot_fit=fit)
