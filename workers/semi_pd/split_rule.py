"""Semi-PD's SLO-aware SM split (algorithms.md §5, Algorithm 1): pure logic, no clock, no torch.

Every window the worker reports the window's p_SLO TTFT and TPOT under the split (x, y) it
ran with, the arrival rate r and the mean prefill time per request. The rule refits

    TTFT(x) = a1 / (x - λ) + b1,   λ = 100 · r · l100   (M/M/1: a share of x% serves a
                                                          request in l_x = (100 / x) · l100)
    TPOT(y) = a2 / y + b2

by least squares over the windows it keeps (each window one point; a window with nothing
measured, latency 0, is no point), and decides on the SLO margin the measurements and the fits
give (Algorithm 1 acts only on a failed SLO; see the first point):

* a lane is *hot* when its window latency passes ``margin`` × its SLO (not only once it fails:
  a p99 that reaches the SLO inside a 1 s window has already failed requests);
* TTFT hot, TPOT not: x += step (or y -= step once x is 100), at least once, then on while the
  TTFT fit still predicts more than ``margin`` × SLO, at most ``max_steps`` moves; the same for
  y against TPOT. Every move is taken only while the *other* lane's fit predicts it stays
  within its margin (within its SLO when it is hot already): the share a lane gives away is
  bounded by the fit of what it needs;
* both hot: move toward the one that fails if only one fails; else keep (x, y);
* neither hot: one step back toward ``home`` (the split the worker started with) while both fits
  predict the step keeps both lanes within their margins, so a split moved for a burst returns
  once the burst is over (one step a window: hysteresis against the next burst).

The TTFT fit gives each window its own λ (the window's arrival rate and prefill time), so a
window of a burst and a calm one are points of one curve, and the prediction is for the current
window's λ. A fit gives the slope (how latency changes with the share; the model's where the
history has no falling one) and goes through the current window's measurement: a burst's
backlog is no steady state, and a fit levelled on it kept predicting a missed TTFT seconds
after the queue had drained (CPU dry run of benchmarks/semipd_step.py). Shares may overlap
(x + y > 100; see sm_partition.py), so a lane's effective share, the one the fits take, is its
share scaled by 100 / max(100, x + y) — the paper's TTFT(x / (x + y)). Deviation from the
paper, on purpose: a hot window always moves at least one step (guard permitting), so a load
step moves the split within one window even while the fit (built from calmer windows) still
says the old share suffices. With fewer than two distinct shares, or a fitted slope <= 0, the
slope is the model's (a1 = 100 · l100; a2 = TPOT · y: decode time inversely proportional to
the share).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvrelay.workers.semi_pd.sm_partition import Lane, Split

FULL = Split(100, 100)


@dataclass(frozen=True, slots=True)
class SplitRuleConfig:
    ttft_slo_s: float
    tpot_slo_s: float
    step: int = 10  # percent per move
    max_steps: int = 3  # moves per decision
    min_share: int = 10  # no lane goes below this
    history: int = 8  # windows the fits use
    margin: float = 0.8  # a lane is hot past margin x its SLO; fits aim below that
    home: Split = FULL  # where the split returns once neither lane is hot


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
    ttft_fit: Fit
    tpot_fit: Fit

    def predicted(self, split: Split) -> tuple[float, float]:
        """The fits' TTFT and TPOT (s) at ``split``."""
        return (
            self.ttft_fit(effective(split, Lane.PREFILL)),
            self.tpot_fit(effective(split, Lane.DECODE)),
        )


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


def step_home(split: Split, home: Split, step: int) -> Split:
    """One move toward ``home``: the first lane below its home share rises, else the first
    above it falls (by ``step``, never past home)."""
    x, y = split.prefill, split.decode
    if x < home.prefill:
        return Split(min(home.prefill, x + step), y)
    if y < home.decode:
        return Split(x, min(home.decode, y + step))
    if x > home.prefill:
        return Split(max(home.prefill, x - step), y)
    return Split(x, max(home.decode, y - step))


def other(lane: Lane) -> Lane:
    return Lane.DECODE if lane is Lane.PREFILL else Lane.PREFILL


def window_lambda(w: Window) -> float:
    """The window's λ in percent of the SMs: 100 · r · l100, l100 = prefill_s · x_eff / 100."""
    return w.arrival_rate * w.prefill_s * effective(w.split, Lane.PREFILL)


def anchored(fit: Fit, prior_a: float, x_now: float, y_now: float) -> Fit:
    """``fit``'s slope (the model's ``prior_a`` where the history gives none that falls with the
    share: a <= 0 is noise, not physics), through the current window's point: the history
    says how latency changes with the share, the current window where it stands now (a burst's
    backlog makes old levels stale). Nothing measured now (0): nothing to protect, 0."""
    if y_now <= 0:
        return Fit(0.0, 0.0, fit.lam)
    a = fit.a if fit.a > 0 else prior_a
    if x_now <= fit.lam:  # overloaded now: no finite point to go through
        return Fit(a, 0.0, fit.lam)
    return Fit(a, y_now - a / (x_now - fit.lam), fit.lam)


def fits(windows: Sequence[Window]) -> dict[Lane, Fit]:
    """The TTFT and TPOT fits over ``windows`` (the last is the current; windows that measured
    nothing, latency 0, are no points), anchored at the current window."""
    now = windows[-1]
    lam = window_lambda(now)
    x_eff, y_eff = effective(now.split, Lane.PREFILL), effective(now.split, Lane.DECODE)
    prior_ttft = now.prefill_s * x_eff  # 100 · l100
    # each window's point at its own λ: u = 1 / (x_i - λ_i), written as a share at today's λ
    ttft = fit_inverse(
        [
            (effective(w.split, Lane.PREFILL) - window_lambda(w) + lam, w.ttft_s)
            for w in windows
            if w.ttft_s > 0
        ],
        lam,
        prior_ttft,
    )
    prior_tpot = now.tpot_s * y_eff
    tpot = fit_inverse(
        [(effective(w.split, Lane.DECODE), w.tpot_s) for w in windows if w.tpot_s > 0],
        0.0,
        prior_tpot,
    )
    return {
        Lane.PREFILL: anchored(ttft, prior_ttft, x_eff, now.ttft_s),
        Lane.DECODE: anchored(tpot, prior_tpot, y_eff, now.tpot_s),
    }


def _move(
    split: Split,
    favour: Lane,
    fit: dict[Lane, Fit],
    slo: dict[Lane, float],
    other_limit: float,
    config: SplitRuleConfig,
) -> Split:
    target = config.margin * slo[favour]
    for k in range(config.max_steps):
        if k > 0 and fit[favour](effective(split, favour)) <= target:
            break
        nxt = step_once(split, favour, config)
        if nxt is None or fit[other(favour)](effective(nxt, other(favour))) > other_limit:
            break
        split = nxt
    return split


NAMES = {Lane.PREFILL: "TTFT", Lane.DECODE: "TPOT"}


def decide(config: SplitRuleConfig, windows: Sequence[Window]) -> Decision:
    """The split for the next window, from the windows so far (the last is the current)."""
    if not windows:
        raise ValueError("decide needs at least one window")
    recent = windows[-config.history :]
    now = recent[-1]
    fit = fits(recent)
    slo = {Lane.PREFILL: config.ttft_slo_s, Lane.DECODE: config.tpot_slo_s}
    measured = {Lane.PREFILL: now.ttft_s, Lane.DECODE: now.tpot_s}
    hot = {lane: measured[lane] > config.margin * slo[lane] for lane in Lane}
    fails = {lane: measured[lane] > slo[lane] for lane in Lane}

    def decision(split: Split, reason: str) -> Decision:
        return Decision(split, reason, ttft_fit=fit[Lane.PREFILL], tpot_fit=fit[Lane.DECODE])

    def state(lane: Lane) -> str:
        word = "fails" if fails[lane] else "near" if hot[lane] else "ok"
        return f"{NAMES[lane]} {measured[lane]:.4f} s {word} (SLO {slo[lane]:g} s)"

    if hot[Lane.PREFILL] and hot[Lane.DECODE] and fails[Lane.PREFILL] == fails[Lane.DECODE]:
        why = "both SLOs fail" if fails[Lane.PREFILL] else "both SLOs near"
        return decision(now.split, f"keep: {why}")
    if hot[Lane.PREFILL] or hot[Lane.DECODE]:
        if hot[Lane.PREFILL] and hot[Lane.DECODE]:
            favour = Lane.PREFILL if fails[Lane.PREFILL] else Lane.DECODE
        else:
            favour = Lane.PREFILL if hot[Lane.PREFILL] else Lane.DECODE
        give = other(favour)
        limit = slo[give] if hot[give] else config.margin * slo[give]
        new = _move(now.split, favour, fit, slo, limit, config)
        if new == now.split:
            return decision(
                now.split,
                f"keep: {state(favour)}; no step keeps {NAMES[give]}'s fit within "
                f"{limit:g} s and its share >= {config.min_share}",
            )
        return decision(new, state(favour))
    if now.split == config.home:
        return decision(now.split, "keep: both SLOs clear")
    nxt = step_home(now.split, config.home, config.step)
    for lane in Lane:
        if fit[lane](effective(nxt, lane)) > config.margin * slo[lane]:
            return decision(
                now.split,
                f"keep: {state(Lane.PREFILL)}, {state(Lane.DECODE)}; "
                f"{NAMES[lane]} predicted past its margin at {nxt.prefill}/{nxt.decode}",
            )
    return decision(
        nxt,
        f"relax toward {config.home.prefill}/{config.home.decode}: "
        f"{state(Lane.PREFILL)}, {state(Lane.DECODE)}",
    )
