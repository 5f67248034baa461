"""``kvrelay serve`` flags for the pool-sizing planner: parsed into ServeConfig, refused when not
> 0 at the command line and at the dataclass (the Python API's edge)."""

from __future__ import annotations

import argparse

import pytest

from kvrelay.cluster.runtime.serve import ServeConfig, add_serve_arguments


def _parse(*argv: str) -> ServeConfig:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_serve_arguments(p)
    return ServeConfig.from_args(p.parse_args(list(argv)))


def test_autosize_flags_reach_the_config() -> None:
    cfg = _parse("--auto-pool-sizing", "--autosize-interval-s", "2.5", "--autosize-window-s", "15")
    assert cfg.auto_pool_sizing
    assert (cfg.autosize_interval_s, cfg.autosize_window_s) == (2.5, 15.0)
    default = _parse()
    assert (default.autosize_interval_s, default.autosize_window_s) == (10.0, 60.0)


@pytest.mark.parametrize("flag", ["--autosize-interval-s", "--autosize-window-s"])
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_autosize_flags_must_be_positive(flag: str, value: str) -> None:
    with pytest.raises(argparse.ArgumentError, match="must be > 0"):
        _parse(flag, value)


@pytest.mark.parametrize("field", ["autosize_interval_s", "autosize_window_s"])
def test_config_refuses_non_positive_autosize_times(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ServeConfig(**{field: 0.0})


def test_device_flags_reach_the_config_and_bad_values_are_refused() -> None:
    cfg = _parse("--device", "cuda", "--dtype", "float32", "--gpus-per-worker", "0.5")
    assert (cfg.device, cfg.dtype, cfg.gpus_per_worker) == ("cuda", "float32", 0.5)
    default = _parse()
    assert (default.device, default.dtype, default.gpus_per_worker) == ("auto", "auto", None)
    with pytest.raises(argparse.ArgumentError):
        _parse("--device", "tpu")
    with pytest.raises(ValueError, match="device"):
        ServeConfig(device="gpu")
    with pytest.raises(ValueError, match="gpus_per_worker"):
        ServeConfig(gpus_per_worker=0.0)
