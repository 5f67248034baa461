"""benchmarks/demotion_copies.py: under a prefill lane's load the CPU tier's demotions copy in
about one call each (host block ids in order), and the pools stay consistent."""

from __future__ import annotations

from kvrelay.benchmarks.demotion_copies import run


def test_demotions_copy_in_about_one_call_each() -> None:
    r = run(steps=120, device_blocks=600, cpu_blocks=150, seed=0)
    assert r["demotions"] > 20 and r["demoted_blocks"] > 200
    # the code before: 21 calls a demotion (median), 0.79 a block; now 2 and 0.05
    assert r["calls_median"] <= 3 and r["calls_per_block"] < 0.2
