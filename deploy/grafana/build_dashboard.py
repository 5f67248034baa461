#!/usr/bin/env python3
"""Generate kvrelay's Grafana dashboard.

    python deploy/grafana/build_dashboard.py          # write both copies
    python deploy/grafana/build_dashboard.py --check  # exit 1 if a committed copy is stale

Writes deploy/grafana/kvrelay.json and the chart's copy deploy/helm/kvrelay/dashboards/kvrelay.json
(Helm's .Files.Get cannot reach outside the chart, so the chart carries its own copy). The output
is deterministic: the same script gives byte-identical JSON, which a test checks. Standard library
only, so it runs anywhere.

Layout: rows of 24-column grid panels. Request-side panels filter on `$model`; per-worker panels
on `$worker` (a multi-value variable over kvrelay_worker_healthy's worker label). The datasource
is the `${datasource}` variable so the dashboard imports into any Grafana.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUTS = (HERE / "kvrelay.json", HERE.parent / "helm" / "kvrelay" / "dashboards" / "kvrelay.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'
W = 'worker=~"$worker"'
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def quantiles(metric: str, sel: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    legend_by = f" {{{{{by}}}}}" if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))",
            f"{name}{legend_by}",
        )
        for name, q in QUANTILES
    ]


def panel(
    title: str,
    targets: list[tuple[str, str]],
    unit: str,
    desc: str = "",
    kind: str = "timeseries",
    stack: bool = False,
    maximum: float | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit}
    if maximum is not None:
        defaults["max"] = maximum
        defaults["min"] = 0
    if kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "stacking": {"mode": "normal" if stack else "none"},
        }
    return {
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "multi"},
        }
        if kind == "timeseries"
        else {},
        "targets": [
            {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def rows() -> list[tuple[str, list[dict[str, Any]]]]:
    rate = "[$__rate_interval]"
    return [
        (
            "Latency",
            [
                panel(
                    "Time to first token",
                    quantiles("kvrelay_time_to_first_token_seconds", M),
                    "s",
                    "Arrival to first token, p50/p90/p99.",
                ),
                panel(
                    "Inter-token latency",
                    quantiles("kvrelay_inter_token_latency_seconds", M),
                    "s",
                    "Gap between consecutive streamed tokens.",
                ),
                panel(
                    "End-to-end latency", quantiles("kvrelay_e2e_request_latency_seconds", M), "s"
                ),
                panel(
                    "Queue time",
                    quantiles("kvrelay_request_queue_time_seconds", M),
                    "s",
                    "Arrival until a worker first schedules the request.",
                ),
                panel(
                    "Token delivery by hop (p99)",
                    [
                        (
                            "histogram_quantile(0.99, sum by (le, hop) "
                            f"(rate(kvrelay_event_delivery_seconds_bucket{rate})))",
                            "{{hop}}",
                        ),
                    ],
                    "s",
                    "Where a token waits between its engine and its client: the worker's call "
                    "to the controller, the controller's event loop running late, its stream to "
                    "a frontend process, and the frontends' loop running late.",
                ),
            ],
        ),
        (
            "Throughput",
            [
                panel(
                    "Token throughput",
                    [
                        (f"sum(rate(kvrelay_prompt_tokens_total{{{M}}}{rate}))", "prompt"),
                        (f"sum(rate(kvrelay_generation_tokens_total{{{M}}}{rate}))", "generation"),
                    ],
                    "tokens/s",
                ),
                panel(
                    "Requests by outcome",
                    [
                        (
                            f"sum by (outcome) (rate(kvrelay_requests_total{{{M}}}{rate}))",
                            "{{outcome}}",
                        ),
                    ],
                    "reqps",
                    stack=True,
                ),
                panel(
                    "Running / waiting by role",
                    [
                        ("sum by (role) (kvrelay_requests_running)", "running {{role}}"),
                        ("sum by (role) (kvrelay_requests_waiting)", "waiting {{role}}"),
                    ],
                    "short",
                ),
                panel(
                    "Healthy workers by role",
                    [
                        ("sum by (role) (kvrelay_worker_healthy)", "{{role}}"),
                    ],
                    "short",
                    kind="stat",
                ),
            ],
        ),
        (
            "KV cache",
            [
                panel(
                    "KV usage by tier",
                    [
                        (
                            'sum by (tier) (kvrelay_kv_blocks{state="used"}) / sum by (tier) (kvrelay_kv_blocks)',
                            "{{tier}}",
                        ),
                    ],
                    "percentunit",
                    "Used blocks / all blocks, per tier, whole cluster.",
                    maximum=1,
                ),
                panel(
                    "KV blocks by state",
                    [
                        (f"sum by (tier, state) (kvrelay_kv_blocks{{{W}}})", "{{tier}} {{state}}"),
                    ],
                    "short",
                    "Selected workers.",
                    stack=True,
                ),
                panel(
                    "Prefix cache hit rate",
                    [
                        (
                            f"sum(rate(kvrelay_cached_prompt_tokens_total{{{M}}}{rate})) / "
                            f"sum(rate(kvrelay_prompt_tokens_total{{{M}}}{rate}))",
                            "cluster (requests)",
                        ),
                        (
                            f"sum by (worker) (rate(kvrelay_prefix_cache_hit_tokens_total{{{W}}}{rate})) / "
                            f"sum by (worker) (rate(kvrelay_prefix_cache_queried_tokens_total{{{W}}}{rate}))",
                            "{{worker}}",
                        ),
                    ],
                    "percentunit",
                    "Prompt tokens served from cache / prompt tokens.",
                    maximum=1,
                ),
                panel(
                    "KV usage per worker",
                    [
                        (
                            f'sum by (worker, tier) (kvrelay_kv_blocks{{{W}, state="used"}}) / '
                            f"sum by (worker, tier) (kvrelay_kv_blocks{{{W}}})",
                            "{{worker}} {{tier}}",
                        ),
                    ],
                    "percentunit",
                    maximum=1,
                ),
            ],
        ),
        (
            "KV transfer",
            [
                panel(
                    "KV transfer rate",
                    [
                        (
                            f"sum by (worker) (rate(kvrelay_kv_transfer_bytes_total{{{W}}}{rate}))",
                            "{{worker}} sent",
                        ),
                        (
                            f"sum by (worker) (rate(kvrelay_kv_received_bytes_total{{{W}}}{rate}))",
                            "{{worker}} received",
                        ),
                    ],
                    "Bps",
                    "Bytes sent to and received from peers (handoffs, migrations, prefix pulls), "
                    "by worker.",
                    stack=True,
                ),
                panel(
                    "KV transfer latency",
                    quantiles("kvrelay_kv_transfer_duration_seconds", W),
                    "s",
                    "Outgoing transfer, reserve to acknowledge.",
                ),
            ],
        ),
        (
            "Preemption and migration",
            [
                panel(
                    "Preemptions",
                    [
                        (
                            f"sum by (kind) (rate(kvrelay_preemptions_total{{{W}}}{rate}))",
                            "{{kind}}",
                        ),
                    ],
                    "ops",
                    "Requests preempted inside workers: swapped to CPU or recomputed.",
                    stack=True,
                ),
                panel(
                    "Migrations by outcome",
                    [
                        (
                            f"sum by (outcome) (increase(kvrelay_migrations_total{rate}))",
                            "{{outcome}}",
                        ),
                        (
                            f"sum(increase(kvrelay_request_resubmissions_total{{{M}}}{rate}))",
                            "resubmitted after a worker failure",
                        ),
                    ],
                    "short",
                    "In-flight requests of leaving (spot) workers, and requests resumed "
                    "elsewhere after their worker failed without notice.",
                    stack=True,
                ),
            ],
        ),
        (
            "Workers",
            [
                panel(
                    "Worker health",
                    [(f"kvrelay_worker_healthy{{{W}}}", "{{worker}} ({{role}})")],
                    "short",
                    "1 healthy, 0 failing.",
                    maximum=1,
                ),
                panel(
                    "Running per worker",
                    [(f"kvrelay_requests_running{{{W}}}", "{{worker}}")],
                    "short",
                ),
                panel(
                    "Waiting per worker",
                    [(f"kvrelay_requests_waiting{{{W}}}", "{{worker}}")],
                    "short",
                ),
                panel(
                    "Preemptions per worker",
                    [
                        (
                            f"sum by (worker) (rate(kvrelay_preemptions_total{{{W}}}{rate}))",
                            "{{worker}}",
                        ),
                    ],
                    "ops",
                ),
                panel(
                    "Kernel compiles per worker",
                    [
                        (
                            f"sum by (worker) (increase(kvrelay_kernel_compiles_total{{{W}}}{rate}))",
                            "{{worker}} compiles",
                        ),
                        (
                            f"sum by (worker) (increase(kvrelay_kernel_compile_seconds_total{{{W}}}{rate}))",
                            "{{worker}} seconds",
                        ),
                    ],
                    "short",
                    "Triton compiles in each worker's process and the seconds they took: after "
                    "start-up each one stalled a serving step (the worker logs the kernel).",
                ),
            ],
        ),
        (
            "Sparse attention",
            [
                panel(
                    "Sparse decode: KV tokens read",
                    [
                        (
                            f"sum by (worker) (rate(kvrelay_sparse_decode_selected_tokens_total{{{W}}}{rate}))",
                            "{{worker}}",
                        ),
                    ],
                    "short",
                    "KV tokens decode attention read per second, over sequences, KV heads and "
                    "layers (workers with --sparse-attention decode or both).",
                ),
                panel(
                    "Sparse read fraction and prefill density",
                    [
                        (f"kvrelay_sparse_decode_read_fraction{{{W}}}", "{{worker}} decode read"),
                        (f"kvrelay_sparse_prefill_density{{{W}}}", "{{worker}} prefill tiles"),
                    ],
                    "percentunit",
                    "Since each worker started: KV tokens decode read / what dense decode reads, "
                    "and prefill tiles computed / causal tiles.",
                    maximum=1,
                ),
            ],
        ),
    ]


def variable(name: str, query: str, label: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for title, members in rows():
        panels.append(
            {
                "type": "row",
                "title": title,
                "id": next_id,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        width = 24 // min(len(members), 4)
        for i, p in enumerate(members):
            p["id"] = next_id
            next_id += 1
            p["gridPos"] = {"h": 8, "w": width, "x": (i % 4) * width, "y": y + (i // 4) * 8}
            panels.append(p)
        y += 8 * ((len(members) + 3) // 4)
    return {
        "title": "kvrelay",
        "uid": "kvrelay-overview",
        "description": "kvrelay: disaggregated prefill/decode serving (latency, throughput, KV "
        "cache, transfers, preemption, workers).",
        "tags": ["kvrelay", "llm", "serving"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                },
                variable("model", "label_values(kvrelay_requests_total, model)", "Model"),
                variable("worker", "label_values(kvrelay_worker_healthy, worker)", "Worker"),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if a committed copy differs")
    args = ap.parse_args(argv)
    text = render()
    stale = [p for p in OUTPUTS if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"stale: {p} (run {Path(__file__).name})", file=sys.stderr)
        return 1 if stale else 0
    for p in OUTPUTS:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
