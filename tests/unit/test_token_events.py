"""TokenEvent across process boundaries: its compact pickling and ``merge_events``, which the
event streams use to hand a reader that fell behind one event of k tokens."""

from __future__ import annotations

import pickle
from dataclasses import fields

from ray import cloudpickle

from kvrelay.workers.types import FinishReason, TokenEvent, merge_events


def test_pickles_to_an_equal_event() -> None:
    events = [
        TokenEvent("r1", (5, 6), "ab", None, 3),
        TokenEvent("r2", (), "", FinishReason.ABORT),
        TokenEvent("r1", (7,), "c", FinishReason.STOP),
    ]
    _, args = events[0].__reduce__()  # every field travels, in declaration order
    assert args == tuple(getattr(events[0], f.name) for f in fields(TokenEvent))
    for dumps in (pickle.dumps, cloudpickle.dumps):
        back = pickle.loads(dumps(events))
        assert back == events
        assert back[2].finish_reason is FinishReason.STOP


def test_merge_keeps_order_text_and_the_last_finish_reason() -> None:
    merged = merge_events(
        [
            TokenEvent("r", (1,), "He", None, 4),
            TokenEvent("r", (2, 3), "llo", None),
            TokenEvent("r", (), "", None),
            TokenEvent("r", (4,), "!", FinishReason.LENGTH),
        ]
    )
    assert merged == TokenEvent("r", (1, 2, 3, 4), "Hello!", FinishReason.LENGTH, 4)
    one = TokenEvent("r", (9,), "x")
    assert merge_events([one]) is one
