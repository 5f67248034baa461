"""Start the local Ray instance of a single-machine cluster with every listener on loopback.

``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray "resolves" a loopback node
address to the machine's routable one (``services.resolve_ip_for_localhost``), and its C++
servers (GCS, raylet, core workers) bind 127.0.0.1 only when the node address *is* 127.0.0.1;
otherwise they bind every interface. Ray keeps the node address on loopback only where it
believes clusters are unsupported (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` false), so that is
what a local cluster sets while ``ray.init`` runs: in the environment the processes Ray spawns
inherit, and in this process's Ray constants (which may already be imported).

Token auth is off for this cluster (DESIGN.md "Known traps"): nothing off the machine can reach
it, and every process on the machine that could reach it runs as some local user anyway.
"""

from __future__ import annotations

import os
from typing import Any
from unittest import mock

LOOPBACK = "127.0.0.1"
_LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local_ray(**kwargs: Any) -> None:
    """``ray.init`` for a local, loopback-only cluster (no dashboard, no usage stats)."""
    import ray
    from ray._private import ray_constants

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs.setdefault("include_dashboard", False)
    # only while Ray starts: GCS and raylet (and the workers the raylet spawns) inherit it, and
    # a later ray.init(address=...) in this process still resolves a routable address
    with (
        mock.patch.dict(os.environ, {_LOCAL_ONLY: "0"}),
        mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False),
    ):
        ray.init(_node_ip_address=LOOPBACK, **kwargs)
