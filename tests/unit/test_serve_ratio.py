"""serve_ratio's window: e2e and saturated-decode rates and per-token ITL from per-request
token arrival times (chunks of several tokens included)."""

from __future__ import annotations

import math

from kvrelay.benchmarks.serve_ratio import window


def test_window_counts_only_tokens_while_every_request_decodes() -> None:
    arrivals = [
        [(1.0, 1), (2.0, 1), (3.0, 1), (4.0, 1)],
        [(1.5, 1), (2.5, 2), (4.5, 1)],  # a chunk of 2 tokens; the last arrives after A's end
    ]
    w = window(arrivals, t0=0.5)
    assert w.tokens == 8
    assert w.e2e_s == 4.0 and w.e2e_tok_s == 2.0
    # window (1.5, 4.0]: A's 3 tokens after 1.5, B's chunk of 2 at 2.5; not B's first or 4.5
    assert w.window_s == 2.5 and w.window_tokens == 5 and w.window_tok_s == 2.0
    assert sorted(w.itl) == [0.5, 0.5, 1.0, 1.0, 1.0, 2.0]  # the chunk's gap split over 2


def test_window_without_a_saturated_span_is_nan() -> None:
    w = window([[(1.0, 1), (2.0, 1)], [(3.0, 1), (4.0, 1)]], t0=0.0)
    assert w.tokens == 4 and w.e2e_tok_s == 1.0
    assert w.window_s < 0 and math.isnan(w.window_tok_s)
