"""Batched token sampling with per-row parameters and (seed, position)-only randomness.

Pipeline, per row, in the order Hugging Face ``generate`` applies its logits processors:

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw

Greedy rows (``temperature == 0``) take the argmax of the penalised logits (HF applies the
repetition penalty in greedy search too; the warpers never move the argmax). Every stage is
vectorised over the rows that use it, with per-row parameters as [n, 1] tensors, so the cost
does not depend on how parameters are mixed in the batch; Python loops only run over rows, never
over the vocabulary.

Draws are inverse-CDF with one uniform u per row: the first token whose cumulative probability
exceeds u (a full-vocab Exp/Gumbel noise tensor costs ~27 ms per 32 x 49k on CPU; this costs
~2 ms). A seeded row's u is ``mix64(seed, position)`` scaled to [0, 1), computed in Python
integers, so its token depends only on its logits, seed and position — not on the other rows,
their order, or the worker that resumes it. u itself is identical on every device; the token is
reproducible wherever the logits are bit-identical (the same device type and kernels: CPU and
CUDA logits differ in rounding, which can move a draw that lands on a boundary). Unseeded rows
draw u from the Sampler's own ``random.Random``.

On CUDA nothing here synchronises the host: per-row parameters, indices and uniforms go up
through pinned non-blocking copies (``host_to_device``), seen ids given as Python sequences are
range-checked on the host, and top-p takes one full-vocab sort instead of the CPU path's
widening candidate rounds (each round reads a row count back). The caller's read of the tokens
is the step's one sync.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch

from kvrelay.workers.device_upload import host_to_device
from kvrelay.workers.types import SamplingParams

_MASK64 = (1 << 64) - 1
_INV_2_53 = 1.0 / (1 << 53)
# first candidate-set size for top-p (real LM distributions rarely need more)
_TOP_P_CANDIDATES = 256
# inverse-CDF block width (entries); V is padded up to a multiple of it
_DRAW_BLOCK = 512
# a filter stage: edits [n, V] logits in place given one parameter per row ([n])
_Stage = Callable[[torch.Tensor, torch.Tensor], None]


def _splitmix64(x: int) -> int:
    # SplitMix64 finaliser: a bijection on 64-bit ints with full avalanche.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix64(seed: int, position: int) -> int:
    """64-bit key of a seeded row's draw at ``position`` (its top 53 bits become u)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64))


class SampleRow(NamedTuple):
    """One row of a sampling batch.

    ``position`` is the index of the token being sampled (tokens before it, prompt included).
    ``seen_ids`` are the ids the repetition penalty applies to (prompt + output so far); only read
    when ``params.repetition_penalty != 1``, so callers may leave it empty otherwise. A 1-D int64
    tensor on the logits' device is the cheap form (the engine can keep one per request); a tuple
    is converted each call. (A named tuple: the engine builds one per row and step.)
    """

    params: SamplingParams
    position: int
    seen_ids: torch.Tensor | Sequence[int] = ()


def _check(logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a float [B, V] tensor, got {logits.dtype} {tuple(logits.shape)}"
        )
    if logits.shape[0] != len(rows):
        raise ValueError(
            f"logits have {logits.shape[0]} rows but {len(rows)} SampleRows were given"
        )


class _Filter(NamedTuple):
    fn: _Stage
    rows: torch.Tensor | None  # rows it applies to; None: every row
    values: torch.Tensor  # [n] the rows' parameter


class BatchParams:
    """A batch's sampling parameters, checked and split by stage once, on one device.

    ``Sampler.sample`` keeps the last one and reuses it while its rows carry equal
    ``SamplingParams`` in the same order (a decode batch that did not change): a step
    then costs no per-row checks, and each stage's row indices and per-row parameters are
    uploaded once per batch, not once per step.
    """

    def __init__(self, params: Sequence[SamplingParams], vocab: int, device: torch.device) -> None:
        for p in params:
            if p.temperature < 0 or p.top_k < 0 or not 0 <= p.top_p <= 1 or not 0 <= p.min_p <= 1:
                raise ValueError(f"invalid sampling parameters: {p}")
            if p.repetition_penalty <= 0:
                raise ValueError(f"repetition_penalty must be > 0, got {p.repetition_penalty}")
        self.params = ps = list(params)
        self.vocab, self.device = vocab, device
        self.penalised = [i for i, p in enumerate(ps) if p.repetition_penalty != 1.0]
        self.plain = not self.penalised and all(p.greedy for p in ps)  # argmax as is
        self.drawn = [i for i, p in enumerate(ps) if not p.greedy]
        self.greedy = [i for i, p in enumerate(ps) if p.greedy]
        self.drawn_rows = host_to_device(self.drawn, torch.long, device)
        self.greedy_rows = host_to_device(self.greedy, torch.long, device)
        top_k = [ps[i].top_k for i in self.drawn if 0 < ps[i].top_k < vocab]
        stages: list[tuple[_Stage, Callable[[SamplingParams], bool], str, torch.dtype]] = [
            (_temperature, lambda p: p.temperature != 1.0, "temperature", torch.float32),
            (partial(_top_k, kmax=max(top_k, default=0)), lambda p: 0 < p.top_k < vocab,
             "top_k", torch.long),
            (_top_p, lambda p: p.top_p < 1.0, "top_p", torch.float32),
            (_min_p, lambda p: p.min_p > 0.0, "min_p", torch.float32),
        ]  # fmt: skip
        self.filters: list[_Filter] = []
        for fn, on, name, dtype in stages:
            rows = [i for i in self.drawn if on(ps[i])]
            if rows:
                values = host_to_device([getattr(ps[i], name) for i in rows], dtype, device)
                index = None if len(rows) == len(ps) else host_to_device(rows, torch.long, device)
                self.filters.append(_Filter(fn, index, values))

    def fits(self, params: list[SamplingParams], vocab: int, device: torch.device) -> bool:
        """Equal parameters in the same order, for the same logits. (List equality compares
        identity first: a batch of the same objects costs no ``SamplingParams.__eq__``.)"""
        return vocab == self.vocab and device == self.device and params == self.params


def _repetition_penalty(out: torch.Tensor, rows: Sequence[SampleRow], sel: list[int]) -> None:
    """In place, HF semantics: over the set of seen ids, logit < 0 -> * p, else / p.

    Gather / scatter at the seen ids only (O(seen), not O(B x V)); a repeated id writes the
    same value twice, so duplicates need no dedup.
    """
    if not sel:
        return
    vocab = out.shape[1]
    device = out.device
    if not any(isinstance(rows[i].seen_ids, torch.Tensor) for i in sel):
        # Host ids: check and index on the host, two non-blocking uploads, no sync.
        where: list[int] = []
        pens: list[float] = []
        for i in sel:
            seen = list(rows[i].seen_ids)
            if seen and (min(seen) < 0 or max(seen) >= vocab):
                raise ValueError(f"seen_ids must lie in [0, {vocab})")
            where += [i * vocab + t for t in seen]
            pens += [rows[i].params.repetition_penalty] * len(seen)
        if where:
            _penalise(
                out,
                host_to_device(where, torch.long, device),
                host_to_device(pens, out.dtype, device),
            )
        return
    ids = [
        torch.as_tensor(rows[i].seen_ids, dtype=torch.long, device=device).reshape(-1) for i in sel
    ]
    flat = torch.cat(ids)
    if flat.numel() == 0:
        return
    # device tensors of ids: one host sync to range-check them (a bad id must not scatter OOB)
    if int(flat.min()) < 0 or int(flat.max()) >= vocab:
        raise ValueError(f"seen_ids must lie in [0, {vocab})")
    counts = torch.tensor([t.numel() for t in ids], device=device)
    sel_rows = host_to_device(sel, torch.long, device)
    linear = torch.repeat_interleave(sel_rows * vocab, counts) + flat  # [total seen]
    pen = torch.repeat_interleave(
        torch.tensor([rows[i].params.repetition_penalty for i in sel], device=device), counts
    ).to(out.dtype)
    _penalise(out, linear, pen)


def _penalise(out: torch.Tensor, linear: torch.Tensor, pen: torch.Tensor) -> None:
    """out.view(-1)[linear] <- HF's penalty (logit < 0: * p, else / p), pen per entry."""
    view = out.view(-1)
    vals = view[linear]
    view[linear] = torch.where(vals < 0, vals * pen, vals / pen)


def _temperature(sub: torch.Tensor, temps: torch.Tensor) -> None:
    sub.div_(temps.unsqueeze(1))


def _top_k(sub: torch.Tensor, k: torch.Tensor, kmax: int) -> None:
    """In place on [n, V]: keep logits >= the k-th largest (ties at the k-th kept, as HF);
    ``kmax`` = max(k) < V, known on the host."""
    top = torch.topk(sub, kmax, dim=-1).values  # [n, kmax] descending
    kth = top.gather(1, (k - 1).unsqueeze(1))
    sub.masked_fill_(sub < kth, float("-inf"))


def _top_p(sub: torch.Tensor, top_p: torch.Tensor) -> None:
    """In place on [n, V]: keep the smallest set of top tokens whose mass reaches p.

    HF sorts ascending and drops tokens whose cumulative mass is <= 1 - p, always keeping the
    largest. The same rule read from the top: token j (descending) stays iff the mass strictly
    above it is < p. A full sort of 49k entries costs ~50 ms per 32 rows on CPU, so we look at
    the top K candidates only and widen K (up to the whole vocab) for rows whose top-K mass is
    still below p: everything outside a top-K holding mass >= p is dropped. Same sets as HF up
    to float rounding of the cumulative sums exactly at the boundary.
    """
    probs = sub.softmax(dim=-1)  # [n, V]
    if sub.is_cuda:
        _top_p_sorted(sub, probs, top_p)
        return
    n, vocab = sub.shape
    pending = torch.arange(n, device=sub.device)
    k = min(_TOP_P_CANDIDATES, vocab)
    # Rows are rebuilt from their kept candidates (fill -inf, scatter), which is cheaper than a
    # [n, V] mask; index_select / index_copy_ only, boolean-mask indexing costs ~0.5 ms a call.
    while pending.numel():
        cand = probs if pending.numel() == n else probs.index_select(0, pending)
        vals, idx = torch.topk(cand, k, dim=-1)  # [m, k] descending
        above = vals.cumsum(dim=-1) - vals  # mass strictly above each candidate
        p = top_p.index_select(0, pending).unsqueeze(1)
        stay = above < p
        stay[:, 0] = True
        done = (vals.sum(dim=-1) >= p.squeeze(1)) | (k == vocab)
        rows = done.nonzero().squeeze(1)
        src = pending.index_select(0, rows)  # rows of sub resolved this round
        cand_idx = idx.index_select(0, rows)
        kept = torch.where(
            stay.index_select(0, rows),
            sub.index_select(0, src).gather(1, cand_idx),
            float("-inf"),
        )
        rebuilt = torch.full((rows.numel(), vocab), float("-inf"), device=sub.device)
        sub.index_copy_(0, src, rebuilt.scatter_(1, cand_idx, kept))
        pending = pending.index_select(0, (~done).nonzero().squeeze(1))
        k = min(4 * k, vocab)


def _top_p_sorted(sub: torch.Tensor, probs: torch.Tensor, top_p: torch.Tensor) -> None:
    """The candidate rounds' last case (K = V) for every row at once: one device sort, no
    read-back of which rows are done. A sort of 128 x 128k on an H100 costs well under a ms."""
    vals, idx = probs.sort(dim=-1, descending=True)  # [n, V]
    above = vals.cumsum(dim=-1) - vals
    stay = above < top_p.unsqueeze(1)
    stay[:, 0] = True
    kept = torch.where(stay, sub.gather(1, idx), float("-inf"))
    sub.scatter_(1, idx, kept)


def _min_p(sub: torch.Tensor, mps: torch.Tensor) -> None:
    """In place on [n, V]: drop tokens with prob < min_p * max prob (the max always stays)."""
    probs = sub.softmax(dim=-1)
    threshold = mps.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    sub.masked_fill_(probs < threshold, float("-inf"))


def _filter(out: torch.Tensor, f: _Filter) -> None:
    """Run ``f`` on its rows of ``out`` only (views when it applies to every row)."""
    if f.rows is None:
        f.fn(out, f.values)
        return
    sub = out.index_select(0, f.rows)
    f.fn(sub, f.values)
    out.index_copy_(0, f.rows, sub)


def _process(logits: torch.Tensor, rows: Sequence[SampleRow], batch: BatchParams) -> torch.Tensor:
    out = logits.to(torch.float32, copy=True)
    _repetition_penalty(out, rows, batch.penalised)
    for f in batch.filters:
        _filter(out, f)
    return out


def apply_penalties_and_filters(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Processed logits [B, V] (a new tensor): filtered entries are -inf.

    Sampling rows get penalty, temperature, top-k, top-p, min-p; greedy rows only the penalty.
    ``softmax`` of a sampling row is the distribution ``Sampler.sample`` draws from.
    """
    _check(logits, rows)
    batch = BatchParams([r.params for r in rows], logits.shape[1], logits.device)
    return _process(logits, rows, batch)


class Sampler:
    """Draws one token per row. Stateless apart from the RNG used by unseeded rows and the
    last batch's parameters (a cache: ``BatchParams``)."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._batch: BatchParams | None = None

    def uniforms(self, rows: Sequence[SampleRow]) -> list[float]:
        """One u in [0, 1) per row: from (seed, position) for seeded rows, else the Sampler's RNG."""
        out = []
        for r in rows:
            if r.params.seed is None:
                out.append(self._rng.random())
                continue
            if r.position < 0:
                raise ValueError(f"position must be >= 0, got {r.position}")
            out.append((mix64(r.params.seed, r.position) >> 11) * _INV_2_53)
        return out

    def batch_params(self, rows: Sequence[SampleRow], logits: torch.Tensor) -> BatchParams:
        """The rows' ``BatchParams``: the last one while it fits, else a new one."""
        params = [r.params for r in rows]
        vocab, device = logits.shape[1], logits.device
        if self._batch is None or not self._batch.fits(params, vocab, device):
            self._batch = BatchParams(params, vocab, device)
        return self._batch

    def sample(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        """Token ids [B] int64 on the logits' device."""
        _check(logits, rows)
        batch = self.batch_params(rows, logits)
        if batch.plain:  # greedy, nothing to process: argmax as is
            return logits.argmax(dim=-1)
        processed = _process(logits, rows, batch)
        if not batch.drawn:
            return processed.argmax(dim=-1)
        tokens = torch.zeros(len(rows), dtype=torch.long, device=processed.device)
        if batch.greedy:
            greedy = batch.greedy_rows
            tokens.index_copy_(0, greedy, processed.index_select(0, greedy).argmax(dim=-1))
        idx = batch.drawn_rows
        picked = processed if not batch.greedy else processed.index_select(0, idx)
        probs = picked.softmax(dim=-1)  # [n, V]
        u = host_to_device(
            self.uniforms([rows[i] for i in batch.drawn]), torch.float64, probs.device
        )
        tokens.index_copy_(0, idx, inverse_cdf(probs, u))
        return tokens


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row-wise draw [n] from probs [n, V] (need not sum to 1) given u [n] in [0, 1): the first
    index whose cumulative mass exceeds u * total.

    Two levels, so no full-vocab cumsum (a float64 cumsum of 32 x 49k costs ~25 ms on one CPU
    thread): block masses [n, V / 512] pick the block, a float64 cumsum of that block's 512
    entries picks the index. A zero-probability entry never wins: the target stays strictly
    below the total, the chosen block has mass > 0, and inside it the first entry whose
    cumulative exceeds the (non-negative) local target has mass > 0; rounding between the two
    levels is clamped to the block's last positive entry.
    """
    n, vocab = probs.shape
    pad = (-vocab) % _DRAW_BLOCK
    blocks = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = blocks.reshape(n, -1, _DRAW_BLOCK)  # [n, nb, BLOCK]
    mass = blocks.sum(dim=-1).double()  # [n, nb]
    cum = mass.cumsum(dim=-1)
    total = cum[:, -1:]
    target = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    b = torch.searchsorted(cum, target, right=True).clamp_(max=blocks.shape[1] - 1)  # [n, 1]
    inner = blocks.gather(1, b.unsqueeze(-1).expand(n, 1, _DRAW_BLOCK)).squeeze(1)  # [n, BLOCK]
    local = (target - (cum.gather(1, b) - mass.gather(1, b))).clamp_(min=0.0)
    j = torch.searchsorted(inner.double().cumsum(dim=-1), local, right=True)  # [n, 1]
    positions = torch.arange(_DRAW_BLOCK, device=probs.device)
    last_positive = torch.where(inner > 0, positions, 0).amax(dim=-1, keepdim=True)
    return (b * _DRAW_BLOCK + torch.minimum(j, last_positive)).squeeze(1)
