"""Sampler against transformers' own logits processors, seeded reproducibility, frequencies."""

from __future__ import annotations

import random
from typing import cast

import pytest
import torch
from scipy.stats import chi2
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvrelay.workers.engine.sampler import Sampler, SampleRow, apply_penalties_and_filters, mix64
from kvrelay.workers.types import SamplingParams


def hf_process(logits: torch.Tensor, seen: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row through transformers' processors, in the order generate() builds them."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=p.repetition_penalty))
    if not p.greedy:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            procs.append(TopKLogitsWarper(top_k=p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=p.top_p))
        procs.append(MinPLogitsWarper(min_p=p.min_p))
    ids = cast(torch.LongTensor, seen.unsqueeze(0))
    return procs(ids, logits.unsqueeze(0).clone())[0]


def mixed_rows(gen: torch.Generator, batch: int, vocab: int) -> list[SampleRow]:
    """Rows with independently drawn parameters, so every stage meets every other."""

    def pick(options: list) -> object:  # type: ignore[type-arg]
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    rows = []
    for i in range(batch):
        params = SamplingParams(
            temperature=pick([0.0, 0.5, 1.0, 1.7]),
            top_k=pick([0, 0, 1, 5, 40, vocab + 3]),
            top_p=pick([1.0, 1.0, 0.95, 0.6, 0.1]),
            min_p=pick([0.0, 0.02, 0.3]),
            repetition_penalty=pick([1.0, 1.3, 0.8]),
            seed=i if i % 2 else None,
        )
        seen = torch.randint(
            0, vocab, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen
        )
        rows.append(SampleRow(params, position=len(seen), seen_ids=seen))
    return rows


@pytest.mark.parametrize("scale", [1.0, 4.0, 12.0])  # flat to peaked: top-p widens its candidates
def test_processed_logits_match_transformers(scale: float) -> None:
    gen = torch.Generator().manual_seed(int(scale))
    batch, vocab = 24, 2000
    logits = torch.randn(batch, vocab, generator=gen) * scale
    rows = mixed_rows(gen, batch, vocab)
    ours = apply_penalties_and_filters(logits, rows)
    for i, row in enumerate(rows):
        ref = hf_process(logits[i], torch.as_tensor(row.seen_ids), row.params)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), f"row {i} kept set differs"
        finite = torch.isfinite(ref)
        torch.testing.assert_close(ours[i][finite], ref[finite], rtol=1e-6, atol=1e-6)


def test_top_p_on_flat_rows_widens_past_first_candidates() -> None:
    # near-uniform rows: the kept set is thousands of tokens, beyond the first top-K candidates
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 5000, generator=gen) * 0.5
    rows = [
        SampleRow(SamplingParams(top_p=p, min_p=m), 0)
        for p, m in [(0.9, 0), (0.5, 0.2), (0.3, 0), (0.99, 0)]
    ]
    ours = apply_penalties_and_filters(logits, rows)
    for i, row in enumerate(rows):
        ref = hf_process(logits[i], torch.zeros(0, dtype=torch.long), row.params)
        assert int(torch.isfinite(ref).sum()) > 500
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), f"row {i} kept set differs"


def test_seen_ids_as_tuple_equal_tensor() -> None:
    logits = torch.randn(2, 50)
    p = SamplingParams(repetition_penalty=1.5)
    a = apply_penalties_and_filters(logits, [SampleRow(p, 3, (1, 2, 2)), SampleRow(p, 1, (49,))])
    b = apply_penalties_and_filters(
        logits, [SampleRow(p, 3, torch.tensor([1, 2, 2])), SampleRow(p, 1, torch.tensor([49]))]
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, logits)


def test_greedy_is_argmax_of_penalised_logits() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 500, generator=gen)
    top = logits.argmax(dim=-1)
    plain = [SampleRow(SamplingParams(temperature=0.0, seed=i), 10) for i in range(8)]
    assert torch.equal(Sampler().sample(logits, plain), top)
    # penalising each row's argmax (positive logit: divided by 10) moves greedy off it
    pen = [
        SampleRow(SamplingParams(temperature=0.0, repetition_penalty=10.0), 10, (int(top[i]),))
        for i in range(8)
    ]
    got = Sampler().sample(logits, pen)
    assert torch.equal(got, logits.scatter(1, top[:, None], -1e9).argmax(dim=-1))


def test_seeded_row_independent_of_batch_composition() -> None:
    gen = torch.Generator().manual_seed(2)
    vocab = 4000
    row_logits = torch.randn(vocab, generator=gen)  # flat: many tokens are plausible
    target = SampleRow(SamplingParams(temperature=1.0, top_p=0.9, seed=1234), position=77)
    results = set()
    for batch in (1, 3, 9):
        for where in range(batch):
            logits = torch.randn(batch, vocab, generator=gen)
            logits[where] = row_logits
            others = mixed_rows(gen, batch, vocab)
            rows = [*others[:where], target, *others[where + 1 :]]
            sampler = Sampler(seed=int(torch.randint(0, 100, (1,), generator=gen)))
            results.add(int(sampler.sample(logits, rows)[where]))
    assert len(results) == 1

    # ... while other seeds and other positions draw other tokens
    def draw(seed: int, position: int) -> int:
        row = SampleRow(SamplingParams(temperature=1.0, top_p=0.9, seed=seed), position)
        return int(Sampler().sample(row_logits[None], [row])[0])

    assert len({draw(s, 77) for s in range(30)}) > 20
    assert len({draw(1234, pos) for pos in range(30)}) > 20
    assert mix64(1, 2) != mix64(2, 1)


def frequencies_match(tokens: torch.Tensor, probs: torch.Tensor, draws: int) -> None:
    support = probs > 0
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[~support].sum() == 0, "a filtered token was drawn"
    expected = probs[support].double() * draws
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    # fixed seeds: deterministic; the bound is the 1e-6 tail, so a correct sampler passes widely
    assert stat < chi2.ppf(1 - 1e-6, int(support.sum()) - 1), stat


@pytest.mark.parametrize("seeded", [False, True])
def test_empirical_frequencies_match_processed_distribution(seeded: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    vocab, draws = 30, 10000
    logits = torch.randn(vocab, generator=gen) * 2
    params = SamplingParams(temperature=0.7, top_k=12, top_p=0.97, min_p=0.01, seed=None)
    rows = [
        SampleRow(SamplingParams(**{**_asdict(params), "seed": 99 if seeded else None}), pos)
        for pos in range(draws)
    ]
    batch = logits.expand(draws, vocab)
    probs = apply_penalties_and_filters(batch[:1], rows[:1])[0].softmax(dim=-1)
    assert 1 < int((probs > 0).sum()) < 12
    tokens = Sampler(seed=5).sample(batch, rows)
    frequencies_match(tokens, probs, draws)


def _asdict(p: SamplingParams) -> dict[str, object]:
    return {f: getattr(p, f) for f in p.__slots__}


def test_bad_input_is_a_clear_error() -> None:
    row = SampleRow(SamplingParams(), 0)
    with pytest.raises(ValueError, match="rows"):
        Sampler().sample(torch.zeros(2, 5), [row])
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        Sampler().sample(torch.zeros(5), [row])
    with pytest.raises(ValueError, match="seen_ids"):
        pen = SampleRow(SamplingParams(repetition_penalty=1.2), 1, (7,))
        Sampler().sample(torch.zeros(1, 5), [pen])
    with pytest.raises(ValueError, match="invalid sampling"):
        Sampler().sample(torch.zeros(1, 5), [SampleRow(SamplingParams(top_p=1.5), 0)])


def test_reused_batch_params_draw_what_fresh_ones_draw() -> None:
    """One Sampler over many steps keeps its BatchParams while the rows carry equal params in
    the same order and rebuilds it when a row joins, leaves or moves, or the vocab changes: every step
    draws exactly what a fresh Sampler draws (greedy, penalised and seeded rows)."""
    gen = torch.Generator().manual_seed(11)
    rng = random.Random(11)
    choices = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, top_k=20, seed=1),
        SamplingParams(temperature=1.2, top_p=0.8, seed=2),
        SamplingParams(min_p=0.05, seed=3),
        SamplingParams(temperature=1.5, top_k=150, repetition_penalty=0.8, seed=4),
        SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.02, seed=5),
    ]
    batch = [rng.choice(choices) for _ in range(6)]
    sampler = Sampler()
    last = None
    reused = rebuilt = 0
    for step in range(80):
        op = rng.random()
        if op < 0.1:
            batch.append(rng.choice(choices))
        elif op < 0.2 and len(batch) > 1:
            batch.pop(rng.randrange(len(batch)))
        elif op < 0.3:
            rng.shuffle(batch)
        vocab = 120 if step % 20 < 10 else 300  # top_k=150 is off at 120, on at 300
        logits = torch.randn(len(batch), vocab, generator=gen) * 3
        rows = [
            SampleRow(p, step + i, tuple(rng.randrange(vocab) for _ in range(6)))
            for i, p in enumerate(batch)
        ]
        got = sampler.sample(logits, rows)
        assert torch.equal(got, Sampler().sample(logits, rows)), step
        params = sampler.batch_params(rows, logits)
        reused += params is last
        rebuilt += params is not last
        last = params
    assert reused > 20 and rebuilt > 10, (reused, rebuilt)
