"""SLO-aware pool sizing: how many of N workers should prefill and how many decode.

Models (pure; measured figures in, a split out):

* **Prefill** (DistServe): each of n_p prefill workers is an M/D/1 queue with λ/n_p arrivals and
  service D = mean_prompt / prefill_tps, so ``TTFT = D + λD²/(2(1−λD))``. P(TTFT <= SLO) uses
  Erlang's exact M/D/1 wait distribution, or for a slack over 20 service times the
  heavy-traffic tail P(W > t) ≈ ρ·exp(−2(1−ρ)t/D).
* **Decode**: a step takes ``a + b·batch`` seconds. By Little's law the batch on a worker with
  λ_d = λ/n_d arrivals is B = λ_d·out·(a + b·B), so ``ITL = a / (1 − λ_d·out·b)`` (unstable when
  λ_d·out·b ≥ 1, or when B passes ``max_batch``). ITL is taken as deterministic: met or not.
* **Attainment** = P(TTFT ≤ SLO) · [ITL ≤ SLO]; **goodput** = the highest λ at which attainment
  ≥ ``target`` (0.9). Both pools scale linearly in workers, so goodput(n_p) =
  min(n_p·g_p, (N−n_p)·g_d), which peaks where the two cross.

Choice: among splits that meet the target at the measured load, the one with the most goodput
(headroom for bursts); when none does, the one with the highest attainment now. The search is
O(1) splits plus one bisection; ``predict_split`` is exposed so tests can enumerate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TARGET = 0.9  # DistServe: >= 90% of requests meet both SLOs
EXACT_UP_TO = 20  # SLO slack, in service times, up to which the exact M/D/1 CDF is summed


@dataclass(frozen=True, slots=True)
class DecodeProfile:
    """Decode step seconds = a_s + b_s · batch."""

    a_s: float
    b_s: float

    @classmethod
    def fit(cls, batches: Sequence[float], step_s: Sequence[float]) -> DecodeProfile:
        """Least-squares line through measured (batch, step time) points."""
        if len(batches) != len(step_s) or len(set(batches)) < 2:
            raise ValueError("need step times at two or more distinct batch sizes")
        b, a = np.polyfit(np.asarray(batches, float), np.asarray(step_s, float), 1)
        return cls(max(float(a), 1e-9), max(float(b), 0.0))


@dataclass(frozen=True, slots=True)
class SizingInput:
    ttft_slo_s: float
    itl_slo_s: float
    arrival_rate: float  # requests/s
    mean_prompt_tokens: float
    mean_output_tokens: float
    prefill_tps: float  # one worker's measured prefill tokens/s
    decode: DecodeProfile
    total_workers: int
    max_batch: int = 256  # KV memory bound on a decode worker's batch
    target: float = TARGET

    def __post_init__(self) -> None:
        if self.total_workers < 2:
            raise ValueError("pool sizing needs at least 2 workers (one per pool)")
        positive = (self.ttft_slo_s, self.itl_slo_s, self.prefill_tps, self.mean_prompt_tokens)
        if min(positive) <= 0 or self.mean_output_tokens < 1 or self.max_batch < 1:
            raise ValueError("SLOs, prefill tps and mean prompt must be > 0, mean output >= 1")
        if self.arrival_rate < 0 or not 0 < self.target < 1:
            raise ValueError("arrival rate must be >= 0 and the target in (0, 1)")

    @property
    def prefill_service_s(self) -> float:
        return self.mean_prompt_tokens / self.prefill_tps


@dataclass(frozen=True, slots=True)
class SplitPrediction:
    prefill_workers: int
    decode_workers: int
    ttft_s: float  # mean; inf when the prefill queue is unstable
    itl_s: float  # inf when the decode pool is unstable
    attainment: float  # predicted fraction meeting both SLOs at the measured rate
    goodput_rps: float  # highest rate with attainment >= target


def md1_ttft(rate: float, service_s: float) -> float:
    """DistServe's M/D/1 mean time to first token (queueing + service)."""
    rho = rate * service_s
    if rho >= 1:
        return math.inf
    return service_s + rate * service_s**2 / (2 * (1 - rho))


def md1_ttft_attainment(rate: float, service_s: float, slo_s: float) -> float:
    """P(TTFT <= SLO) in an M/D/1 queue: P(W <= SLO − D)."""
    rho = rate * service_s
    if slo_s < service_s or rho >= 1:
        return 0.0
    x = slo_s - service_s
    if rate == 0.0:
        return 1.0
    if x / service_s <= EXACT_UP_TO:
        # Erlang's exact waiting-time distribution; its alternating sum loses precision as
        # x / D grows, so far tails use the exponential (heavy-traffic) form below
        total = 0.0
        for k in range(int(x / service_s) + 1):
            u = rate * (k * service_s - x)  # <= 0
            total += u**k / math.factorial(k) * math.exp(-u)
        return min(1.0, max(0.0, (1 - rho) * total))
    return 1.0 - rho * math.exp(-2 * (1 - rho) * x / service_s)


def decode_itl(rate: float, inp: SizingInput) -> float:
    """Per-worker decode ITL at ``rate`` arrivals/s (Little's law on a linear step model)."""
    load = rate * inp.mean_output_tokens * inp.decode.b_s
    if load >= 1:
        return math.inf
    itl = inp.decode.a_s / (1 - load)
    batch = rate * inp.mean_output_tokens * itl
    return itl if batch <= inp.max_batch else math.inf


def _per_worker_prefill_goodput(inp: SizingInput) -> float:
    """Highest per-worker rate with P(TTFT <= SLO) >= target (bisection; monotone in rate)."""
    d = inp.prefill_service_s
    if md1_ttft_attainment(0.0, d, inp.ttft_slo_s) < inp.target:
        return 0.0
    lo, hi = 0.0, 1.0 / d
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (
            (mid, hi) if md1_ttft_attainment(mid, d, inp.ttft_slo_s) >= inp.target else (lo, mid)
        )
    return lo


def _per_worker_decode_goodput(inp: SizingInput) -> float:
    """Highest per-worker rate with ITL <= SLO and the batch within ``max_batch``."""
    a, b, out = inp.decode.a_s, inp.decode.b_s, inp.mean_output_tokens
    if a > inp.itl_slo_s:
        return 0.0
    by_itl = (1 - a / inp.itl_slo_s) / (out * b) if b > 0 else math.inf
    # batch = rate·out·a / (1 − rate·out·b) <= M  <=>  rate <= M / (out·(a + M·b))
    by_mem = inp.max_batch / (out * (a + inp.max_batch * b))
    return min(by_itl, by_mem)


def predict_split(inp: SizingInput, prefill_workers: int) -> SplitPrediction:
    n_p, n_d = prefill_workers, inp.total_workers - prefill_workers
    if not 1 <= n_p < inp.total_workers:
        raise ValueError(f"prefill workers must be in [1, {inp.total_workers - 1}]")
    lam = inp.arrival_rate
    d = inp.prefill_service_s
    ttft = md1_ttft(lam / n_p, d)
    itl = decode_itl(lam / n_d, inp)
    attain = md1_ttft_attainment(lam / n_p, d, inp.ttft_slo_s) * (itl <= inp.itl_slo_s)
    goodput = min(n_p * _per_worker_prefill_goodput(inp), n_d * _per_worker_decode_goodput(inp))
    return SplitPrediction(n_p, n_d, ttft, itl, attain, goodput)


def better(x: SplitPrediction, y: SplitPrediction, target: float) -> bool:
    """The choice rule: meeting the target first, then goodput; else attainment, then goodput;
    when even those tie (an overload nothing meets), the lower predicted TTFT, then ITL: the
    split that degrades least."""
    kx = (x.attainment >= target, x.goodput_rps if x.attainment >= target else x.attainment)
    ky = (y.attainment >= target, y.goodput_rps if y.attainment >= target else y.attainment)
    if kx != ky:
        return kx > ky
    return (x.goodput_rps, -x.ttft_s, -x.itl_s, -x.prefill_workers) > (
        y.goodput_rps, -y.ttft_s, -y.itl_s, -y.prefill_workers
    )


def size_pools(inp: SizingInput) -> SplitPrediction:
    n = inp.total_workers
    gp, gd = _per_worker_prefill_goodput(inp), _per_worker_decode_goodput(inp)
    cands = {1, n - 1}
    if gp + gd > 0:
        cross = n * gd / (gp + gd)  # n_p·gp = (n − n_p)·gd
        cands |= {math.floor(cross), math.ceil(cross)}
    # highest attainment now: the most prefill workers that still keep ITL within its SLO
    lam = inp.arrival_rate
    n_d_min = next((k for k in range(1, n) if decode_itl(lam / k, inp) <= inp.itl_slo_s), None)
    if n_d_min is not None:
        cands.add(n - n_d_min)
    best: SplitPrediction | None = None
    for n_p in sorted(c for c in cands if 1 <= c < n):
        p = predict_split(inp, n_p)
        if best is None or better(p, best, inp.target):
            best = p
    assert best is not None  # cands always holds 1 (n >= 2)
    return best
