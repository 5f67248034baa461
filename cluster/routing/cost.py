"""Cost estimates for conditional disaggregation and cross-worker pulls (pure).

Rates are measured on the deployment (the controller keeps moving averages from heartbeats
and transfer records); nothing here is a constant rule:

* ``disaggregation``: a decode worker D that already holds ``matched_on_decode`` of the
  prompt either prefills the rest itself (``(n - matched_D) / rate_D``), or a prefill worker
  P prefills (``(n - matched_P) / rate_P``) and hands off the blocks D lacks
  (``(n - matched_D) * kv_bytes_per_token / link + handoff overhead``).
* ``pull_or_recompute``: blocks another worker holds beyond our own prefix either come over the
  link (``tokens * kv_bytes_per_token / link + overhead``) or are computed (``tokens / rate``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class PrefillPlace(str, enum.Enum):
    LOCAL_ON_DECODE = "local_on_decode"
    PREFILL_AND_HANDOFF = "prefill_and_handoff"


class PrefixSource(str, enum.Enum):
    PULL = "pull"
    RECOMPUTE = "recompute"


@dataclass(frozen=True, slots=True)
class DisaggEstimate:
    choice: PrefillPlace
    local_s: float  # prefill of the missing tokens on D
    handoff_s: float  # prefill on P + transfer of what D lacks + overhead


@dataclass(frozen=True, slots=True)
class PullEstimate:
    choice: PrefixSource
    tokens: int  # tokens that would be pulled or recomputed
    pull_s: float
    recompute_s: float


def _positive(name: str, v: float) -> None:
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {v}")


def _tokens(name: str, v: int, upper: int) -> None:
    if not 0 <= v <= upper:
        raise ValueError(f"{name} must be in [0, {upper}], got {v}")


def disaggregation(
    prompt_tokens: int,
    matched_on_decode: int,
    decode_prefill_tokens_per_s: float,
    prefill_tokens_per_s: float,
    transfer_bytes_per_s: float,
    kv_bytes_per_token: float,
    matched_on_prefill: int = 0,
    handoff_overhead_s: float = 0.0,
) -> DisaggEstimate:
    """Prefill on D itself, or on P with a handoff; ties go to the local prefill (no RPCs)."""
    if prompt_tokens <= 0:
        raise ValueError(f"prompt_tokens must be positive, got {prompt_tokens}")
    _tokens("matched_on_decode", matched_on_decode, prompt_tokens)
    _tokens("matched_on_prefill", matched_on_prefill, prompt_tokens)
    _positive("decode_prefill_tokens_per_s", decode_prefill_tokens_per_s)
    _positive("prefill_tokens_per_s", prefill_tokens_per_s)
    _positive("transfer_bytes_per_s", transfer_bytes_per_s)
    _positive("kv_bytes_per_token", kv_bytes_per_token)
    if not (math.isfinite(handoff_overhead_s) and handoff_overhead_s >= 0):
        raise ValueError(f"handoff_overhead_s must be >= 0, got {handoff_overhead_s}")
    missing_on_d = prompt_tokens - matched_on_decode
    local = missing_on_d / decode_prefill_tokens_per_s
    handoff = (
        (prompt_tokens - matched_on_prefill) / prefill_tokens_per_s
        + missing_on_d * kv_bytes_per_token / transfer_bytes_per_s
        + handoff_overhead_s
    )
    choice = PrefillPlace.LOCAL_ON_DECODE if local <= handoff else PrefillPlace.PREFILL_AND_HANDOFF
    return DisaggEstimate(choice=choice, local_s=local, handoff_s=handoff)


def pull_or_recompute(
    tokens: int,
    prefill_tokens_per_s: float,
    transfer_bytes_per_s: float,
    kv_bytes_per_token: float,
    pull_overhead_s: float = 0.0,
) -> PullEstimate:
    """For ``tokens`` another worker holds (beyond our own prefix): pull them or recompute.
    Ties go to recompute (no dependency on a peer)."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    _positive("prefill_tokens_per_s", prefill_tokens_per_s)
    _positive("transfer_bytes_per_s", transfer_bytes_per_s)
    _positive("kv_bytes_per_token", kv_bytes_per_token)
    if not (math.isfinite(pull_overhead_s) and pull_overhead_s >= 0):
        raise ValueError(f"pull_overhead_s must be >= 0, got {pull_overhead_s}")
    recompute = tokens / prefill_tokens_per_s
    pull = tokens * kv_bytes_per_token / transfer_bytes_per_s + pull_overhead_s if tokens else 0.0
    choice = PrefixSource.PULL if pull < recompute else PrefixSource.RECOMPUTE
    return PullEstimate(choice=choice, tokens=tokens, pull_s=pull, recompute_s=recompute)
