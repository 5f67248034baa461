"""The load generator's report: latency percentiles, throughput, SLO attainment, goodput.

A request meets its SLOs when it succeeded, its TTFT <= the TTFT SLO and its inter-token
latency (the mean gap between streamed tokens after the first, i.e. TPOT as DistServe uses it)
<= the ITL SLO. ITL percentiles are over every gap of every request, and again split into each
request's first gap (between its first and second token-bearing chunks: in a disaggregated
worker, the handoff from prefill to decode) and its later gaps (steady decode). Goodput
(DistServe) is the highest offered rate at which >= 90% of requests meet both SLOs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

GOODPUT_ATTAINMENT = 0.9


@dataclass(frozen=True, slots=True)
class RequestResult:
    tenant: str
    scheduled_s: float  # when the open loop meant to send it (from run start)
    sent_s: float  # when it was sent
    ttft_s: float | None  # None when no token arrived
    gaps_s: tuple[float, ...]  # between successive token-bearing chunks
    e2e_s: float
    prompt_tokens: int
    output_tokens: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.ttft_s is not None

    @property
    def itl_s(self) -> float:
        """Mean inter-token time after the first token (0 with a single token)."""
        if self.output_tokens <= 1 or self.ttft_s is None:
            return 0.0
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True, slots=True)
class Percentiles:
    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, xs: Sequence[float]) -> Percentiles:
        if not xs:
            return cls(float("nan"), float("nan"), float("nan"), float("nan"))
        a = np.asarray(xs, float)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(a.mean()))


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    succeeded: int
    duration_s: float
    ttft_s: Percentiles
    itl_s: Percentiles  # per-gap
    itl_first_s: Percentiles  # each request's first gap (the handoff, in PD)
    itl_later_s: Percentiles  # its later gaps
    tpot_s: Percentiles  # per-request mean gap
    e2e_s: Percentiles
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    slo_attainment: float  # fraction of all requests meeting both SLOs
    errors: dict[str, int] = field(default_factory=dict)


def meets_slo(r: RequestResult, ttft_slo_s: float, itl_slo_s: float) -> bool:
    return r.ok and r.ttft_s is not None and r.ttft_s <= ttft_slo_s and r.itl_s <= itl_slo_s


def summarize(
    results: Sequence[RequestResult], duration_s: float, ttft_slo_s: float, itl_slo_s: float
) -> Summary:
    if duration_s <= 0:
        raise ValueError("duration must be > 0")
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = r.error.split(":")[0] or "no tokens"
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    met = sum(meets_slo(r, ttft_slo_s, itl_slo_s) for r in results)
    return Summary(
        requests=len(results),
        succeeded=len(ok),
        duration_s=duration_s,
        ttft_s=Percentiles.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl_s=Percentiles.of([g for r in ok for g in r.gaps_s]),
        itl_first_s=Percentiles.of([r.gaps_s[0] for r in ok if r.gaps_s]),
        itl_later_s=Percentiles.of([g for r in ok for g in r.gaps_s[1:]]),
        tpot_s=Percentiles.of([r.itl_s for r in ok if r.output_tokens > 1]),
        e2e_s=Percentiles.of([r.e2e_s for r in ok]),
        requests_per_s=len(ok) / duration_s,
        output_tokens_per_s=out_tokens / duration_s,
        total_tokens_per_s=(out_tokens + sum(r.prompt_tokens for r in ok)) / duration_s,
        slo_attainment=met / len(results) if results else float("nan"),
        errors=errors,
    )


def summarize_by_tenant(
    results: Sequence[RequestResult], duration_s: float, ttft_slo_s: float, itl_slo_s: float
) -> dict[str, Summary]:
    """``"all"`` plus one summary per tenant."""
    tenants = sorted({r.tenant for r in results})
    out = {"all": summarize(results, duration_s, ttft_slo_s, itl_slo_s)}
    if len(tenants) > 1:
        for t in tenants:
            mine = [r for r in results if r.tenant == t]
            out[t] = summarize(mine, duration_s, ttft_slo_s, itl_slo_s)
    return out


def goodput(points: Iterable[tuple[float, float]], threshold: float = GOODPUT_ATTAINMENT) -> float:
    """Highest rate among (rate, attainment) points whose attainment >= threshold, such that
    every lower measured rate met it too (a rate that passes above a failing one is luck);
    0.0 when none does."""
    best = 0.0
    for rate, attainment in sorted(points):
        if attainment < threshold:
            break
        best = rate
    return best


def format_table(summaries: Mapping[str, Summary], ttft_slo_s: float, itl_slo_s: float) -> str:
    ms = 1000.0
    head = (
        f"{'tenant':<10} {'reqs':>5} {'ok':>5} {'req/s':>7} {'tok/s':>8} "
        f"{'TTFT p50/p90/p99 ms':>22} {'ITL p50/p90/p99 ms':>21} {'SLO%':>6}"
    )
    lines = [f"SLOs: TTFT <= {ttft_slo_s * ms:.0f} ms, ITL <= {itl_slo_s * ms:.0f} ms", head]
    for name, s in summaries.items():
        t, i = s.ttft_s, s.itl_s
        lines.append(
            f"{name:<10} {s.requests:>5} {s.succeeded:>5} {s.requests_per_s:>7.2f} "
            f"{s.output_tokens_per_s:>8.1f} "
            f"{t.p50 * ms:>6.0f}/{t.p90 * ms:>6.0f}/{t.p99 * ms:>6.0f}   "
            f"{i.p50 * ms:>5.1f}/{i.p90 * ms:>5.1f}/{i.p99 * ms:>5.1f}   "
            f"{100 * s.slo_attainment:>5.1f}"
        )
        if s.errors:
            lines.append(f"{'':<10} errors: {s.errors}")
    return "\n".join(lines)


def to_json(obj: object) -> str:
    def conv(o: object) -> object:
        if hasattr(o, "__dataclass_fields__"):
            return conv(asdict(o))  # type: ignore[call-overload]
        if isinstance(o, dict):
            return {str(k): conv(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [conv(v) for v in o]
        if isinstance(o, float) and not np.isfinite(o):
            return None
        return o

    return json.dumps(conv(obj), indent=2)
