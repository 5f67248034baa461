"""Picker: the highest weighted score wins; ties broken deterministically or seeded-random."""

from __future__ import annotations

import random
from collections.abc import Sequence

_EPS = 1e-12  # scores equal up to float noise are a tie


class MaxScorePicker:
    def __init__(self, tie_break: str = "lowest_id", seed: int = 0) -> None:
        self._random = random.Random(seed) if tie_break == "random" else None

    def pick(self, worker_ids: Sequence[str], totals: Sequence[float]) -> int:
        """Index of the winner; ``worker_ids`` and ``totals`` are parallel and non-empty."""
        best = max(totals)
        ties = [i for i, t in enumerate(totals) if t >= best - _EPS]
        if len(ties) == 1:
            return ties[0]
        if self._random is not None:
            ties.sort(key=lambda i: worker_ids[i])  # same draw whatever the input order
            return self._random.choice(ties)
        return min(ties, key=lambda i: worker_ids[i])
