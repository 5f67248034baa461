"""``kvrelay serve`` flags for the pool-sizing planner: parsed into ServeConfig, refused when not
> 0 at the command line and at the dataclass (the Python API's edge)."""

from __future__ import annotations

import argparse

import pytest

from kvrelay.cluster.runtime.config import ServeConfig, add_serve_arguments


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


def test_overlap_flag_reaches_the_config(tmp_path) -> None:
    assert _parse("--overlap-schedule").overlap_schedule is True
    assert _parse("--no-overlap-schedule").overlap_schedule is False
    assert _parse().overlap_schedule is None  # the engine decides by device
    f = tmp_path / "serve.yaml"
    f.write_text("overlap_schedule: false\n")
    assert _parse("--config", str(f)).overlap_schedule is False
    assert _parse("--config", str(f), "--overlap-schedule").overlap_schedule is True


def test_defaults_live_in_the_model_only() -> None:
    """A flag not given leaves the value to the model: the parser holds no default of its own."""
    assert _parse() == ServeConfig()
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    assert set(vars(p.parse_args([]))) == {"config"}


def test_file_then_flags(tmp_path) -> None:
    (tmp_path / "keys").write_text("k1\n\n k2 \n")
    f = tmp_path / "serve.yaml"
    f.write_text(
        "prefill_workers: 2\ndecode_workers: 3\nrouter: least_loaded\n"
        f"api_key_file: {tmp_path / 'keys'}\n"
        "router_weights:\n  prefix_weight: 3.0\n  queue_weight: 0.5\n"
    )
    cfg = _parse("--config", str(f), "--decode-workers", "4", "--api-key", "k0")
    assert (cfg.prefill_workers, cfg.decode_workers, cfg.router) == (2, 4, "least_loaded")
    assert cfg.router_weights == {"prefix_weight": 3.0, "queue_weight": 0.5}
    assert cfg.api_keys == ("k0", "k1", "k2")


def test_router_weights_reach_the_router() -> None:
    from kvrelay.cluster.routing.adapter import RoutingConfig, make_router

    cfg = ServeConfig(router_weights={"prefix_weight": 3.0, "tie_break": "random", "seed": 7})
    router = make_router(RoutingConfig(block_size=cfg.block_size, weights=cfg.router_weights))
    assert router.config.prefix_weight == 3.0 and router.config.seed == 7  # type: ignore[attr-defined]
    assert router.config.block_size == 16  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "prefill_workerz: 2\n",
            "unknown key 'prefill_workerz' \\(did you mean 'prefill_workers'\\?\\)",
        ),
        ("router_weights:\n  prefix_wieght: 1\n", "router_weights: unknown key 'prefix_wieght'"),
        ("router_weights:\n  block_size: 8\n", "unknown key 'block_size'"),
        ("router_weights:\n  prefix_weight: -1\n", "prefix_weight must be finite and >= 0"),
        ("device: tpu\n", "device: device must be auto, cpu or cuda"),
        ("policy: lifo\n", "policy: must be one of fcfs, priority, deadline, fair"),
        ("decode_workers: many\n", "decode_workers"),
        ("- 1\n", "expected a mapping"),
    ],
)
def test_bad_files_are_refused_naming_the_key(tmp_path, text: str, match: str) -> None:
    from kvrelay.cluster.runtime.config import ConfigError

    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        ServeConfig.load(f)


def test_unknown_field_in_python_is_refused() -> None:
    with pytest.raises(ValueError, match="prefil_workers"):
        ServeConfig(prefil_workers=1)  # type: ignore[call-arg]


def test_semi_pd_flags_and_file_reach_the_config(tmp_path) -> None:
    cfg = _parse(
        "--semi-pd",
        "--colocated-workers",
        "1",
        "--semi-pd-prefill-sm",
        "60",
        "--semi-pd-adaptive",
        "--semi-pd-window-s",
        "0.5",
        "--semi-pd-prefill-tokens",
        "2048",
        "--decode-seqs",
        "192",
        "--semi-pd-decode-overlap",
        "--semi-pd-prefill-overlap",
        "--semi-pd-first-token",
        "decode",
        "--semi-pd-decode-lock-first",
    )
    assert cfg.semi_pd and (cfg.semi_pd_prefill_sm, cfg.semi_pd_decode_sm) == (60, 100)
    assert cfg.semi_pd_adaptive and cfg.semi_pd_window_s == 0.5
    assert cfg.semi_pd_prefill_tokens == 2048 and cfg.semi_pd_decode_overlap
    assert cfg.decode_seqs == 192
    assert cfg.semi_pd_prefill_overlap and cfg.semi_pd_first_token == "decode"
    assert cfg.semi_pd_decode_lock_first
    path = tmp_path / "serve.yaml"
    path.write_text("semi_pd: true\ncolocated_workers: 2\nsemi_pd_decode_sm: 70\n")
    cfg = _parse("--config", str(path), "--semi-pd-prefill-sm", "30")
    assert (cfg.colocated_workers, cfg.semi_pd_prefill_sm, cfg.semi_pd_decode_sm) == (2, 30, 70)
    default = _parse()
    assert not default.semi_pd and not default.semi_pd_decode_overlap
    assert default.semi_pd_prefill_overlap and default.semi_pd_prefill_sm == 100
    assert default.semi_pd_first_token == "prefill" and not default.semi_pd_decode_lock_first
    assert default.decode_seqs == 256
    assert _parse("--no-semi-pd-prefill-overlap").semi_pd_prefill_overlap is False


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"semi_pd": True}, "set colocated_workers >= 1"),
        ({"semi_pd": True, "colocated_workers": 1, "semi_pd_prefill_sm": 0}, "1..100"),
        ({"semi_pd_decode_sm": 101}, "1..100"),
        ({"semi_pd_window_s": 0}, "must be > 0"),
        ({"semi_pd_prefill_tokens": 0}, "must be >= 1"),
        ({"decode_seqs": 0}, "must be >= 1"),
    ],
)
def test_semi_pd_settings_are_validated(values: dict, match: str) -> None:
    from kvrelay.cluster.runtime.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        ServeConfig.load(**values)


@pytest.mark.parametrize("field", ["handoff_timeout_s", "transfer_slack_s"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
def test_transfer_bounds_must_be_positive(field: str, value: float) -> None:
    from kvrelay.cluster.runtime.config import ConfigError

    with pytest.raises(ConfigError, match="must be > 0"):
        ServeConfig.load(**{field: value})
    assert getattr(ServeConfig.load(**{field: 0.5}), field) == 0.5


def test_sparse_flags_reach_the_engine_config(tmp_path) -> None:
    from kvrelay.cluster.runtime.actors import worker_engine_config

    cfg = _parse("--sparse-attention", "decode", "--sparse-budget", "1024",
                 "--sparse-shortlist-steps", "2")  # fmt: skip
    sparse = worker_engine_config(cfg).sparse
    assert sparse is not None
    assert (sparse.mode, sparse.budget, sparse.shortlist_steps) == ("decode", 1024, 2)
    assert _parse().sparse_shortlist_steps == 2
    assert worker_engine_config(_parse("--sparse-attention", "decode")).sparse.shortlist_steps == 2
    path = tmp_path / "serve.yaml"
    path.write_text("sparse_shortlist_steps: 4\n")
    assert _parse("--config", str(path)).sparse_shortlist_steps == 4


def test_a_served_engines_prefill_graphs_cover_its_chunk_budget() -> None:
    """Steps up to the chunk budget replay prefill graphs (captured at start): a step past
    the graphs' cap would run eagerly and compile its first shapes mid-run."""
    from kvrelay.cluster.runtime.actors import worker_engine_config
    from kvrelay.workers.engine.prefill_graphs import MAX_TOKENS

    assert worker_engine_config(_parse()).prefill_graph_tokens == MAX_TOKENS  # 512 a step
    big = worker_engine_config(_parse("--max-num-batched-tokens", "4096"))
    assert (big.max_num_batched_tokens, big.prefill_graph_tokens) == (4096, 4096)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"sparse_shortlist_steps": 0}, "must be >= 1"),
        ({"sparse_shortlist_steps": 17, "sparse_attention": "decode"}, "<= block_size"),
        ({"sparse_shortlist_steps": 9, "block_size": 8, "sparse_attention": "both"},
         "<= block_size"),
    ],
)  # fmt: skip
def test_sparse_shortlist_steps_are_validated(values: dict, match: str) -> None:
    from kvrelay.cluster.runtime.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        ServeConfig.load(**values)


def test_the_default_shortlist_binds_only_sparse_decode() -> None:
    """A block of one token takes the default shortlist (2 steps) only without sparse decode."""
    from kvrelay.cluster.runtime.config import ConfigError

    assert ServeConfig.load(block_size=1, sparse_attention="prefill").block_size == 1
    with pytest.raises(ConfigError, match="<= block_size"):
        ServeConfig.load(block_size=1, sparse_attention="decode")


def test_the_deadline_policy_gets_the_served_ttft_target() -> None:
    from kvrelay.cluster.runtime.actors import worker_engine_config
    from kvrelay.workers.engine.policy import DeadlinePolicy, make_policy

    ec = worker_engine_config(_parse("--policy", "deadline", "--ttft-slo-s", "0.5"))
    policy = make_policy(ec.policy, ec.ttft_slo_s)
    assert isinstance(policy, DeadlinePolicy) and policy.ttft_s == 0.5
    assert worker_engine_config(_parse()).policy == "fcfs"
