"""``kvrelay serve``'s settings: one pydantic model, the only place their defaults are written.

They enter three ways, validated once here: the Python API (``ServeConfig(prefill_workers=2)``),
a YAML file (``kvrelay serve --config FILE``, keys are the field names below, as the Helm
chart's values would set them) and command-line flags, which override the file::

    prefill_workers: 2
    decode_workers: 2
    router: kv
    router_weights:          # cluster/routing/config.py (RouterConfig) lists them
      prefix_weight: 3.0
      queue_weight: 0.5

An unknown key, in the file or in ``router_weights``, is an error that names it.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from kvrelay.cluster.placement.placement import DEVICES
from kvrelay.cluster.routing.config import RouterConfig
from kvrelay.workers.model.sparse_options import SPARSE_MODES

DTYPES = ("auto", "float32", "bfloat16", "float16")
POLICIES = ("fcfs", "priority", "deadline", "fair")
PREEMPTION_MODES = ("auto", "swap", "recompute")
ROUTERS = ("kv", "round_robin", "least_loaded")
METADATA_PARSERS = ("instance-action", "preempted")
# RouterConfig fields serve sets from its own settings (block_size, max_num_batched_tokens)
_ROUTER_FROM_SERVE = ("block_size", "chunk_tokens")


class ConfigError(ValueError):
    """A settings file or value ``kvrelay serve`` cannot use; the message names the key."""


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None  # HF folder or .gguf file; None: SmolLM2-135M-Instruct
    prefill_workers: int = 1
    decode_workers: int = 1
    colocated_workers: int = 0
    # colocated workers run semi-PD (workers/semi_pd/): a prefill and a decode lane over one KV
    # storage, the handoff inside by block ids, each lane in its SM share (percent; CUDA only)
    semi_pd: bool = False
    semi_pd_prefill_sm: int = 100  # the prefill lane's initial SM share (semi-PD's x)
    semi_pd_decode_sm: int = 100  # the decode lane's (y); x + y may exceed 100 (shares overlap)
    semi_pd_adaptive: bool = False  # move the shares toward the failing SLO (ttft/itl_slo_s)
    semi_pd_window_s: float = 1.0  # seconds per window of the split rule
    semi_pd_prefill_tokens: int = 4096  # the prefill lane's tokens per step (not 512 chunks)
    # the decode lane's streams at the highest CUDA stream priority, the prefill lane's at the
    # lowest: decode kernels are dispatched ahead of queued prefill blocks (not verified on a GPU)
    semi_pd_decode_first: bool = False
    # the decode lane runs the overlapped step (host prepares step N+1 while N runs), its block
    # releases held until its steps are done (workers/semi_pd/worker.py); default: plain step
    semi_pd_decode_overlap: bool = False
    # the prefill lane too: the host schedules its next chunk while the GPU computes this one
    # (default: on; measured best with the share at 100, workers/semi_pd/worker.py)
    semi_pd_prefill_overlap: bool = True
    # which lane sends a request's first token: the prefill lane once sampled ("prefill"), or
    # the decode lane as it adopts the request ("decode": the first gap is then one decode step,
    # not the handoff; TTFT grows by the adoption's wait)
    semi_pd_first_token: Literal["prefill", "decode"] = "prefill"
    # the prefill lane's scheduler hands the storage lock to the waiting decode lane between two
    # admissions (workers/semi_pd/lanes.py, StorageLock); default: first come, first served
    semi_pd_decode_lock_first: bool = False
    address: str | None = None  # join this Ray cluster instead of starting one
    host: str = "127.0.0.1"  # address the frontends bind
    grpc_port: int | None = 50051
    http_port: int | None = 8000
    metrics_port: int | None = None  # /metrics on its own port too (always on the HTTP port)
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    api_key_file: str | None = None  # accepted keys, one per line (Kubernetes Secrets are files)
    admin_key_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_concurrent_streams: int = 256
    max_queue_depth: int = 1024
    threads_per_worker: int | None = None
    device: str = "auto"  # auto: a GPU where the node has one, else CPU; cpu; cuda
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU; or float32 / bfloat16 / float16
    gpus_per_worker: float | None = None  # None: one GPU each, or an equal share of fewer
    kv_cache_gb: float = 0.25  # device KV pool per worker
    cpu_kv_gb: float = 0.5  # host KV tier per worker
    block_size: int = 16
    max_num_seqs: int = 64
    # a decode worker's (a semi-PD decode lane's) max_num_seqs at least, the batch its CUDA
    # graphs hold: it adopts every request handed over, so its batch passes max_num_seqs
    decode_seqs: int = 256
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    # fcfs | priority | deadline (requests past their ttft_slo_s behind those still on time) |
    # fair (per-tenant virtual token counter)
    policy: str = "fcfs"
    preemption_mode: str = "auto"  # auto | swap | recompute
    # overlap the host with the device (workers/engine/engine.py): None = on for CUDA workers
    overlap_schedule: bool | None = None
    capture_graphs: bool = False  # every decode / prefill CUDA graph at worker start (EngineConfig's)
    handoff_timeout_s: float = 30.0
    transfer_slack_s: float = 40.0  # ControllerConfig.transfer_slack_s
    preemption_grace_s: float = 30.0  # notice a worker's SIGTERM gives (Kubernetes' default)
    admission_wait_s: float = 10.0  # a request nothing can take waits this long, then 503
    shutdown_grace_s: float = 30.0  # SIGTERM: in-flight requests get this long to finish
    # serve probes the controller every second; 3 probes in a row unanswered this long: hung
    controller_probe_timeout_s: float = 5.0
    http_header_timeout_s: float = 10.0  # a connection's request head must arrive by then
    http_body_timeout_s: float = 30.0  # a request body must arrive by then (408 otherwise)
    http_max_connections: int = 1024
    router: str = "kv"  # kv | round_robin | least_loaded
    router_weights: dict[str, Any] = {}  # RouterConfig fields (weights, hit values, tie break)
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
    num_blocks_by_role: dict[str, int] = {}  # overrides kv_cache_gb
    placement_resource_prefix: str | None = None
    k8s_watch: bool = False
    k8s_namespace: str | None = None
    metadata_url: str | None = None  # each worker polls it for its instance's spot notice
    metadata_parser: str = "instance-action"  # or "preempted" (TRUE/FALSE)
    metadata_interval_s: float = 5.0
    sparse_attention: str = "off"  # off | decode | prefill | both (workers/model/sparse_attention.py)
    sparse_budget: int = 4096  # decode tokens a dense head reads beyond its first and last pages
    # decode steps a shortlist is kept and re-ranked exactly (SparseConfig.shortlist_steps); 2:
    # 64k x 1 decode 1.82x dense on the H200 (1 step: 1.36x), selection overlap >= 0.94 on CPU
    sparse_shortlist_steps: int = 2
    sparse_heads: str | None = None  # streaming-head mask (kvrelay calibrate-heads); None: beside
    # the model if there is one, else every head dense

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in DEVICES:
            raise ValueError(f"device must be auto, cpu or cuda, got {v!r}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {v!r}")
        return v

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 64:
            raise ValueError(f"gpus_per_worker must be in (0, 64], got {v}")
        return v

    @field_validator(
        "autosize_interval_s", "autosize_window_s", "admission_wait_s", "http_header_timeout_s",
        "http_body_timeout_s", "semi_pd_window_s", "controller_probe_timeout_s",
        "handoff_timeout_s", "transfer_slack_s",
    )
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:  # also refuses NaN
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("semi_pd_prefill_tokens", "decode_seqs", "sparse_shortlist_steps")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("semi_pd_prefill_sm", "semi_pd_decode_sm")
    @classmethod
    def _sm_share(cls, v: int) -> int:
        if not 1 <= v <= 100:
            raise ValueError(f"an SM share is a percentage in 1..100, got {v}")
        return v

    @model_validator(mode="after")
    def _semi_pd_needs_colocated(self) -> ServeConfig:
        if self.semi_pd and self.colocated_workers < 1:
            raise ValueError(
                "semi_pd runs the colocated workers as semi-PD workers: set colocated_workers >= 1"
            )
        return self

    @model_validator(mode="after")
    def _shortlist_within_a_block(self) -> ServeConfig:
        # a kept shortlist misses at most the one block filled since (SparseAttention)
        sparse_decode = self.sparse_attention in ("decode", "both")
        if sparse_decode and self.sparse_shortlist_steps > self.block_size:
            raise ValueError(
                f"sparse_shortlist_steps ({self.sparse_shortlist_steps}) must be <= block_size "
                f"({self.block_size})"
            )
        return self

    @field_validator("sparse_budget")
    @classmethod
    def _not_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("policy", "preemption_mode", "router", "metadata_parser", "sparse_attention")
    @classmethod
    def _choice(cls, v: str, info: Any) -> str:
        choices = {"policy": POLICIES, "preemption_mode": PREEMPTION_MODES, "router": ROUTERS,
                   "metadata_parser": METADATA_PARSERS,
                   "sparse_attention": SPARSE_MODES}[info.field_name]
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {v!r}")
        return v

    @field_validator("router_weights")
    @classmethod
    def _router_weights(cls, v: dict[str, Any]) -> dict[str, Any]:
        known = [f.name for f in dataclass_fields(RouterConfig) if f.name not in _ROUTER_FROM_SERVE]
        for key in v:
            if key not in known:
                raise ValueError(f"unknown key {key!r}{_did_you_mean(key, known)}")
        RouterConfig(**v)  # its own checks: finite, >= 0, one positive weight, ...
        return dict(v)

    @property
    def num_workers(self) -> int:
        return self.prefill_workers + self.decode_workers + self.colocated_workers

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> ServeConfig:
        """Settings from a YAML file (if any), then ``overrides``; key files are read here.
        Raises ConfigError naming the first bad key."""
        values: dict[str, Any] = read_config_file(path) if path is not None else {}
        values.update(overrides)
        for key in ("api_keys", "admin_keys"):
            keys = list(values.get(key) or ())
            file = values.get(key.replace("keys", "key_file"))
            if file:  # Kubernetes Secrets arrive as files; a key never goes on a command line
                try:
                    with open(file, encoding="utf-8") as f:
                        keys += [line.strip() for line in f if line.strip()]
                except OSError as exc:
                    raise ConfigError(f"{key.replace('keys', 'key_file')}: {exc}") from exc
            values[key] = tuple(keys)
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, path)) from None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        """From ``add_serve_arguments`` flags: ``--config FILE`` first, the flags given over it."""
        known = cls.model_fields.keys()
        given = {k: v for k, v in vars(args).items() if k in known}
        return cls.load(getattr(args, "config", None), **given)


def config_or_exit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServeConfig:
    """``ServeConfig.from_args`` for a command line: a bad setting exits 2 with its message."""
    try:
        return ServeConfig.from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))  # exits 2


def read_config_file(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path}: expected a mapping of settings at the top level")
    known = list(ServeConfig.model_fields)
    for key in data:
        if key not in known:
            raise ConfigError(
                f"config file {path}: unknown key {key!r}{_did_you_mean(str(key), known)}"
            )
    return dict(data)


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(exc: ValidationError, path: str | Path | None) -> str:
    where = f"config file {path}: " if path is not None else ""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return where + "; ".join(parts)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvrelay serve`` / ``demo``. None has a default of its own: a flag not given
    leaves the value to ``--config`` or to ServeConfig."""
    S = argparse.SUPPRESS
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML settings file (keys: ServeConfig's fields); flags override it")
    p.add_argument("--model", default=S, help="HF folder or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--prefill-workers", type=int, default=S)
    p.add_argument("--decode-workers", type=int, default=S)
    p.add_argument("--colocated-workers", type=int, default=S)
    p.add_argument("--semi-pd", action="store_true", default=S,
                   help="run the colocated workers as semi-PD workers: prefill and decode lanes "
                        "over one KV storage, handoff by block ids, SM shares on CUDA")
    p.add_argument("--semi-pd-prefill-sm", type=int, default=S,
                   help="the prefill lane's initial SM share, percent (default 100)")
    p.add_argument("--semi-pd-decode-sm", type=int, default=S,
                   help="the decode lane's initial SM share, percent (default 100)")
    p.add_argument("--semi-pd-adaptive", action="store_true", default=S,
                   help="move the SM shares toward the SLO that fails (--ttft-slo-s, "
                        "--itl-slo-s) every window")
    p.add_argument("--semi-pd-window-s", type=float, default=S,
                   help="seconds per window of the SLO-aware split (default 1)")
    p.add_argument("--semi-pd-prefill-tokens", type=int, default=S,
                   help="the prefill lane's tokens per step (default 4096)")
    p.add_argument("--semi-pd-decode-first", action="store_true", default=S,
                   help="experimental: CUDA stream priorities for the decode lane's kernels "
                        "(measured no shorter decode wait on an H100, benchmarks/README.md)")
    p.add_argument("--semi-pd-decode-overlap", action="store_true", default=S,
                   help="the decode lane runs the overlapped step, its freed blocks held back "
                        "until its steps are done (default: the plain step)")
    p.add_argument("--semi-pd-prefill-overlap", action=argparse.BooleanOptionalAction,
                   default=S,
                   help="the prefill lane runs the overlapped step: the host schedules its "
                        "next chunk while the GPU computes this one (default: on)")
    p.add_argument("--semi-pd-first-token", choices=("prefill", "decode"), default=S,
                   help="which lane sends a request's first token: the prefill lane once "
                        "sampled (default), or the decode lane as it adopts the request (the "
                        "first gap one decode step, not the handoff; TTFT later by that wait)")
    p.add_argument("--semi-pd-decode-lock-first", action="store_true", default=S,
                   help="the prefill lane's scheduler hands the storage lock to a waiting decode "
                        "lane between two admissions (default: off)")
    p.add_argument("--address", default=S, help="join this Ray cluster instead of starting one")
    p.add_argument("--host", default=S, help="address the frontends bind")
    p.add_argument("--grpc-port", type=int, default=S)
    p.add_argument("--http-port", type=int, default=S)
    p.add_argument("--metrics-port", type=int, default=S,
                   help="serve /metrics on its own port (it is always on the HTTP port too)")
    p.add_argument("--api-key", dest="api_keys", action="append", default=S,
                   help="accept this bearer key")
    p.add_argument("--admin-key", dest="admin_keys", action="append", default=S,
                   help="key for admin calls")
    p.add_argument("--api-key-file", default=S, help="file of accepted keys, one per line")
    p.add_argument("--admin-key-file", default=S, help="file of admin keys, one per line")
    p.add_argument("--tls-cert", "--tls-cert-file", dest="tls_cert", default=S)
    p.add_argument("--tls-key", "--tls-key-file", dest="tls_key", default=S)
    p.add_argument("--placement-resource-prefix", default=S,
                   help="place each role on nodes offering the custom resource PREFIX<role>, "
                        "e.g. kvrelay_ -> kvrelay_prefill / kvrelay_decode")
    p.add_argument("--k8s-watch", action="store_true", default=S,
                   help="watch Kubernetes nodes and pods for termination notices")
    p.add_argument("--k8s-namespace", default=S, help="namespace of the worker pods")
    p.add_argument("--metadata-url", default=S,
                   help="cloud metadata endpoint each worker polls for its spot notice")
    p.add_argument("--metadata-parser", default=S, choices=METADATA_PARSERS)
    p.add_argument("--metadata-interval-s", type=float, default=S)
    p.add_argument("--preemption-grace-s", type=float, default=S,
                   help="notice a worker's SIGTERM gives before it must be gone")
    p.add_argument("--admission-wait-s", type=_positive_float, default=S,
                   help="how long a request waits for a worker with room before 503")
    p.add_argument("--shutdown-grace-s", type=float, default=S,
                   help="on SIGTERM, how long in-flight requests get to finish")
    p.add_argument("--controller-probe-timeout-s", type=_positive_float, default=S,
                   help="a liveness probe of the controller unanswered this long is missed; "
                        "3 missed in a row (1 s apart): the controller is hung, serve exits 1")
    p.add_argument("--http-header-timeout-s", type=_positive_float, default=S,
                   help="close an HTTP connection whose request head is not in by then")
    p.add_argument("--http-body-timeout-s", type=_positive_float, default=S,
                   help="answer 408 and close when a request body is not in by then")
    p.add_argument("--http-max-connections", type=int, default=S)
    p.add_argument("--max-concurrent-streams", type=int, default=S)
    p.add_argument("--max-queue-depth", type=int, default=S)
    p.add_argument("--threads-per-worker", type=int, default=S)
    p.add_argument("--device", default=S, choices=DEVICES,
                   help="where workers compute: auto = a GPU where the node has one")
    p.add_argument("--dtype", default=S, choices=DTYPES,
                   help="compute dtype: auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--gpus-per-worker", type=_positive_float, default=S,
                   help="GPU share per worker (default: one each, or an equal share when "
                        "the local machine has fewer GPUs than workers)")
    p.add_argument("--kv-cache-gb", type=float, default=S, help="device KV pool per worker")
    p.add_argument("--cpu-kv-gb", type=float, default=S, help="host KV tier per worker")
    p.add_argument("--block-size", type=int, default=S)
    p.add_argument("--max-num-seqs", type=int, default=S)
    p.add_argument("--decode-seqs", type=int, default=S,
                   help="a decode worker's / semi-PD decode lane's max_num_seqs at least (the "
                        "batch its CUDA graphs hold; it adopts every request handed over; 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=S)
    p.add_argument("--policy", default=S, choices=POLICIES,
                   help="scheduling policy inside each worker (deadline: a waiting request past "
                        "its --ttft-slo-s goes behind those that can still make theirs)")
    p.add_argument("--preemption-mode", default=S, choices=PREEMPTION_MODES,
                   help="how a worker preempts when KV blocks run out")
    p.add_argument("--overlap-schedule", action=argparse.BooleanOptionalAction, default=S,
                   help="schedule step N+1 while the device runs step N (default: on for CUDA "
                        "workers, off for CPU ones)")
    p.add_argument("--capture-graphs", action="store_true", default=S,
                   help="capture every decode CUDA graph when a worker starts, not at a batch "
                        "shape's first step (which that capture stalls)")
    p.add_argument("--router", default=S, choices=ROUTERS)
    p.add_argument("--ttft-slo-s", type=float, default=S)
    p.add_argument("--itl-slo-s", type=float, default=S)
    p.add_argument("--auto-pool-sizing", action="store_true", default=S,
                   help="let the SLO-aware planner switch workers between prefill and decode")
    p.add_argument("--autosize-interval-s", type=_positive_float, default=S,
                   help="seconds between the pool-sizing planner's decisions")
    p.add_argument("--autosize-window-s", type=_positive_float, default=S,
                   help="seconds of arrivals the pool-sizing planner measures the load over")
    p.add_argument("--no-conditional-disagg", dest="conditional_disagg", action="store_false",
                   default=S, help="always hand off, even when the decode worker holds the prompt")
    p.add_argument("--no-prefix-pull", dest="prefix_pull", action="store_false", default=S,
                   help="recompute prefixes another worker holds instead of pulling them")
    p.add_argument("--transport-host", default=S,
                   help="routable address for KV transport rendezvous, or 'auto' (multi-host)")
    p.add_argument("--transport-bind", default=S,
                   help="address workers bind for KV transfers: an IP or 'auto' (the node's)")
    p.add_argument("--transport-interface", default=S, help="NIC for KV transfers")
    p.add_argument("--cpus-per-worker", type=float, default=S)
    add_sparse_arguments(p)
    p.add_argument("--no-watch-nodes", dest="watch_nodes", action="store_false", default=S,
                   help="do not start workers on nodes that join")


def add_sparse_arguments(p: argparse.ArgumentParser) -> None:
    """The sparse-attention flags of ``kvrelay serve`` and ``kvrelay generate``; like the serve
    flags they have no defaults of their own (ServeConfig's fields hold them)."""
    S = argparse.SUPPRESS
    p.add_argument("--sparse-attention", default=S, choices=SPARSE_MODES,
                   help="LServe/SampleAttention sparse attention in decode, prefill or both")
    p.add_argument("--sparse-budget", type=int, default=S,
                   help="decode tokens a dense head reads beyond its first and last 64-token pages")
    p.add_argument("--sparse-shortlist-steps", type=int, default=S,
                   help="decode steps a shortlist of blocks is kept and re-ranked exactly by "
                        "each step's query before the bounds are scored anew (default 2; 1: "
                        "every step)")
    p.add_argument("--sparse-heads", default=S,
                   help="streaming-head mask from `kvrelay calibrate-heads` (default: the one "
                        "beside the model, if any; else every head dense)")


def sparse_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``SparseConfig`` keyword arguments from ``add_sparse_arguments`` flags (``kvrelay
    generate``), ServeConfig's defaults for the flags not given."""
    given = {k: v for k, v in vars(args).items() if k.startswith("sparse_")}
    cfg = ServeConfig(**given)
    return {
        "mode": cfg.sparse_attention,
        "budget": cfg.sparse_budget,
        "shortlist_steps": cfg.sparse_shortlist_steps,
        "heads_path": cfg.sparse_heads,
    }


__all__ = [
    "ConfigError",
    "ServeConfig",
    "add_serve_arguments",
    "add_sparse_arguments",
    "config_or_exit",
    "read_config_file",
    "sparse_settings",
]
