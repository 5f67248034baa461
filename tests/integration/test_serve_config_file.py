"""`kvrelay serve --config FILE` as an operator runs it: a YAML file of ServeConfig's fields,
flags over it; an unknown key is refused with exit code 2 and a message naming it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from kvrelay.client import Client


def _kvrelay(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvrelay.cluster.cli.main", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_unknown_key_exits_2_naming_it(tmp_path: Path) -> None:
    f = tmp_path / "serve.yaml"
    f.write_text("prefil_workers: 2\n")
    out = _kvrelay("serve", "--config", str(f))
    assert out.returncode == 2, out.stderr
    assert "unknown key 'prefil_workers'" in out.stderr and "prefill_workers" in out.stderr
    assert "Traceback" not in out.stderr
    f.write_text("router_weights:\n  prefix_weigth: 2\n")
    out = _kvrelay("serve", "--config", str(f))
    assert out.returncode == 2 and "router_weights: unknown key 'prefix_weigth'" in out.stderr


def test_file_values_and_flag_overrides_resolve(tmp_path: Path) -> None:
    f = tmp_path / "serve.yaml"
    f.write_text("decode_workers: 3\npolicy: fair\nrouter_weights: {queue_weight: 2.5}\n")
    out = _kvrelay("serve", "--config", str(f), "--decode-workers", "2", "--print-config")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert (cfg["decode_workers"], cfg["policy"], cfg["prefill_workers"]) == (2, "fair", 1)
    assert cfg["router_weights"] == {"queue_weight": 2.5}


def test_served_cluster_follows_the_file(tmp_path: Path) -> None:
    f = tmp_path / "serve.yaml"
    f.write_text(
        "prefill_workers: 0\ndecode_workers: 0\ncolocated_workers: 1\n"
        "grpc_port: 0\nhttp_port: 0\nkv_cache_gb: 0.05\ncpu_kv_gb: 0.05\n"
        "router_weights: {prefix_weight: 3.0}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvrelay.cluster.cli.main", "serve", "--config", str(f)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            if line.startswith("kvrelay serving"):
                break
        match = re.search(r"gRPC ([\d.]+):(\d+)", line)
        assert match, f"no serving line; last output: {line!r}"
        with Client(f"{match[1]}:{match[2]}", timeout=30) as client:
            status = client.cluster_status()
        assert [w.role for w in status.workers] == ["colocated"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
