"""The controller's settings: the model it serves, routing, handoff and health timings."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvrelay.cluster.api.backend import ModelInfo
from kvrelay.cluster.routing.adapter import RoutingConfig
from kvrelay.cluster.sizing.autosize import AutosizeConfig


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    model: ModelInfo
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    handoff_timeout_s: float = 30.0
    pull_timeout_s: float = 10.0
    # how long past a transfer's own deadline the controller still waits for a worker's side
    # of it (its answer's way back, and a first transfer's channel setup, which the transport
    # bounds by its own 30 s op timeout): a side still silent then is wedged, and the attempt
    # fails as a refusal does (the request recomputes or decodes where it was prefilled)
    transfer_slack_s: float = 40.0
    itl_slo_s: float = 0.2  # the SLO headroom scorer and the pool sizing aim at these
    autosize: AutosizeConfig | None = None  # SLO-aware pool sizing, when enabled
    heartbeat_interval_s: float = 0.5
    # a process that dies is seen at once (its calls fail); this only catches a hung worker, and
    # must outlast the longest engine step under load (the heartbeat runs between steps)
    heartbeat_timeout_s: float = 60.0
    # role -> configured pool size: what /ready waits for and supervision keeps up
    pool_sizes: tuple[tuple[str, int], ...] = ()
    # a request that no worker can take (startup, all drained, all full) waits this long,
    # then gets UNAVAILABLE (HTTP 503 + Retry-After)
    admission_wait_s: float = 10.0
