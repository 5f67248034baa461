"""The life of the ``kvrelay serve`` process once it has asked for a cluster.

    started ──▶ watching: the controller answers ``alive()`` every second
                 │ SIGTERM / SIGINT                     │ controller dead (or 3 probes missed)
                 ▼                                      ▼
            draining: frontends refuse new       log why; the frontends (in this process)
            requests (503, NOT_SERVING); in-     turn NOT_SERVING and end every request in
            flight ones get ``shutdown_grace_s``  flight with UNAVAILABLE (a hung controller
                 │ all done, grace over,         never wakes them by itself): give those
                 │ or a second signal            error events up to ``FLUSH_S`` to reach
                 ▼                               the clients, stop Ray, exit 1 (so
                                                 Kubernetes or systemd restarts us)
            shut the cluster down, exit 0

Signals are caught before the cluster starts, so a SIGTERM during startup still shuts down
what was started instead of leaving Ray's processes behind.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster

PROBE_INTERVAL_S = 1.0  # each probe waits up to ``controller_probe_timeout_s`` for its answer
MISSED_PROBES = 3  # a controller that does not answer this many probes in a row is hung
FLUSH_S = 3.0  # after a controller death: the most the streams get to send their error event


def _say(text: str) -> None:
    print(f"kvrelay serve: {text}", file=sys.stderr, flush=True)


class _Signals:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.count = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        self.stop.set()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)


def controller_death(cluster: Cluster, stop: threading.Event) -> str | None:
    """Probe the controller until ``stop`` is set (None) or it is found dead (the reason)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    missed, timeout_s = 0, cluster.cfg.controller_probe_timeout_s
    while not stop.wait(PROBE_INTERVAL_S):
        try:
            ray.get(cluster.controller.alive.remote(), timeout=timeout_s)
            missed = 0
        except GetTimeoutError:
            missed += 1
            if missed >= MISSED_PROBES:
                return f"the controller did not answer {missed} liveness probes in a row"
        except RayError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"the controller actor died ({type(exc).__name__}: {first})"
    return None


def drain(cluster: Cluster, grace_s: float, signals: _Signals) -> None:
    """Stop admitting, then wait for the requests in flight (up to ``grace_s``)."""
    import ray

    if cluster.frontends is not None:
        cluster.frontends.stop_admitting()
    try:
        n = int(ray.get(cluster.controller.in_flight.remote(), timeout=10))
    except Exception as exc:
        _say(f"could not count the requests in flight ({exc!r}); shutting down")
        return
    _say(f"stopping: no new requests; {n} in flight get up to {grace_s:g} s")
    deadline = time.monotonic() + grace_s
    while n and time.monotonic() < deadline and signals.count < 2:
        time.sleep(0.1)
        try:
            n = int(ray.get(cluster.controller.in_flight.remote(), timeout=10))
        except Exception:
            return
    if n:
        _say(f"{n} requests still in flight after the grace period; cutting them")


def run_until_stopped(cfg: ServeConfig, start: Callable[[ServeConfig], Cluster]) -> int:
    signals = _Signals()
    signals.install()
    cluster = start(cfg)
    signals.install()  # again: ray.init put its own crash handler (which exits) on SIGTERM
    if signals.stop.is_set():
        _say("stopped during startup")
    ports = cluster.ports
    print(
        f"kvrelay serving {ports.get('model_id')}: gRPC {cfg.host}:{ports.get('grpc_port')}"
        f"  HTTP http://{cfg.host}:{ports.get('http_port')}  workers {cluster.workers()}",
        flush=True,
    )
    reason = controller_death(cluster, signals.stop)
    if reason is not None:
        _say(
            f"{reason}; requests in flight end with UNAVAILABLE, new ones are refused. "
            "Exiting with status 1 so a supervisor restarts the service."
        )
        import ray

        if cluster.frontends is not None:
            left = cluster.frontends.close(FLUSH_S, gone=reason)
            if left:
                _say(f"{left} streams had not ended {FLUSH_S:g} s later; cut")
        try:
            ray.shutdown()
        except Exception as exc:
            _say(f"stopping Ray failed too: {exc!r}")
        return 1
    drain(cluster, cfg.shutdown_grace_s, signals)
    batches = cluster.frontends.event_batches() if cluster.frontends is not None else 0
    cluster.shutdown()
    _say(f"stopped ({batches} Ray objects of request events came from the controller)")
    return 0


def exposure_warning(cfg: ServeConfig) -> str | None:
    """The warning for frontends served beyond this machine with no API key, else None."""
    import ipaddress

    try:
        loopback = ipaddress.ip_address(cfg.host).is_loopback
    except ValueError:
        loopback = cfg.host == "localhost"
    if loopback or cfg.api_keys:
        return None
    return (
        f"WARNING: serving on {cfg.host} with no API key: anyone who can reach this address "
        "can generate, cancel and read the models. Pass --api-key-file (and --admin-key-file), "
        "or bind 127.0.0.1 behind an authenticating proxy."
    )


def serve_forever(cfg: ServeConfig) -> int:
    warning = exposure_warning(cfg)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    return run_until_stopped(cfg, Cluster.start)
