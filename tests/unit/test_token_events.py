"""TokenEvent across process boundaries: its rows on the wire and ``merge_events``, which the
event streams use to hand a reader that fell behind one event of k tokens."""

from __future__ import annotations

import pickle

from ray import cloudpickle

from kvrelay.workers.types import (
    FinishReason,
    TokenEvent,
    events_from_bytes,
    events_to_bytes,
    merge_events,
)


def test_crosses_processes_as_equal_events() -> None:
    events = [
        TokenEvent("r1", (5, 6), "ab", None, 3),
        TokenEvent("r2", (), "", FinishReason.ABORT),
        TokenEvent("r1", (7,), "c", FinishReason.STOP),
    ]
    back = events_from_bytes(events_to_bytes(events))
    assert back == events
    assert all(type(ev) is TokenEvent for ev in back)  # events, not bare rows
    assert back[2].finish_reason is FinishReason.STOP and back[0].cached_prompt_tokens == 3
    assert events_from_bytes(events_to_bytes([])) == []
    for dumps in (pickle.dumps, cloudpickle.dumps):  # Ray's own pickling still works
        again = pickle.loads(dumps(events))
        assert again == events and type(again[0]) is TokenEvent


def test_rows_are_plain_tuples() -> None:
    # the wire carries no per-event pickling hook: rows unpickle without the class
    rows = pickle.loads(events_to_bytes([TokenEvent("r", (1,), "x")]))
    assert rows == [("r", (1,), "x", None, 0)] and type(rows[0]) is tuple


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
