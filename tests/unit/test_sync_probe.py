"""benchmarks/sync_probe.py: its CPU dry run puts the engine under eviction pressure in every
way and agrees on the tokens; a synchronising call is booked to the phase it ran in, at the
innermost line of ours that made it (the CUDA probe itself runs in tests/gpu's call)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from kvrelay.benchmarks.sync_probe import SyncSites, main


def test_a_sync_is_booked_to_its_phase_at_our_innermost_line() -> None:
    sites = SyncSites()
    sites.showwarning("called a synchronizing CUDA operation", UserWarning, "torch.py", 1)
    assert not sites.sites  # outside every probed phase
    with sites.probing("schedule", on=False):
        sites.showwarning("called a synchronizing CUDA operation", UserWarning, "torch.py", 1)
        sites.showwarning("some other warning", UserWarning, "torch.py", 1)
        other = threading.Thread(
            target=sites.showwarning,
            args=("called a synchronizing CUDA operation", UserWarning, "torch.py", 1),
        )
        other.start()  # a copier thread's wait is its own, not the phase's
        other.join()
    ((site, n),) = sites.sites["schedule"].items()
    assert (
        n == 1
        and site.startswith("test_sync_probe.py:")
        and site.endswith("test_a_sync_is_booked_to_its_phase_at_our_innermost_line")
    )


def test_the_dry_run_demotes_in_every_way_with_the_same_tokens(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "probe.json"
    assert (
        main(
            [
                "--model",
                str(tiny_model_dir),
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--requests",
                "30",
                "--prompt-range",
                "64,256",
                "--chunk",
                "256",
                "--kv-cache-gb",
                "0.0002",
                "--cpu-kv-gb",
                "0.0002",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ways = json.loads(out.read_text())["ways"]
    assert [(w["overlap"], w["ordered"]) for w in ways] == [
        (False, False),
        (False, True),
        (True, False),
        (True, True),
    ]
    assert all(w["demoted_blocks"] > 0 and w["steps"] > 30 for w in ways)
    assert all({"schedule", "commit", "launch", "sample"} <= set(w["phases"]) for w in ways)
    assert all(w["same_tokens"] == 30 for w in ways[1:])  # fp32 on the host: no swap timing
