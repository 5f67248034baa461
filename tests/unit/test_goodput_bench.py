"""goodput_bench's table over repeated sweeps, from fabricated per-repeat loadgen reports:
every repeat's cell, the SLO spread, the median goodput and the ratios drawn from it."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from kvrelay.benchmarks.goodput_bench import (
    configs,
    delivery_line,
    lane_line,
    linear_flops,
    loadgen_argv,
)
from kvrelay.benchmarks.goodput_report import NAMES, cells, config_name, describe, render
from kvrelay.cluster.runtime.config import ServeConfig

ONE = dict(prefill_workers=0, decode_workers=0, colocated_workers=1)
CFGS = {
    "semi_pd": ServeConfig(**ONE, semi_pd=True, semi_pd_adaptive=True),  # type: ignore[arg-type]
    "colocated1": ServeConfig(**ONE),  # type: ignore[arg-type]
}


def _args(repeats: int) -> argparse.Namespace:
    return argparse.Namespace(
        workers=1, ttft_slo=1.0, itl_slo=0.05, num_requests=60, max_prompt_tokens=8192,
        max_output_tokens=128, long_fraction=0.2, long_prompt_range="1024,7936",
        long_output_tokens=16, repeats=repeats, autosize_interval_s=2.0, autosize_window_s=10.0,
        sweep="32,64", run_timeout=120.0, seed=0, max_context=8192, fresh_prompts=False,
        duration_s=None, min_output_tokens=1, matmul_tflops=None, linear_flops=None,
    )  # fmt: skip


def _run(slo: tuple[float, float], ttft: tuple[float, float], itl: tuple[float | None, float],
         goodput: float, end: float) -> dict[str, Any]:  # fmt: skip
    """One repeat's loadgen sweep report (rates 32 and 64), as loadgen's JSON holds it."""

    def summary(i: int) -> dict[str, Any]:
        itl_s = None if itl[i] is None else {"p50": 0.0, "p90": 0.0, "p99": itl[i]}
        return {"slo_attainment": slo[i], "ttft_s": {"p99": ttft[i]}, "itl_s": itl_s}

    return {
        "mode": "sweep",
        "runs": {"32": {"all": summary(0)}, "64": {"all": summary(1)}},
        "goodput_rps": {"all": goodput},
        "rate_ends_s": {"32": end, "64": end + 10},
    }


def _config(*runs: dict[str, Any]) -> dict[str, Any]:
    return {"repeats": list(runs), "role_switches": [], "roles_before": {}, "roles_after": {}}


def test_repeats_are_tabled_with_their_spread_and_median() -> None:
    reps = {
        "semi_pd": _config(
            _run((0.95, 0.80), (0.50, 0.90), (0.040, 0.060), 32, 10),
            _run((0.90, 0.92), (0.60, 0.70), (0.045, 0.048), 64, 40),
            _run((1.00, 0.91), (0.40, 0.80), (0.038, 0.049), 32, 70),
        ),
        "colocated1": _config(
            _run((0.85, 0.50), (1.50, 3.00), (None, 0.200), 0, 10),
            _run((0.91, 0.60), (0.90, 2.00), (0.090, 0.100), 32, 40),
            _run((0.92, 0.40), (0.80, 2.50), (0.080, 0.120), 32, 70),
        ),
    }
    text = render(reps, CFGS, _args(3), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), 100.0)
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in text.splitlines()}
    assert rows["| 32"] == [
        "95 / 90 / 100 (90–100)", "85 / 91 / 92 (85–92)",  # SLO % of each repeat, min–max
        "0.50 / 0.60 / 0.40", "1.50 / 0.90 / 0.80",  # TTFT p99 s
        "40 / 45 / 38", "nan / 90 / 80 |",  # ITL p99 ms; no gap measured -> nan
    ]  # fmt: skip
    assert rows["| 64"][:2] == ["80 / 92 / 91 (80–92)", "50 / 60 / 40 (40–60)"]
    assert "3 sweeps per configuration" in text and "20% long prompts of 1024,7936" in text
    assert (
        "goodput req/s (median of the repeats): semi_pd 32 (repeats 32 / 64 / 32), "
        "colocated1 32 (repeats 0 / 32 / 32)"
    ) in text
    assert "goodput semi_pd/colocated1: 1.00" in text
    assert "[semi_pd] repeat 3 rate runs ended: 32 req/s at 70 s, 64 req/s at 80 s" in text
    assert "semi-PD start split 100/100, SLO-aware split every 1 s" in text
    assert "[semi_pd] the SM split rule kept 100/100 throughout" in text


def test_split_changes_are_placed_on_the_sweep() -> None:
    run = _run((0.95, 0.90), (0.50, 0.90), (0.040, 0.060), 64, 10)
    change = {
        "t_s": 12.5, "old": [100, 100], "new": [100, 90], "reason": "TTFT 1.400 s > 1.000 s",
        "ttft_s": 1.4, "tpot_s": 0.004, "arrival_rate": 31.0, "worker": "c-1",
    }  # fmt: skip
    reps = {"semi_pd": {**_config(run), "split_changes": [change]}, "colocated1": _config(run)}
    text = render(reps, CFGS, _args(1), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), 100.0)
    assert (
        "[semi_pd] SM split at 12.5 s: 100/100 -> 100/90 (TTFT 1.400 s > 1.000 s; window "
        "TTFT p90 1.40 s, TPOT p90 4.0 ms, 31.0 req/s)"
    ) in text
    assert "kept" not in text


def test_one_repeat_reads_as_before() -> None:
    reps = {
        "semi_pd": _config(_run((0.95, 0.90), (0.50, 0.90), (0.040, 0.060), 64, 10)),
        "colocated1": _config(_run((0.85, 0.50), (1.50, 3.00), (0.07, 0.200), 0, 10)),
    }
    text = render(reps, CFGS, _args(1), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), 100.0)
    assert "| 32 | 95 | 85 | 0.50 | 1.50 | 40 | 70 |" in text
    assert "goodput req/s: semi_pd 64 (top of sweep: a lower bound), colocated1 0" in text
    assert "goodput semi_pd/colocated1: n/a (colocated1 goodput 0)" in text
    assert "[semi_pd] rate runs ended: 32 req/s at 10 s, 64 req/s at 20 s" in text
    assert "sweeps per configuration" not in text and "median" not in text


def test_cells_and_the_repeats_prompts() -> None:
    assert cells([1.0], ".0f", spread=True) == "1"
    assert cells([3.0, 1.0, 2.0], ".1f", spread=True) == "3.0 / 1.0 / 2.0 (1.0–3.0)"
    assert cells([3.0, 1.0], ".1f") == "3.0 / 1.0"
    # repeat 0 is the plain sweep; later ones draw other prompt words (nothing cached to hit)
    argv = [loadgen_argv("u", _args(3), "o.json", r) for r in range(3)]  # type: ignore[arg-type]
    assert "--prompt-seed" not in argv[0]
    seeds = [a[a.index("--prompt-seed") + 1] for a in argv[1:]]
    assert len(set(seeds)) == 2 and "0" not in seeds
    assert all(a[: a.index("--max-context")] == argv[0][: argv[0].index("--max-context")]
               for a in argv)  # fmt: skip
    assert "--fresh-prompts" not in argv[0]
    fresh = argparse.Namespace(**{**vars(_args(1)), "fresh_prompts": True})
    assert "--fresh-prompts" in loadgen_argv("u", fresh, "o.json")  # type: ignore[arg-type]
    # --min-output-tokens reaches loadgen only when set (the older command lines stay as they were)
    assert "--min-output-tokens" not in argv[0]
    floor = argparse.Namespace(**{**vars(_args(1)), "min_output_tokens": 64})
    floored = loadgen_argv("u", floor, "o.json")  # type: ignore[arg-type]
    assert floored[floored.index("--min-output-tokens") + 1] == "64"
    # --duration-s: each rate's arrivals of its first N seconds, however many that is
    assert argv[0][argv[0].index("--num-requests") + 1] == "60" and "--duration" not in argv[0]
    timed = loadgen_argv("u", argparse.Namespace(**{**vars(_args(1)), "duration_s": 10.0}), "o")
    assert "--num-requests" not in timed and timed[timed.index("--duration") + 1] == "10.0"


def test_a_configuration_takes_its_tokens_a_step_and_the_strongest_colocated1_is_named() -> None:
    assert config_name("colocated1") == ("colocated1", None, None, None, None)
    assert config_name("colocated1@2048") == ("colocated1", 2048, None, None, None)
    assert config_name("semi_pd_poverlap%90") == ("semi_pd_poverlap", None, 90, None, None)
    assert config_name("semi_pd@1024%100") == ("semi_pd", 1024, 100, None, None)
    assert config_name("colocated1@2048:256") == ("colocated1", 2048, None, 256, None)
    assert config_name("semi_pd%90:128") == ("semi_pd", None, 90, 128, None)
    assert config_name("colocated1@2048/deadline") == ("colocated1", 2048, None, None, "deadline")
    assert config_name("semi_pd:128/fair") == ("semi_pd", None, None, 128, "fair")
    for bad in ("colocated2", "colocated1@", "colocated1@x", "colocated1@8", "semi_pd@70000",
                "colocated1%90", "semi_pd%", "semi_pd%0", "semi_pd%101", "colocated1:",
                "colocated1@2048:0", "colocated1:x", "colocated1:9999", "semi_pd/", "semi_pd/edf",
                "colocated1/deadline:64"):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError):
            config_name(bad)
    ns = argparse.Namespace(**{
        **vars(_args(1)), "configs": "colocated1,colocated1@4096,semi_pd@1024,semi_pd%90,semi_pd_plain",
        "model": None,
        "device": "cpu", "dtype": "auto", "kv_cache_gb": 1.0, "threads_per_worker": 1,
        "workers": 2, "pd_split": "1,1", "planner_start": "1,1", "semi_pd_start": "75,100",
        "semi_pd_fixed_split": "50,100", "semi_pd_fixed_tokens": None, "semi_pd_fixed": True,
        "max_num_seqs": 256,
    })  # fmt: skip
    cfgs = configs(ns)
    assert [c.max_num_batched_tokens for c in cfgs.values()] == [512, 4096, 1024, 512, 512]
    assert [c.semi_pd_prefill_sm for c in cfgs.values()][2:4] == [75, 90]  # --semi-pd-start's, then %90
    # semi_pd is the serving default (its prefill lane overlapped), semi_pd_plain neither lane
    assert cfgs["semi_pd@1024"].semi_pd_prefill_overlap and not cfgs["semi_pd_plain"].semi_pd_prefill_overlap
    both = configs(argparse.Namespace(**{**vars(ns), "configs": "semi_pd_both%100"}))
    (one,) = both.values()
    assert one.semi_pd_decode_overlap and one.semi_pd_prefill_overlap and one.semi_pd_prefill_sm == 100
    assert {c.max_num_seqs for c in cfgs.values()} == {256}
    pol = configs(argparse.Namespace(**{**vars(ns), "configs": "colocated1@2048/deadline,semi_pd"}))
    assert [c.policy for c in pol.values()] == ["deadline", "fcfs"]
    assert "deadline policy" in describe("colocated1@2048/deadline", pol["colocated1@2048/deadline"])
    seqs = configs(argparse.Namespace(**{**vars(ns), "configs": "colocated1@2048:128,semi_pd"}))
    assert [(c.max_num_batched_tokens, c.max_num_seqs) for c in seqs.values()] == [(2048, 128), (512, 256)]
    # every name --configs accepts builds (and the semi-PD ITL options reach the config)
    every = configs(argparse.Namespace(**{**vars(ns), "configs": ",".join(NAMES)}))
    assert list(every) == list(NAMES)
    ftd = every["semi_pd_ftd_lockf"]
    assert ftd.semi_pd_first_token == "decode" and ftd.semi_pd_decode_lock_first
    assert every["semi_pd_ftd"].semi_pd_first_token == "decode"
    assert every["semi_pd_lockf"].semi_pd_decode_lock_first
    assert every["semi_pd"].semi_pd_first_token == "prefill"
    assert cfgs["colocated1@4096"].colocated_workers == 1 and cfgs["semi_pd@1024"].semi_pd
    # the ratio against the best chunk budget, not the default one
    three = {"colocated1": CFGS["colocated1"], "colocated1@4096": cfgs["colocated1@4096"],
             "semi_pd": CFGS["semi_pd"]}  # fmt: skip
    reps = {
        "colocated1": _config(_run((0.95, 0.50), (0.5, 3.0), (0.02, 0.05), 32, 10)),
        "colocated1@4096": _config(_run((0.95, 0.95), (0.5, 0.9), (0.03, 0.04), 64, 10)),
        "semi_pd": _config(_run((0.95, 0.95), (0.4, 0.8), (0.02, 0.03), 64, 10)),
    }
    for rate, run in reps["semi_pd"]["repeats"][0]["runs"].items():  # 40k / 80k prompt tok/s
        run["all"].update(total_tokens_per_s=1250.0 * float(rate) + 500, output_tokens_per_s=500)
    args = _args(1)
    args.matmul_tflops, args.linear_flops = 100.0, 1e9  # a ceiling of 100k prompt tokens/s
    text = render(reps, three, args, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), 100.0)
    assert "of the matmul ceiling 100k tok/s: 100 TFLOP/s / 1.00 GFLOP a token" in text
    assert "| 64 req/s | 0.0k (0.00) | 0.0k (0.00) | 80.0k (0.80) |" in text
    assert "strongest colocated1: colocated1@4096 (64 req/s)" in text
    assert "goodput semi_pd/colocated1@4096: 1.00" in text
    assert "goodput semi_pd/colocated1: 2.00" in text
    assert "ITL p99 semi_pd/colocated1@4096 at 64 req/s (medians): 30.0 / 40.0 ms = 0.75" in text
    assert "ITL p99 ms by gap" not in text  # reports from before loadgen split the gaps
    for n, run in reps.items():  # first gap (the handoff) and later gaps, as loadgen now splits
        for rate, cell in run["repeats"][0]["runs"].items():
            first = 0.09 if n == "semi_pd" else cell["all"]["itl_s"]["p99"]
            cell["all"].update(itl_first_s={"p99": first}, itl_later_s={"p99": 0.01 * int(rate) / 32})
    text = render(reps, three, args, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), 100.0)
    assert "| 64 req/s | 50 / 20 | 40 / 20 | 90 / 20 |" in text
    assert "colocated1@4096: colocated x1, 4096 tokens a step" in text
    # the linear layers' FLOPs a token from a config.json: 2 x (2h^2 + 2h.kv + 3h.i) x L
    assert linear_flops(None) is None


def test_linear_flops_reads_the_models_config(tmp_path: Any) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2,
    }))  # fmt: skip
    h, kv, i = 64, 2 * 16, 128
    assert linear_flops(str(tmp_path)) == 2 * 2 * (2 * h * h + 2 * h * kv + 3 * h * i)
    assert linear_flops(str(tmp_path / "absent")) is None


def test_a_lane_line_gives_each_phase_its_cpu_share_where_recorded() -> None:
    phase = {"p50_ms": 4.9, "p99_ms": 11.6, "max_ms": 15.2, "count": 302.0}
    times = {"w": {"prefill": {"schedule": {**phase, "cpu_share": 0.4}, "lock_wait": phase},
                   "decode": {"step": {**phase, "cpu_share": 0.93}}}}  # fmt: skip
    line = lane_line("semi_pd", "128", times)
    assert line.startswith("[semi_pd] lane times ms p50/p99/max (n) at rate 128: w decode: ")
    assert "step 4.9/11.6/15 (302, cpu 93%)" in line
    assert "schedule 4.9/11.6/15 (302, cpu 40%)" in line and "lock_wait 4.9/11.6/15 (302)" in line


def test_a_delivery_line_walks_the_hops_in_a_tokens_order() -> None:
    phase = {"p50_ms": 0.4, "p99_ms": 6.3, "max_ms": 12.0, "count": 80.0}
    times = {"workers": {"w1": {"outbox_wait": phase, "sink_call": phase, "eager_decode": phase}},
             "controller": {"stream_wait": phase, "from_worker": phase},
             "driver": {"inbox_wait": phase}, "driver_gc": {}}  # fmt: skip
    line = delivery_line("c1", "128", times)
    assert line == (
        "[c1] delivery ms p50/p99/max (n) at rate 128: "
        "w1: outbox_wait 0.4/6.3/12 (80), sink_call 0.4/6.3/12 (80), eager_decode 0.4/6.3/12 (80); "
        "controller: from_worker 0.4/6.3/12 (80), stream_wait 0.4/6.3/12 (80); "
        "driver: inbox_wait 0.4/6.3/12 (80)"
    )
