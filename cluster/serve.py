"""``kvrelay serve``: start (or join) a Ray cluster, the controller and the worker pools.

``Cluster`` is also the Python API tests and the demo use: ``Cluster.start(cfg)``, then
``generate(request)`` streams a request's events, ``kill_worker`` injects faults,
``integrity()`` reports every pool's figures.

Ray's token authentication (on by default since Ray 2.60) is turned off for the local cluster
this command starts itself: it binds to 127.0.0.1 only, so nothing outside the machine can
reach it. When joining an existing cluster (``--address``), the caller's ``RAY_AUTH_MODE`` and
token are used as they are.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from kvrelay.cluster.backend import GenerateRequest
from kvrelay.cluster.placement import DEVICES
from kvrelay.workers.sparse_options import add_sparse_arguments
from kvrelay.workers.types import FinishReason, SamplingParams, TokenEvent


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None
    prefill_workers: int = 1
    decode_workers: int = 1
    colocated_workers: int = 0
    address: str | None = None
    host: str = "127.0.0.1"
    grpc_port: int | None = 50051
    http_port: int | None = 8000
    metrics_port: int | None = None
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    max_concurrent_streams: int = 256
    max_queue_depth: int = 1024
    threads_per_worker: int | None = None
    device: str = "auto"  # auto: a GPU where the node has one, else CPU; cpu; cuda
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU; or float32 / bfloat16 / float16
    gpus_per_worker: float | None = None  # None: one GPU each, or an equal share of fewer
    kv_cache_gb: float = 0.25
    cpu_kv_gb: float = 0.5
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    policy: str = "fcfs"  # fcfs | priority | fair (per-tenant virtual token counter)
    preemption_mode: str = "auto"  # auto | swap | recompute
    handoff_timeout_s: float = 30.0
    preemption_grace_s: float = 30.0  # notice a worker's SIGTERM gives (Kubernetes' default)
    router: str = "kv"  # kv | round_robin | least_loaded
    ttft_slo_s: float = 2.0
    itl_slo_s: float = 0.2
    auto_pool_sizing: bool = False
    autosize_interval_s: float = 10.0  # how often the pool-sizing planner decides
    autosize_window_s: float = 60.0  # the arrivals it measures the load over
    conditional_disagg: bool = True
    prefix_pull: bool = True
    transport_host: str | None = None  # rendezvous store address: an IP, "auto" (node IP), host
    transport_bind: str | None = None  # workers' gloo address: None loopback, "auto" node IP, IP
    transport_interface: str | None = None  # NIC for the KV transport (GLOO_SOCKET_IFNAME)
    cpus_per_worker: float = 1.0  # CPU nodes: the slice of cores one worker owns
    watch_nodes: bool = True  # start pinned workers on nodes that join; fail those that leave
    num_blocks_by_role: dict[str, int] = field(default_factory=dict)  # overrides kv_cache_gb
    placement_resource_prefix: str | None = None
    k8s_watch: bool = False
    k8s_namespace: str | None = None
    metadata_url: str | None = None  # each worker polls it for its instance's spot notice
    metadata_parser: str = "instance-action"  # or "preempted" (TRUE/FALSE)
    metadata_interval_s: float = 5.0
    sparse_attention: str = "off"  # off | decode | prefill | both (workers/sparse_attention.py)
    sparse_budget: int = 4096
    sparse_heads: str | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.gpus_per_worker is not None and not 0 < self.gpus_per_worker <= 64:
            raise ValueError(f"gpus_per_worker must be in (0, 64], got {self.gpus_per_worker}")
        for name in ("autosize_interval_s", "autosize_window_s"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in known}
        for key in ("api_keys", "admin_keys"):
            keys = list(values.get(key) or ())
            path = getattr(args, key.replace("keys", "key_file"), None)
            if path:  # Kubernetes Secrets arrive as files; a key never goes on a command line
                with open(path, encoding="utf-8") as f:
                    keys += [line.strip() for line in f if line.strip()]
            values[key] = tuple(keys)
        return cls(**values)

    @property
    def num_workers(self) -> int:
        return self.prefill_workers + self.decode_workers + self.colocated_workers


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--colocated-workers", type=int, default=0)
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--host", default="127.0.0.1", help="address the frontends bind")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve /metrics on its own port (it is always on the HTTP port too)")
    p.add_argument("--api-key", dest="api_keys", action="append", help="accept this bearer key")
    p.add_argument("--admin-key", dest="admin_keys", action="append", help="key for admin calls")
    p.add_argument("--api-key-file", default=None, help="file of accepted keys, one per line")
    p.add_argument("--admin-key-file", default=None, help="file of admin keys, one per line")
    p.add_argument("--tls-cert", "--tls-cert-file", dest="tls_cert", default=None)
    p.add_argument("--tls-key", "--tls-key-file", dest="tls_key", default=None)
    p.add_argument("--placement-resource-prefix", default=None,
                   help="place each role on nodes offering the custom resource PREFIX<role>, "
                        "e.g. kvrelay_ -> kvrelay_prefill / kvrelay_decode")
    p.add_argument("--k8s-watch", action="store_true",
                   help="watch Kubernetes nodes and pods for termination notices")
    p.add_argument("--k8s-namespace", default=None, help="namespace of the worker pods")
    p.add_argument("--metadata-url", default=None,
                   help="cloud metadata endpoint each worker polls for its spot notice")
    p.add_argument("--metadata-parser", default="instance-action",
                   choices=("instance-action", "preempted"))
    p.add_argument("--metadata-interval-s", type=float, default=5.0)
    p.add_argument("--preemption-grace-s", type=float, default=30.0,
                   help="notice a worker's SIGTERM gives before it must be gone")
    p.add_argument("--max-concurrent-streams", type=int, default=256)
    p.add_argument("--max-queue-depth", type=int, default=1024)
    p.add_argument("--threads-per-worker", type=int, default=None)
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where workers compute: auto = a GPU where the node has one")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="compute dtype: auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--gpus-per-worker", type=_positive_float, default=None,
                   help="GPU share per worker (default: one each, or an equal share when "
                        "the local machine has fewer GPUs than workers)")
    p.add_argument("--kv-cache-gb", type=float, default=0.25, help="device KV pool per worker")
    p.add_argument("--cpu-kv-gb", type=float, default=0.5, help="host KV tier per worker")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--policy", default="fcfs", choices=("fcfs", "priority", "fair"),
                   help="scheduling policy inside each worker")
    p.add_argument("--preemption-mode", default="auto", choices=("auto", "swap", "recompute"),
                   help="how a worker preempts when KV blocks run out")
    p.add_argument("--router", default="kv", choices=("kv", "round_robin", "least_loaded"))
    p.add_argument("--ttft-slo-s", type=float, default=2.0)
    p.add_argument("--itl-slo-s", type=float, default=0.2)
    p.add_argument("--auto-pool-sizing", action="store_true",
                   help="let the SLO-aware planner switch workers between prefill and decode")
    p.add_argument("--autosize-interval-s", type=_positive_float, default=10.0,
                   help="seconds between the pool-sizing planner's decisions")
    p.add_argument("--autosize-window-s", type=_positive_float, default=60.0,
                   help="seconds of arrivals the pool-sizing planner measures the load over")
    p.add_argument("--no-conditional-disagg", dest="conditional_disagg", action="store_false",
                   help="always hand off, even when the decode worker holds the prompt")
    p.add_argument("--no-prefix-pull", dest="prefix_pull", action="store_false",
                   help="recompute prefixes another worker holds instead of pulling them")
    p.add_argument("--transport-host", default=None,
                   help="routable address for KV transport rendezvous, or 'auto' (multi-host)")
    p.add_argument("--transport-bind", default=None,
                   help="address workers bind for KV transfers: an IP or 'auto' (the node's)")
    p.add_argument("--transport-interface", default=None, help="NIC for KV transfers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    add_sparse_arguments(p)
    p.add_argument("--no-watch-nodes", dest="watch_nodes", action="store_false",
                   help="do not start workers on nodes that join")


class Cluster:
    """A running cluster seen from the driver process."""

    def __init__(self, cfg: ServeConfig, controller: Any, ports: dict[str, int], owns_ray: bool):
        self.cfg = cfg
        self.controller = controller
        self.ports = ports
        self._owns_ray = owns_ray

    @classmethod
    def start(cls, cfg: ServeConfig) -> Cluster:
        import ray

        from kvrelay.cluster.actors import ControllerActor

        owns = not ray.is_initialized()
        if owns:
            if cfg.address is None:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # see module docstring
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                ray.init(
                    num_cpus=max(4, cfg.num_workers + 2),
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    namespace="kvrelay",
                    log_to_driver=bool(os.environ.get("KVRELAY_RAY_LOGS")),
                )
            else:
                ray.init(address=cfg.address, namespace="kvrelay")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if cfg.address is not None:  # joining: rendezvous and workers on routable addresses
            cfg = replace(cfg, transport_host=cfg.transport_host or "auto",
                          transport_bind=cfg.transport_bind or "auto")
        # the controller (frontends, rendezvous store) runs on this node, never a worker host
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        controller = ControllerActor.options(  # type: ignore[attr-defined]
            name=f"kvrelay-controller-{uuid.uuid4().hex[:6]}", num_cpus=0,
            max_concurrency=10_000, scheduling_strategy=here,
        ).remote(cfg)
        ports = ray.get(controller.start_services.remote())
        roles = (
            ["prefill"] * cfg.prefill_workers
            + ["decode"] * cfg.decode_workers
            + ["colocated"] * cfg.colocated_workers
        )
        ray.get([controller.add_worker.remote(role) for role in roles])
        return cls(cfg, controller, ports, owns)

    # ---- requests ------------------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> Iterator[TokenEvent]:
        import ray

        for ref in self.controller.generate_stream.remote(request):
            yield ray.get(ref)

    def request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        tenant: str = "",
        priority: int = 0,
    ) -> GenerateRequest:
        return GenerateRequest(
            request_id or uuid.uuid4().hex,
            self.ports.get("model_id", ""),  # type: ignore[arg-type]
            tuple(prompt_ids),
            params,
            priority=priority,
            tenant=tenant,
        )

    def complete(self, prompt_ids: Sequence[int], params: SamplingParams, **kw: Any) -> tuple[list[int], FinishReason]:
        tokens: list[int] = []
        reason = FinishReason.ABORT
        for event in self.generate(self.request(prompt_ids, params, **kw)):
            tokens += event.token_ids
            if event.finish_reason is not None:
                reason = event.finish_reason
        return tokens, reason

    # ---- operator and test hooks ---------------------------------------------------------
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(getattr(self.controller, method).remote(*args, **kwargs))

    def workers(self) -> dict[str, str]:
        return dict(self.call("worker_ids"))

    def integrity(self) -> dict[str, dict[str, int]]:
        return dict(self.call("integrity"))

    def counters(self) -> dict[str, Any]:
        return dict(self.call("counters"))

    def kill_worker(self, worker_id: str) -> None:
        self.call("kill_worker", worker_id)

    def inject_fault(self, worker_id: str, fault: str) -> None:
        self.call("inject_fault", worker_id, fault)

    def shutdown(self) -> None:
        import ray

        try:
            self.call("shutdown")
        except Exception:
            pass
        ray.kill(self.controller)
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def serve_forever(cfg: ServeConfig) -> int:
    cluster = Cluster.start(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"kvrelay serving {cluster.ports.get('model_id')}: gRPC {cfg.host}:{cluster.ports.get('grpc_port')}"
        f"  HTTP http://{cfg.host}:{cluster.ports.get('http_port')}  workers {cluster.workers()}",
        flush=True,
    )
    stop.wait()
    cluster.shutdown()
    return 0
