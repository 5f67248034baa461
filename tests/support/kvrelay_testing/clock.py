"""Letting time pass on the calling thread, for tests of code that measures durations."""

from __future__ import annotations

import time


def spin(seconds: float) -> None:
    """Compute until ``seconds`` have passed (holding the GIL, as busy host code does): the
    duration a clock under test must see, never a way to wait for another thread."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
