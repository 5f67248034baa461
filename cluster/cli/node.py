"""``kvrelay node``: add this machine to a kvrelay Ray cluster as a node of one pool.

    kvrelay node --address HEAD_IP:6379 --role decode [--slots N] [--node-ip-address IP]
    kvrelay node --head --port 6379 --node-ip-address IP --role none     # the head node

It wraps ``ray start`` with what placement (cluster/placement/placement.py) reads: the role's custom
resource (``{"kvrelay_decode": N}``: N worker slots of that role) and the label
``kvrelay.io/role=decode``, plus the node's routable address, which Ray and the KV transport
both use. ``--dry-run`` prints the ``ray start`` command instead of running it.

Slots default to one per GPU (``--num-gpus``) or one per ``--cpus-per-worker`` cores of
``--num-cpus`` (all cores when not given). Ray's token authentication is not changed: the
node inherits ``RAY_AUTH_MODE`` / the token from the environment, as the head was started.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from kvrelay.cluster.placement.placement import ROLE_LABEL, ROLE_RESOURCES

NODE_ROLES = (*ROLE_RESOURCES, "none")


@dataclass(frozen=True, slots=True)
class NodeArgs:
    role: str
    address: str | None = None  # HEAD_IP:PORT; None with head=True
    head: bool = False
    port: int | None = None  # head only
    node_ip: str | None = None
    slots: int | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    cpus_per_worker: float = 1.0
    labels: tuple[tuple[str, str], ...] = ()
    temp_dir: str | None = None
    object_store_bytes: int | None = None
    block: bool = False
    extra: tuple[str, ...] = ()  # passed to ``ray start`` as they are

    def __post_init__(self) -> None:
        if self.role not in NODE_ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {NODE_ROLES}")
        if self.head == (self.address is not None):
            raise ValueError("give either --head or --address HEAD_IP:PORT (not both)")
        if self.address is not None and not _host_port(self.address):
            raise ValueError(f"--address must be HOST:PORT, got {self.address!r}")
        if self.port is not None and not self.head:
            raise ValueError("--port is for the head node (--head)")
        for name in ("slots", "num_cpus", "num_gpus", "object_store_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"--cpus-per-worker must be positive, got {self.cpus_per_worker}")
        if self.role == "none" and self.slots:
            raise ValueError("--slots needs a --role other than none")
        for key, value in self.labels:
            if not key or "," in key + value or "=" in key:
                raise ValueError(
                    f"bad label {key}={value}: keys and values may not hold ',' or '='"
                )


def role_slots(args: NodeArgs, cpu_count: int) -> int:
    """Worker slots this node offers its role: --slots, else one per GPU, else one per slice
    of cores."""
    if args.slots is not None:
        return args.slots
    if args.num_gpus:
        return args.num_gpus
    cpus = args.num_cpus if args.num_cpus is not None else cpu_count
    return max(1, int(cpus // args.cpus_per_worker)) if cpus else 0


def ray_start_argv(args: NodeArgs, *, ray_bin: str = "ray", cpu_count: int = 1) -> list[str]:
    """The ``ray start`` command line for ``args`` (pure: no environment read)."""
    argv = [ray_bin, "start", "--disable-usage-stats"]
    if args.head:
        argv += ["--head", "--include-dashboard=false"]
        if args.port is not None:
            argv.append(f"--port={args.port}")
    else:
        argv.append(f"--address={args.address}")
    if args.node_ip:
        argv.append(f"--node-ip-address={args.node_ip}")
    if args.num_cpus is not None:
        argv.append(f"--num-cpus={args.num_cpus}")
    if args.num_gpus is not None:
        argv.append(f"--num-gpus={args.num_gpus}")
    if args.temp_dir:
        argv.append(f"--temp-dir={args.temp_dir}")
    if args.object_store_bytes is not None:
        argv.append(f"--object-store-memory={args.object_store_bytes}")
    labels = dict(args.labels)
    if args.role != "none":
        slots = role_slots(args, cpu_count)
        if slots > 0:
            resources = {ROLE_RESOURCES[args.role]: slots}
            argv.append(f"--resources={json.dumps(resources, separators=(',', ':'))}")
        labels[ROLE_LABEL] = args.role
    if labels:
        argv.append("--labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
    if args.block:
        argv.append("--block")
    return argv + list(args.extra)


def add_node_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--role",
        required=True,
        choices=NODE_ROLES,
        help="the pool this node's workers serve (none: no workers, e.g. the head)",
    )
    p.add_argument("--address", default=None, help="the head's HOST:PORT (a joining node)")
    p.add_argument("--head", action="store_true", help="start the cluster's head node here")
    p.add_argument("--port", type=int, default=None, help="the head's GCS port")
    p.add_argument(
        "--node-ip-address",
        dest="node_ip",
        default=None,
        help="this node's routable address (Ray and KV transport bind it)",
    )
    p.add_argument("--slots", type=int, default=None, help="worker slots for the role")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--num-gpus", type=int, default=None)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--label", dest="labels", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--temp-dir", default=None, help="Ray's temp dir on this node (short path)")
    p.add_argument("--object-store-bytes", type=int, default=None)
    p.add_argument("--block", action="store_true", help="stay in the foreground")
    p.add_argument("--dry-run", action="store_true", help="print the ray start command only")


def add_node_command(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("node", help="join (or start) a Ray cluster as a node of a pool")
    add_node_arguments(p)
    p.set_defaults(func=run_node_command)


def node_args_from(ns: argparse.Namespace) -> NodeArgs:
    labels = []
    for item in ns.labels:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--label needs KEY=VALUE, got {item!r}")
        labels.append((key, value))
    return NodeArgs(
        role=ns.role,
        address=ns.address,
        head=ns.head,
        port=ns.port,
        node_ip=ns.node_ip,
        slots=ns.slots,
        num_cpus=ns.num_cpus,
        num_gpus=ns.num_gpus,
        cpus_per_worker=ns.cpus_per_worker,
        labels=tuple(labels),
        temp_dir=ns.temp_dir,
        object_store_bytes=ns.object_store_bytes,
        block=ns.block,
    )


def run_node_command(ns: argparse.Namespace) -> int:
    try:
        args = node_args_from(ns)
    except ValueError as exc:
        print(f"kvrelay node: {exc}", file=sys.stderr)
        return 2
    ray_bin = _ray_executable()
    argv = ray_start_argv(args, ray_bin=ray_bin, cpu_count=os.cpu_count() or 1)
    if ns.dry_run:
        print(shlex.join(argv))
        return 0
    return subprocess.call(argv)


def _ray_executable() -> str:
    """``ray`` next to this interpreter (a venv not on PATH), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "ray")
    return here if os.access(here, os.X_OK) else (shutil.which("ray") or "ray")


def _host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvrelay node",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_node_arguments(parser)
    return run_node_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
