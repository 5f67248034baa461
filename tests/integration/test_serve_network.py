"""What a local ``kvrelay serve`` exposes to the network: nothing beyond loopback, and a loud
warning when told to serve on a routable address without API keys."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

from kvrelay_testing.serve_process import ServeProcess, complete


def test_every_listener_of_a_local_cluster_is_loopback(tmp_path: Path) -> None:
    # --metrics-port opens the extra listener too; a request opens the KV transfer sockets
    with ServeProcess(["--metrics-port=0", "--threads-per-worker=1"], tmp_path / "serve.log") as s:
        s.wait_serving()
        # a handoff (prefill -> decode) makes the workers connect through the rendezvous store
        out = complete(s.http_port, "The quick brown fox jumps over the lazy dog " * 3)
        assert out.status == 200, out
        listeners = s.listeners()
        names = {ln.name for ln in listeners}
        # the Ray control plane, the controller and both workers were all looked at
        assert {"gcs_server", "raylet"} <= names, names
        assert len({ln.pid for ln in listeners}) >= 5, listeners
        exposed = [
            ln for ln in listeners
            if not ipaddress.ip_address(ln.ip.removeprefix("::ffff:")).is_loopback
        ]
        assert not exposed, f"listeners beyond loopback: {exposed}"


def test_serving_beyond_loopback_without_keys_warns(tmp_path: Path) -> None:
    with ServeProcess(["--host=0.0.0.0"], tmp_path / "serve.log") as s:
        # the warning comes before the cluster starts; no need to wait for it to serve
        _wait_for(s, "WARNING: serving on 0.0.0.0 with no API key")


def _wait_for(s: ServeProcess, text: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in s.output():
        assert time.monotonic() < deadline, f"{text!r} never printed:\n{s.output()[-3000:]}"
        assert s.proc.poll() is None or text in s.output(), s.output()[-3000:]
        time.sleep(0.05)
