"""The engine's speed estimates, one rule for all: an exponential running average in which the
newest step weighs 0.2. A prefill rate learns only from steps that compute at least
``MIN_PREFILL_TOKENS`` tokens (decode-sized steps say little about prefill speed).

A copy rate (bytes/s of swaps between the tiers) learns from every copy that moved something.

Two readers use it: the engine's swap-or-recompute rule (workers/engine/swap.py, seeded with a
prior or a probe) and the loop's figures for the heartbeat (workers/engine/loop.py, which the router and
the pool sizing read).
"""

from __future__ import annotations

MIN_PREFILL_TOKENS = 32
NEW_WEIGHT = 0.2


def running_average(old: float | None, sample: float) -> float:
    return sample if old is None else (1.0 - NEW_WEIGHT) * old + NEW_WEIGHT * sample


def prefill_rate(tokens: int, seconds: float) -> float | None:
    """Tokens/s of one step, or None when the step says nothing about prefill speed."""
    if tokens < MIN_PREFILL_TOKENS or seconds <= 0:
        return None
    return tokens / seconds


def copy_rate(nbytes: int, seconds: float) -> float | None:
    """Bytes/s of one copy, or None when it moved nothing (or took no measurable time)."""
    if nbytes <= 0 or seconds <= 0:
        return None
    return nbytes / seconds
