"""The GIL switch interval a semi-PD worker's process takes (workers/semi_pd/lanes.py): 0.5 ms
unless the process runs a shorter one, or exactly KVRELAY_SWITCH_INTERVAL_S; a bad value is
refused with the variable's name."""

from __future__ import annotations

import sys

import pytest

from kvrelay.workers.semi_pd.lanes import SWITCH_INTERVAL_S, switch_interval


def test_the_default_never_lengthens_the_processes_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KVRELAY_SWITCH_INTERVAL_S", raising=False)
    old = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        assert switch_interval() == SWITCH_INTERVAL_S == 0.0005
        sys.setswitchinterval(0.0001)
        assert switch_interval() == pytest.approx(0.0001)
    finally:
        sys.setswitchinterval(old)


def test_the_variable_sets_it_exactly_and_a_bad_one_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KVRELAY_SWITCH_INTERVAL_S", "0.005")
    assert switch_interval() == 0.005  # longer than the default: an A/B's other arm
    for bad in ("0", "-1", "2", "fast", "nan"):
        monkeypatch.setenv("KVRELAY_SWITCH_INTERVAL_S", bad)
        with pytest.raises(ValueError, match="KVRELAY_SWITCH_INTERVAL_S"):
            switch_interval()
