"""Workloads for the load generator: BurstGPT-style synthetic arrivals, or a CSV trace replay.

* Arrivals: a Gamma renewal process. BurstGPT fits shape 0.5, scale 2.0 (mean gap 1 s, CV
  1/sqrt(0.5) ≈ 1.41: bursty). ``rate`` rescales the gaps to a mean of 1/rate, keeping the shape.
* Lengths: Zipf(a = 1.1) prompt and output tokens, resampled while >= the maximum (BurstGPT's
  generator resamples while >= 1024).
* Replay: a CSV with BurstGPT's columns (Timestamp, Model, Request tokens, Response tokens,
  Total tokens, Log Type); arrival = (Timestamp − first) / time_scale; failed rows
  (Response tokens == 0) are skipped unless asked for.
* Tenants: "heavy:0.9,light:0.1" assigns each request a tenant by weight (seeded).
* Mixed (issue 16): with ``long_fraction`` F > 0, F of the requests are long prompts (uniform in
  ``long_prompt_range``, Zipf outputs < ``long_output_tokens``) arriving in bursts of 2–4 that
  land within half the stream's mean gap (at most 300 ms); burst starts are a Gamma process
  of the same shape. The other 1 − F are the chat streams above. Both share the rate: chat
  gaps are drawn at (1 − F)·rate, bursts at F·rate / 3 (3 = the mean burst size), so the mean
  rate of all requests is still ``rate``. The chat draws come first from the one seeded
  generator, so F = 0 gives the plain workload bit for bit.
* Context: ``fit_context`` cuts a prompt so that prompt + output + the synthetic prompt's lead
  word fit the model's context (the server would refuse it with a 400 otherwise).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

BURSTGPT_COLUMNS = (
    "Timestamp",
    "Model",
    "Request tokens",
    "Response tokens",
    "Total tokens",
    "Log Type",
)

# Common English words; most are one BPE token with a leading space in Llama-family vocabularies,
# so a prompt of n words is about n tokens (the server's usage figures give the true count).
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part"
).split()

# Tokens a synth_prompt of n tokens may hold beyond n: its lead word "r<index>" is one word but
# 1 + one per digit tokens under SmolLM2's tokenizer (measured: n + 1 .. n + 5 for index < 1e5).
PROMPT_SLACK = 8
LONG_BURST = (2, 4)  # sizes of a burst of long prompts, uniform, inclusive
LONG_BURST_SPAN_S = 0.3  # a burst lands within this, or half the stream's mean gap if shorter


@dataclass(frozen=True, slots=True)
class Arrival:
    t_s: float  # seconds after the run starts
    tenant: str
    prompt_tokens: int
    output_tokens: int


def parse_tenants(spec: str) -> tuple[tuple[str, float], ...]:
    """ "heavy:0.9,light:0.1" -> (("heavy", 0.9), ("light", 0.1)), weights normalised."""
    pairs: list[tuple[str, float]] = []
    for part in spec.split(","):
        name, sep, weight = part.strip().partition(":")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"bad tenant weight in {part!r}; use name:weight") from None
        if not name or w <= 0:
            raise ValueError(f"bad tenant {part!r}; use name:weight with weight > 0")
        pairs.append((name, w))
    if len({n for n, _ in pairs}) != len(pairs):
        raise ValueError(f"duplicate tenant in {spec!r}")
    total = sum(w for _, w in pairs)
    return tuple((n, w / total) for n, w in pairs)


def gamma_gaps(
    n: int,
    rng: np.random.Generator,
    shape: float = 0.5,
    scale: float = 2.0,
    rate: float | None = None,
) -> np.ndarray:
    """``n`` inter-arrival gaps [n] in seconds; with ``rate`` the scale becomes 1/(shape·rate)."""
    if shape <= 0 or scale <= 0 or (rate is not None and rate <= 0):
        raise ValueError("gamma shape, scale and rate must be > 0")
    if rate is not None:
        scale = 1.0 / (shape * rate)
    return rng.gamma(shape, scale, n)


def zipf_lengths(
    n: int, rng: np.random.Generator, a: float = 1.1, maximum: int = 1024
) -> np.ndarray:
    """``n`` Zipf(a) integers in [1, maximum), resampling the ones >= maximum."""
    if a <= 1 or maximum < 2:
        raise ValueError("zipf a must be > 1 and the maximum >= 2")
    out = rng.zipf(a, n)
    bad = out >= maximum
    while bad.any():
        out[bad] = rng.zipf(a, int(bad.sum()))
        bad = out >= maximum
    return out


def _tenants_for(
    n: int, tenants: Sequence[tuple[str, float]], rng: np.random.Generator
) -> list[str]:
    names = [t for t, _ in tenants]
    idx = rng.choice(len(names), size=n, p=[w for _, w in tenants])
    return [names[i] for i in idx]


def synthetic_workload(
    n: int,
    seed: int = 0,
    *,
    rate: float | None = None,
    shape: float = 0.5,
    scale: float = 2.0,
    zipf_a: float = 1.1,
    max_prompt_tokens: int = 1024,
    max_output_tokens: int = 1024,
    tenants: Sequence[tuple[str, float]] = (("default", 1.0),),
    min_output_tokens: int = 1,
    long_fraction: float = 0.0,
    long_prompt_range: tuple[int, int] = (1024, 8192),
    long_output_tokens: int = 16,
) -> list[Arrival]:
    """``n`` arrivals sorted by time: the chat streams and, with ``long_fraction`` > 0, the
    bursts of long prompts among them (module docstring). ``min_output_tokens`` raises the chat
    streams' shorter outputs to it (Zipf(1.1) below 128 averages ~18 tokens: streams that barely
    decode); the same draws otherwise, so arrivals and prompts do not change."""
    if not 0 <= long_fraction < 1:
        raise ValueError("long fraction must be in [0, 1)")
    if not 1 <= min_output_tokens < max_output_tokens:
        raise ValueError("min output tokens must be in [1, max output tokens)")
    rng = np.random.default_rng(seed)
    n_long = round(long_fraction * n)
    total = rate if rate is not None else 1.0 / (shape * scale)
    chat_rate = total * (1 - long_fraction) if n_long else rate
    times = np.cumsum(gamma_gaps(n - n_long, rng, shape, scale, chat_rate))
    prompts = zipf_lengths(n - n_long, rng, zipf_a, max_prompt_tokens)
    outputs = np.maximum(
        zipf_lengths(n - n_long, rng, zipf_a, max_output_tokens), min_output_tokens
    )
    names = _tenants_for(n - n_long, tenants, rng)
    out = [
        Arrival(float(t), names[i], int(prompts[i]), int(outputs[i])) for i, t in enumerate(times)
    ]
    if n_long:
        out += _long_bursts(
            n_long,
            rng,
            total,
            long_fraction,
            shape,
            scale,
            zipf_a,
            long_prompt_range,
            long_output_tokens,
            tenants,
        )
        out.sort(key=lambda a: a.t_s)
    return out


def _long_bursts(
    n: int,
    rng: np.random.Generator,
    rate: float,
    fraction: float,
    shape: float,
    scale: float,
    zipf_a: float,
    prompt_range: tuple[int, int],
    max_output_tokens: int,
    tenants: Sequence[tuple[str, float]],
) -> list[Arrival]:
    """``n`` long-prompt arrivals in bursts; ``fraction``·``rate`` of them per second."""
    lo, hi = prompt_range
    if not 1 <= lo <= hi:
        raise ValueError("long prompt range must be 1 <= LO <= HI")
    sizes = rng.integers(LONG_BURST[0], LONG_BURST[1] + 1, n)  # enough for n requests
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n)) + 1]
    sizes[-1] -= int(sizes.sum()) - n  # the last burst takes what is left
    mean_size = sum(LONG_BURST) / 2
    starts = np.cumsum(gamma_gaps(len(sizes), rng, shape, scale, fraction * rate / mean_size))
    span = min(LONG_BURST_SPAN_S, 0.5 / rate)
    offsets = rng.uniform(0.0, span, n)
    offsets[np.cumsum(sizes) - sizes] = 0.0  # a burst opens at its start
    times = np.repeat(starts, sizes) + offsets
    prompts = rng.integers(lo, hi + 1, n)
    outputs = zipf_lengths(n, rng, zipf_a, max_output_tokens)
    names = _tenants_for(n, tenants, rng)
    return [
        Arrival(float(t), names[i], int(prompts[i]), int(outputs[i])) for i, t in enumerate(times)
    ]


def fit_context(arrivals: Sequence[Arrival], max_context: int) -> list[Arrival]:
    """Cut each prompt to ``max_context`` − output − PROMPT_SLACK tokens, so that the real
    prompt (synth_prompt's lead word included) + the output fit the model's context."""
    out = []
    for a in arrivals:
        room = max_context - a.output_tokens - PROMPT_SLACK
        if room < 1:
            raise ValueError(
                f"{a.output_tokens} output tokens leave no prompt room in a context of "
                f"{max_context}"
            )
        out.append(replace(a, prompt_tokens=min(a.prompt_tokens, room)))
    return out


def read_burstgpt_csv(
    path: str | Path,
    time_scale: float = 1.0,
    *,
    limit: int | None = None,
    keep_failures: bool = False,
    tenants: Sequence[tuple[str, float]] = (("default", 1.0),),
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
) -> list[Arrival]:
    """Arrivals from a BurstGPT-format CSV, sorted by time. Lengths are clipped to the
    maxima when given (a small model's context)."""
    if time_scale <= 0:
        raise ValueError("time scale must be > 0")
    rows: list[tuple[float, int, int]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(BURSTGPT_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a BurstGPT CSV, missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                t = float(row["Timestamp"])
                req, resp = int(float(row["Request tokens"])), int(float(row["Response tokens"]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: bad number in {row}") from None
            if resp <= 0 and not keep_failures:
                continue
            rows.append((t, max(req, 1), max(resp, 1)))
            if limit is not None and len(rows) >= limit:
                break
    rows.sort()
    if not rows:
        return []
    t0 = rows[0][0]
    names = _tenants_for(len(rows), tenants, np.random.default_rng(seed))
    return [
        Arrival(
            (t - t0) / time_scale,
            names[i],
            min(p, max_prompt_tokens) if max_prompt_tokens else p,
            min(o, max_output_tokens) if max_output_tokens else o,
        )
        for i, (t, p, o) in enumerate(rows)
    ]


def rescale_to_rate(arrivals: Sequence[Arrival], rate: float) -> list[Arrival]:
    """Stretch or squeeze a trace's times so its mean rate is ``rate`` (keeps its burst shape):
    how a sweep replays one trace at several rates."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if len(arrivals) < 2 or arrivals[-1].t_s <= 0:
        return list(arrivals)
    factor = (len(arrivals) - 1) / arrivals[-1].t_s / rate
    return [replace(a, t_s=a.t_s * factor) for a in arrivals]


def write_burstgpt_csv(path: str | Path, arrivals: Iterable[Arrival], seed: int = 0) -> int:
    """Write arrivals in BurstGPT's columns (Model and Log Type drawn in BurstGPT's rough
    proportions; about 2% failures with Response tokens = 0). Returns the row count."""
    rng = np.random.default_rng(seed)
    n = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(BURSTGPT_COLUMNS)
        for a in arrivals:
            resp = 0 if rng.random() < 0.02 else a.output_tokens
            model = "ChatGPT" if rng.random() < 0.8 else "GPT-4"
            log = "Conversation log" if rng.random() < 0.6 else "API log"
            w.writerow([round(a.t_s, 3), model, a.prompt_tokens, resp, a.prompt_tokens + resp, log])
            n += 1
    return n


def synth_prompt(n_tokens: int, index: int, rng: np.random.Generator) -> str:
    """About ``n_tokens`` tokens of words. A distinct lead word per request keeps prompts from
    sharing a cached prefix; the tokenizer decides the real count."""
    words = [f"r{index}"] + [_WORDS[i] for i in rng.integers(0, len(_WORDS), max(n_tokens - 1, 0))]
    return " ".join(words)
