"""The exposition and the dashboard against real tools: `promtool check metrics` on render()
with every metric populated, the dashboard's PromQL through `promtool check rules`, every
kvrelay_* series the dashboard queries present in render(), and the committed dashboard JSON
equal to what deploy/grafana/build_dashboard.py generates."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kvrelay.cluster.metrics.defs import (
    DELIVERY_HOPS,
    KV_STATES,
    KV_TIERS,
    MIGRATION_OUTCOMES,
    REQUEST_OUTCOMES,
)
from kvrelay.cluster.metrics.recorder import METRIC_NAMES, Metrics, SparseFigures, WorkerCounters
from kvrelay.workers.types import ROLES

ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / "deploy" / "grafana" / "build_dashboard.py"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package prometheus; scripts/test-tools.sh)",
)


def populated() -> Metrics:
    """Every family with samples under every label value it can take."""
    m = Metrics()
    for i, outcome in enumerate(REQUEST_OUTCOMES):
        m.observe_request_finished(
            "smol",
            outcome,
            ttft_s=0.05 * (i + 1),
            itl_s_list=[0.02, 0.04],
            e2e_s=1.0 + i,
            queue_s=0.01,
            prompt_tokens=100,
            generation_tokens=20,
            cached_tokens=64,
        )
    for outcome in MIGRATION_OUTCOMES:
        m.record_migration(outcome)
    m.record_resubmission("smol")
    for i, hop in enumerate(DELIVERY_HOPS):
        m.observe_delivery(hop, [0.001 * (i + 1), 0.03])
    blocks = {t: {s: 10 * (j + 1) for j, s in enumerate(KV_STATES)} for t in KV_TIERS}
    for i, role in enumerate(ROLES):
        m.update_worker(
            f"{role}-0",
            role,
            healthy=i != 2,
            kv_blocks=blocks,
            running=i,
            waiting=2 * i,
            counters=WorkerCounters(4096, (0.003, 0.04), 1, 2, 128, 96, 2048, 640),
            sparse=SparseFigures(0.25, 0.9),
        )
    return m


def load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kvrelay_build_dashboard", BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard_exprs() -> list[str]:
    dash = json.loads((ROOT / "deploy" / "grafana" / "kvrelay.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) > 20
    return exprs


def exposed_series(text: str) -> dict[str, set[str]]:
    """Sample name -> its label names, from the text exposition."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            labels = set(re.findall(r'(\w+)="', rest)) if rest else set()
            out.setdefault(name.split()[0], set()).update(labels)
    return out


@needs_promtool
def test_promtool_accepts_the_exposition() -> None:
    proc = subprocess.run(
        [str(PROMTOOL), "check", "metrics"],
        input=populated().render(),
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_lint_is_live() -> None:
    """The check above can fail: promtool rejects a counter without _total."""
    bad = b"# HELP kvrelay_x Things.\n# TYPE kvrelay_x counter\nkvrelay_x 1\n"
    proc = subprocess.run(
        [str(PROMTOOL), "check", "metrics"], input=bad, capture_output=True, timeout=30
    )
    assert proc.returncode != 0 and b"_total" in proc.stdout + proc.stderr


def test_every_family_is_populated_by_the_fixture() -> None:
    series = exposed_series(populated().render().decode())
    for name, (mtype, labels, _doc) in METRIC_NAMES.items():
        sample = f"{name}_count" if mtype == "histogram" else name
        assert sample in series, name
        assert set(labels) <= series[sample], name


def test_dashboard_queries_only_exposed_series_and_labels() -> None:
    series = exposed_series(populated().render().decode())
    used: set[str] = set()
    for expr in dashboard_exprs():
        names = set(re.findall(r"\bkvrelay_[a-z0-9_]+", expr))
        assert names, expr
        labels_here: set[str] = {"le"}
        for name in names:
            assert name in series, f"{name} (in {expr!r}) is not exposed"
            labels_here |= series[name]
            used.add(re.sub(r"_(bucket|sum|count)$", "", name))
        # label names in `by (...)` clauses and in matchers must exist on the queried series
        grouped = {g.strip() for by in re.findall(r"by \(([^)]*)\)", expr) for g in by.split(",")}
        matched = set(re.findall(r"(\w+)\s*(?:=~|!=|=)\s*\"", expr))
        assert grouped | matched <= labels_here, expr
    assert used == set(METRIC_NAMES), "every metric has a panel"


@needs_promtool
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule (Grafana's variables substituted)."""
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue  # Grafana's templating function, not PromQL
        promql = (
            expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$worker", ".*")
        )
        rules.append({"record": f"kvrelay:dashboard_{i}", "expr": promql})
    path = tmp_path / "rules.json"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(path)], capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_committed_dashboards_equal_the_generated_one() -> None:
    builder = load_builder()
    text = builder.render()
    for path in builder.OUTPUTS:
        assert path.read_text() == text, f"{path} is stale: run {BUILDER}"
    assert builder.main(["--check"]) == 0


def test_dashboard_structure() -> None:
    dash: dict[str, Any] = load_builder().build()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["worker"]["multi"] is True
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    per_worker = [p for p in panels if any("$worker" in t["expr"] for t in p["targets"])]
    assert len(per_worker) >= 6
    titles = {p["title"] for p in panels}
    for want in (
        "Time to first token",
        "Inter-token latency",
        "End-to-end latency",
        "Token throughput",
        "KV usage by tier",
        "Prefix cache hit rate",
        "KV transfer rate",
        "Preemptions",
        "Migrations by outcome",
        "Worker health",
    ):
        assert want in titles
    ttft = next(p for p in panels if p["title"] == "Time to first token")
    assert [t["legendFormat"] for t in ttft["targets"]] == ["p50", "p90", "p99"]
    # panels never overlap on the grid
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
