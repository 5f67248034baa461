"""goodput_bench's configuration names and its report: the table of each repeat's SLO
attainment, TTFT and ITL p99 per rate, the served prompt tokens against the matmul ceiling, the
goodputs and their ratios (benchmarks/goodput_bench.py runs the sweeps)."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import Any

from kvrelay.cluster.runtime.config import POLICIES, ServeConfig

NAMES = ("pd", "colocated", "planner", "pd_start", "semi_pd", "colocated1", "semi_pd_first",
         "semi_pd_plain", "semi_pd_overlap", "semi_pd_poverlap", "semi_pd_both", "semi_pd_fixed",
         "semi_pd_ftd", "semi_pd_lockf", "semi_pd_ftd_lockf")


def config_name(text: str) -> tuple[str, int | None, int | None, int | None, str | None]:
    """``NAME[@TOKENS][%SHARE][:SEQS][/POLICY]``: a configuration of NAMES, with TOKENS its engines'
    ``max_num_batched_tokens`` (the chunked-prefill budget a step; default 512) — so that the
    colocated baseline can be swept to its strongest chunk (``colocated1@2048``) beside a semi-PD
    prefill lane that takes ``semi_pd_prefill_tokens`` a step — SHARE a semi-PD
    configuration's prefill SM share, percent (``semi_pd_poverlap%90``; its decode share stays
    ``--semi-pd-start``'s), so that shares can be compared in one sweep, and SEQS its engines'
    ``max_num_seqs`` (``colocated1@2048:256``; default ``--max-num-seqs``): a semi-PD decode
    lane adopts every request handed over (up to ``decode_seqs`` in its graphs), where
    a colocated engine admits ``max_num_seqs``, so the baseline is swept over it too, and POLICY
    its engines' scheduling policy (``semi_pd/deadline``; default fcfs), so that a policy is
    compared on both sides in one sweep."""
    text, slash, policy = text.partition("/")
    if slash and policy not in POLICIES:
        raise argparse.ArgumentTypeError(f"--configs: POLICY {policy!r} is not one of {POLICIES}")
    head, colon, seqs = text.partition(":")
    if colon and (not seqs.isdigit() or not 1 <= int(seqs) <= 4096):
        raise argparse.ArgumentTypeError(f"--configs {text!r}: SEQS must be in 1..4096")
    rest, pct, share = head.partition("%")
    name, at, tokens = rest.partition("@")
    if name not in NAMES:
        raise argparse.ArgumentTypeError(f"--configs: {name!r} is not one of {NAMES}")
    if at and (not tokens.isdigit() or not 16 <= int(tokens) <= 65536):
        raise argparse.ArgumentTypeError(f"--configs {text!r}: TOKENS must be in 16..65536")
    if pct and (not name.startswith("semi_pd") or not share.isdigit()
                or not 1 <= int(share) <= 100):  # fmt: skip
        raise argparse.ArgumentTypeError(
            f"--configs {text!r}: %SHARE is a semi-PD prefill share in 1..100")
    return (name, int(tokens) if at else None, int(share) if pct else None,
            int(seqs) if colon else None, policy if slash else None)


def describe(name: str, cfg: ServeConfig) -> str:
    policy = "" if cfg.policy == "fcfs" else f", {cfg.policy} policy"
    return _describe(name, cfg) + policy


def _describe(name: str, cfg: ServeConfig) -> str:
    if cfg.semi_pd:
        overlapped = (("decode", cfg.semi_pd_decode_overlap),
                      ("prefill", cfg.semi_pd_prefill_overlap))
        lane = "".join(f", overlapped {which} lane" for which, on in overlapped if on)
        if cfg.semi_pd_first_token == "decode":
            lane += ", first tokens sent by the decode lane"
        if cfg.semi_pd_decode_lock_first:
            lane += ", storage lock decode first"
        rule = "SLO-aware from" if cfg.semi_pd_adaptive else "fixed at"
        return (f"semi-PD x{cfg.colocated_workers} (one KV storage, SM split {rule} "
                f"{cfg.semi_pd_prefill_sm}/{cfg.semi_pd_decode_sm}, prefill lane "
                f"{cfg.semi_pd_prefill_tokens} tokens a step{lane})")
    if cfg.colocated_workers:
        return (f"{name}: colocated x{cfg.colocated_workers}, {cfg.max_num_batched_tokens} "
                f"tokens a step, {cfg.max_num_seqs} sequences")
    tail = " + planner" if cfg.auto_pool_sizing else ""
    return f"{name}: {cfg.prefill_workers}P+{cfg.decode_workers}D{tail}"


def semi_pd_rule(cfgs: dict[str, ServeConfig]) -> str:
    """The semi-PD settings the table's semi-PD configurations ran with (the first's)."""
    semi = [c for c in cfgs.values() if c.semi_pd]
    if not semi:
        return ""
    c = semi[0]
    rule = f", SLO-aware split every {c.semi_pd_window_s:g} s" if c.semi_pd_adaptive else ""
    return (f"; semi-PD start split {c.semi_pd_prefill_sm}/{c.semi_pd_decode_sm}{rule}, "
            f"prefill lane {c.semi_pd_prefill_tokens} tokens per step")


def outputs_floor(args: argparse.Namespace) -> str:
    least = args.min_output_tokens
    return f" (chat outputs >= {least})" if least > 1 else ""


def per_rate(args: argparse.Namespace) -> str:
    if args.duration_s is None:
        return f"{args.num_requests} requests per rate"
    return f"each rate's arrivals of its first {args.duration_s:g} s"


def long_mix(args: argparse.Namespace) -> str:
    if not args.long_fraction:
        return ""
    return (f", {100 * args.long_fraction:g}% long prompts of {args.long_prompt_range} tokens "
            f"(outputs < {args.long_output_tokens}) in bursts of 2-4")


def cells(values: Sequence[float], fmt: str, spread: bool = False) -> str:
    """One table cell: each repeat's value ("a / b / c"), then "(min–max)" if ``spread``."""
    text = " / ".join(format(v, fmt) for v in values)
    if spread and len(values) > 1:
        text += f" ({format(min(values), fmt)}–{format(max(values), fmt)})"
    return text


def prompt_rate_table(reps: dict[str, dict[str, Any]], names: list[str], rates: list[str],
                      args: argparse.Namespace) -> list[str]:
    """Prompt tokens a second each configuration served (loadgen's total less its output
    tokens, median of the repeats), as a fraction of the GPU's matmul ceiling for them when
    known (``args.matmul_tflops`` / ``args.linear_flops``): the physical limit beside the
    figure — prefill-heavy loads are bound by it, not by the request rate."""
    tflops, per_token = args.matmul_tflops, args.linear_flops  # set by main()
    ceiling = tflops * 1e12 / per_token if tflops and per_token else None
    head = "served prompt tokens/s" + (", median of the repeats" if len(reps[names[0]]["repeats"]) > 1 else "")
    if ceiling:
        head += (f" (of the matmul ceiling {ceiling / 1e3:.0f}k tok/s: {tflops:.0f} TFLOP/s / "
                 f"{per_token / 1e9:.2f} GFLOP a token in the linear layers)")
    out = [head, "| rate | " + " | ".join(names) + " |", "| ---: " * (1 + len(names)) + "|"]
    for rate in rates:
        row = []
        for n in names:
            tok = statistics.median(
                float(run["runs"][rate]["all"].get("total_tokens_per_s") or 0.0)
                - float(run["runs"][rate]["all"].get("output_tokens_per_s") or 0.0)
                for run in reps[n]["repeats"]
            )
            row.append(f"{tok / 1e3:.1f}k" + (f" ({tok / ceiling:.2f})" if ceiling else ""))
        out.append(f"| {rate} req/s | " + " | ".join(row) + " |")
    return out


def gap_table(reps: dict[str, dict[str, Any]], names: list[str], rates: list[str]) -> list[str]:
    """ITL p99 split by where the gap falls (median of the repeats): each request's first gap
    (its first to second token: a semi-PD or PD request's handoff to decode) and its later
    gaps (steady decode). Empty for reports from before loadgen split them."""
    if "itl_first_s" not in reps[names[0]]["repeats"][0]["runs"][rates[0]]["all"]:
        return []

    def p99_ms(n: str, rate: str, key: str) -> str:
        vals = [run["runs"][rate]["all"][key] for run in reps[n]["repeats"]]
        got = [1e3 * float(v["p99"]) for v in vals if v is not None and v["p99"] is not None]
        return f"{statistics.median(got):.0f}" if got else "nan"

    out = ["ITL p99 ms by gap, first (the handoff to decode) / later (median of the repeats)",
           "| rate | " + " | ".join(names) + " |", "| ---: " * (1 + len(names)) + "|"]
    for rate in rates:
        row = [f"{p99_ms(n, rate, 'itl_first_s')} / {p99_ms(n, rate, 'itl_later_s')}"
               for n in names]
        out.append(f"| {rate} req/s | " + " | ".join(row) + " |")
    return ["", *out]


def render(reps: dict[str, dict[str, Any]], cfgs: dict[str, ServeConfig],
           args: argparse.Namespace, l0: Sequence[float], l1: Sequence[float],
           wall: float) -> str:
    """The table: per rate and configuration, every repeat's SLO attainment (and its min–max),
    TTFT p99 and ITL p99; then each repeat's goodput and their median (the lower one of an even
    count: a rate that was swept), which the ratios use."""
    def g(n: str, rate: str, key: str) -> list[float]:
        out = []
        for run in reps[n]["repeats"]:
            s = run["runs"][rate]["all"]
            if key == "slo":
                out.append(100 * float(s["slo_attainment"]))
            else:
                out.append(float("nan") if s[key] is None or s[key]["p99"] is None
                           else float(s[key]["p99"]))
        return out

    names = list(reps)
    times = (f"; {args.repeats} sweeps per configuration (cells: each sweep's value, then the "
             f"SLO's min–max)" if args.repeats > 1 else "")
    lines = [
        f"goodput_bench: {args.workers} workers per configuration "
        f"({'; '.join(describe(n, cfgs[n]) for n in names)}); SLOs TTFT <= {args.ttft_slo} s, "
        f"ITL <= {args.itl_slo} s; {per_rate(args)}, Gamma shape 0.5, "
        f"prompts <= {args.max_prompt_tokens}, outputs <= {args.max_output_tokens} tokens"
        f"{outputs_floor(args)} "
        f"(Zipf 1.1){long_mix(args)}{times}; planner interval {args.autosize_interval_s} s, "
        f"window {args.autosize_window_s} s{semi_pd_rule(cfgs)}",
        f"load average start {l0[0]:.2f} {l0[1]:.2f} {l0[2]:.2f}, end {l1[0]:.2f} {l1[1]:.2f} "
        f"{l1[2]:.2f}; wall {wall:.0f} s",
        "",
        "| rate req/s | " + " | ".join(f"{n} SLO %" for n in names) + " | "
        + " | ".join(f"{n} TTFT p99 s" for n in names) + " | "
        + " | ".join(f"{n} ITL p99 ms" for n in names) + " |",
        "| ---: " * (1 + 3 * len(names)) + "|",
    ]
    rates = list(reps[names[0]]["repeats"][0]["runs"])
    for rate in rates:
        row = [cells(g(n, rate, "slo"), ".0f", spread=True) for n in names]
        row += [cells(g(n, rate, "ttft_s"), ".2f") for n in names]
        row += [cells([1e3 * v for v in g(n, rate, "itl_s")], ".0f") for n in names]
        lines.append(f"| {rate} | " + " | ".join(row) + " |")
    lines += ["", *prompt_rate_table(reps, names, rates, args), *gap_table(reps, names, rates)]
    each = {n: [float(run["goodput_rps"]["all"]) for run in reps[n]["repeats"]] for n in names}
    gp = {n: statistics.median_low(v) for n, v in each.items()}  # a rate that was swept
    top = max(float(r) for r in rates)

    def told(n: str) -> str:
        text = f"{n} {gp[n]:g}"
        if len(each[n]) > 1:
            text += f" (repeats {cells(each[n], 'g')})"
        return text + (" (top of sweep: a lower bound)" if gp[n] >= top else "")

    median = " (median of the repeats)" if args.repeats > 1 else ""
    lines += ["", f"goodput req/s{median}: " + ", ".join(told(n) for n in names)]
    for a, b in (("pd", "colocated"), ("planner", "colocated"), ("planner", "pd"),
                 ("planner", "pd_start"), ("semi_pd", "colocated1"), ("semi_pd", "colocated"),
                 ("semi_pd_first", "colocated1"), ("semi_pd_first", "semi_pd"),
                 ("semi_pd_overlap", "colocated1"), ("semi_pd_overlap", "semi_pd"),
                 ("semi_pd_poverlap", "colocated1"), ("semi_pd_poverlap", "semi_pd"),
                 ("semi_pd_fixed", "colocated1")):
        if a in gp and b in gp:
            lines.append(f"goodput {a}/{b}: "
                         + (f"{gp[a] / gp[b]:.2f}" if gp[b] else f"n/a ({b} goodput 0)"))
    # the baseline issue 16 names is the strongest colocated1 chunk budget swept, not the default
    ones = [n for n in names if config_name(n)[0] == "colocated1"]
    if ones and ones != ["colocated1"]:
        best = max(ones, key=lambda n: gp[n])  # the first listed of equals
        lines.append(f"strongest colocated1: {best} ({gp[best]:g} req/s)")
        # its goodput rate: where the ITL goal (p99 <= 0.5x of it) is read
        at = next((r for r in rates if float(r) == gp[best]), None)
        for n in names:
            if not cfgs[n].semi_pd:
                continue
            lines.append(f"goodput {n}/{best}: "
                         + (f"{gp[n] / gp[best]:.2f}" if gp[best] else "n/a (goodput 0)"))
            if at is not None:
                mine, theirs = (statistics.median(g(m, at, "itl_s")) for m in (n, best))
                lines.append(f"ITL p99 {n}/{best} at {at} req/s (medians): "
                             f"{1e3 * mine:.1f} / {1e3 * theirs:.1f} ms = {mine / theirs:.2f}")
    for n in names:
        for r, run in enumerate(reps[n]["repeats"]):
            ends = ", ".join(f"{rate} req/s at {t:g} s" for rate, t in run["rate_ends_s"].items())
            which = f" repeat {r + 1}" if args.repeats > 1 else ""
            lines.append(f"[{n}]{which} rate runs ended: {ends}")
        for s in reps[n]["role_switches"]:
            lines.append(f"[{n}] role switch at {s['t_s']:g} s: {s['worker']} "
                         f"{s['from']} -> {s['to']}")
        if cfgs[n].auto_pool_sizing and not reps[n]["role_switches"]:
            lines.append(f"[{n}] the planner made no role switch")
        changes = reps[n].get("split_changes", [])
        for c in changes:
            (x0, y0), (x1, y1) = c["old"], c["new"]
            lines.append(
                f"[{n}] SM split at {c['t_s']:g} s: {x0}/{y0} -> {x1}/{y1} ({c['reason']}; window "
                f"TTFT p90 {c['ttft_s']:.2f} s, TPOT p90 {1e3 * c['tpot_s']:.1f} ms, "
                f"{c['arrival_rate']:.1f} req/s)"
            )
        if cfgs[n].semi_pd and cfgs[n].semi_pd_adaptive and not changes:
            lines.append(f"[{n}] the SM split rule kept {cfgs[n].semi_pd_prefill_sm}/"
                         f"{cfgs[n].semi_pd_decode_sm} throughout")
        if reps[n]["roles_before"] != reps[n]["roles_after"]:
            lines.append(f"[{n}] roles after the sweep: {reps[n]['roles_after']}")
    return "\n".join(lines)
