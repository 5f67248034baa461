"""Separate network hosts on one machine, for multi-node tests and benchmarks.

    with NetnsHosts(["head", "p", "d"]) as hosts:      # root only; see why_unavailable()
        hosts.run("p", ["python", "-c", "..."])          # inside host p's network namespace
        hosts.ip("d")                                    # 198.18.x.3
        hosts.link_bytes("p")                            # (rx, tx) of p's side of its veth
        hosts.add("e")                                   # a host that joins later
        hosts.kill("e")                                  # SIGKILL every process in e

Layout: one namespace per host with ``lo`` up and an interface ``eth0``, which is one end of
a veth pair whose other end sits on a bridge in a switch namespace of its own. Nothing is
added to the machine's own namespace, so the test subnet (a /24 from 198.18.0.0/15, the range
set aside for benchmark networks) cannot clash with the machine's routes; it is still chosen
outside every route the machine has (``ip route``). Each host has a default route on ``eth0``
so programs that find "their" address by routing (Ray's ``get_node_ip_address``) get the
host's address.

Names are ``kvrn<pid>-<host>``: a run's namespaces carry its pid, so a later run removes the
ones a killed run left behind (their pid is gone) and leaves a concurrent run's alone.
``close()`` kills every process left in the namespaces (by pid, from ``ip netns pids``) and
deletes them, also when the test failed.

Not a test module: load it by path (tests run with --import-mode=importlib, benchmarks are
scripts), with ``importlib.util.spec_from_file_location``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

PREFIX = "kvrn"
SUBNETS = [ipaddress.ip_network(f"198.18.{n}.0/24") for n in range(77, 97)]


def why_unavailable() -> str | None:
    """None when namespaces can be made here, else the reason (for pytest.skip)."""
    if not sys_platform_linux():
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed: apt-get install -y iproute2"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sys_platform_linux() -> bool:
    return os.uname().sysname == "Linux"


def _ip(*args: str) -> str:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _pids(ns: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_namespace_processes(ns: str, *, grace_s: float = 0.0, timeout_s: float = 10.0) -> int:
    """SIGTERM (when ``grace_s``) then SIGKILL every process in ``ns``; returns how many were
    found. Waits until none is left (processes can fork while we kill: loop)."""
    found: set[int] = set()
    deadline = time.monotonic() + timeout_s
    sig = signal.SIGTERM if grace_s > 0 else signal.SIGKILL
    term_until = time.monotonic() + grace_s
    while True:
        pids = _pids(ns)
        if not pids:
            return len(found)
        found.update(pids)
        if time.monotonic() >= term_until:
            sig = signal.SIGKILL
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in {ns} survived SIGKILL")
        _reap()
        time.sleep(0.05)  # polling the kernel's view, not synchronising on our own work


def _reap() -> None:
    """Collect our own exited children so they stop showing up as zombies in ``ip netns pids``."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def remove_stale() -> list[str]:
    """Delete namespaces (and their processes) a dead run of this harness left behind."""
    removed = []
    for ns in _namespaces():
        if not ns.startswith(PREFIX):
            continue
        owner = ns[len(PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            kill_namespace_processes(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            removed.append(ns)
    return removed


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 from 198.18.0.0/15 that overlaps none of the machine's routes (any table)."""
    routes = []
    for route in json.loads(_ip("-j", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            routes.append(ipaddress.ip_network(dst, strict=False))
    for net in SUBNETS:
        if not any(r.version == 4 and net.overlaps(r) for r in routes):
            return net
    raise RuntimeError("every candidate /24 in 198.18.77.0-198.18.96.0 is routed here")


class NetnsHosts:
    def __init__(self, names: Sequence[str] = (), *, tag: str | None = None) -> None:
        self.tag = f"{PREFIX}{os.getpid()}{'-' + tag if tag else ''}"
        self.switch = f"{self.tag}-sw"
        self.subnet = free_subnet()
        self._hosts: dict[str, str] = {}  # host name -> IP
        self._closed = False
        self.tmp = Path(tempfile.mkdtemp(prefix="kvrn", dir="/tmp"))  # short: unix socket paths
        remove_stale()
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for name in names:
                self.add(name)
        except BaseException:
            self.close()
            raise

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def ip(self, host: str) -> str:
        return self._hosts[host]

    @property
    def hosts(self) -> list[str]:
        return list(self._hosts)

    def add(self, host: str) -> str:
        """Create host ``host`` on the bridge; returns its address."""
        if host in self._hosts or not host.isalnum() or len(host) > 6:
            raise ValueError(f"bad or duplicate host name {host!r} (alphanumeric, <= 6 chars)")
        addr = str(self.subnet.network_address + len(self._hosts) + 1)
        ns, port = self.ns(host), f"p{len(self._hosts)}"
        _ip("netns", "add", ns)
        self._hosts[host] = addr  # registered first: close() removes a half-made host too
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip(
            "-n",
            self.switch,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "dev", "eth0")
        return addr

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(host, argv), **kw)  # type: ignore[call-overload]

    def popen(self, host: str, argv: Sequence[str], **kw: object) -> subprocess.Popen:
        return subprocess.Popen(self.argv(host, argv), **kw)  # type: ignore[call-overload]

    def link_bytes(self, host: str) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of the host's ``eth0`` from /sys/class/net/eth0/statistics
        (``ip netns exec`` mounts the namespace's own sysfs)."""
        out = self.run(
            host,
            [
                "cat",
                "/sys/class/net/eth0/statistics/rx_bytes",
                "/sys/class/net/eth0/statistics/tx_bytes",
            ],
            check=True,
        ).stdout.split()
        return int(out[0]), int(out[1])

    def pids(self, host: str) -> list[int]:
        return _pids(self.ns(host))

    def kill(self, host: str) -> int:
        """SIGKILL every process of ``host`` (a machine that vanishes); the host stays."""
        return kill_namespace_processes(self.ns(host))

    def temp_dir(self, host: str) -> str:
        path = self.tmp / host
        path.mkdir(exist_ok=True)
        return str(path)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors = []
        names = [self.ns(h) for h in self._hosts] + [self.switch]
        for ns in names:  # SIGTERM everything at once, so the grace periods overlap
            for pid in _pids(ns):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(_pids(ns) for ns in names):
            _reap()
            time.sleep(0.05)  # polling the kernel's view of the namespaces
        for ns in names:
            try:
                kill_namespace_processes(ns)  # SIGKILL what is left
            except RuntimeError as exc:
                errors.append(str(exc))
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        left = [ns for ns in _namespaces() if ns.startswith(self.tag)]
        if left or errors:
            raise RuntimeError(f"netns cleanup incomplete: namespaces {left}, {errors}")

    def __enter__(self) -> NetnsHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
