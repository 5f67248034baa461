"""Placement decisions (cluster/placement/placement.py) and `kvrelay node` command lines (cli/node.py)."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest
import torch

from kvrelay.cluster.cli.node import NodeArgs, add_node_command, node_args_from, ray_start_argv
from kvrelay.cluster.placement.node_pools import NodeChange, NodePools, NodeWatcher
from kvrelay.cluster.placement.placement import (
    NoCapacity,
    PlacedWorker,
    PlacementPolicy,
    check_transport_host,
    diff_nodes,
    fill_plan,
    gpu_share,
    parse_nodes,
    place,
    workers_on,
)
from kvrelay.workers.model.config import resolve_device_dtype


def ray_node(
    nid: str, ip: str, alive: bool = True, labels: dict | None = None, **res: float
) -> dict:
    """A ``ray.nodes()`` entry as Ray 2.60 returns it (the keys placement reads)."""
    return {
        "NodeID": nid,
        "NodeManagerAddress": ip,
        "Alive": alive,
        "Resources": res,
        "Labels": labels or {},
        "NodeManagerPort": 1,
    }


HEAD = ray_node("n0", "10.0.0.1", **{"node:__internal_head__": 1.0, "CPU": 0.0})
P = ray_node("n1", "10.0.0.2", CPU=4.0, kvrelay_prefill=2.0)
D = ray_node("n2", "10.0.0.3", CPU=4.0, kvrelay_decode=1.0)
GPU = ray_node("n3", "10.0.0.4", CPU=16.0, GPU=2.0, kvrelay_decode=8.0)
PLAIN = ray_node("n4", "10.0.0.5", CPU=2.0)


def test_parse_nodes_types_ray_entries_and_finds_the_head() -> None:
    nodes = parse_nodes([P, HEAD])
    assert [n.node_id for n in nodes] == ["n0", "n1"]
    assert nodes[0].is_head and not nodes[1].is_head
    assert nodes[1].resources["kvrelay_prefill"] == 2.0 and nodes[1].ip == "10.0.0.2"
    with pytest.raises(ValueError, match="malformed"):
        parse_nodes([{"NodeID": "", "NodeManagerAddress": "1.2.3.4"}])


def test_pools_go_to_the_nodes_that_advertise_their_role() -> None:
    nodes = parse_nodes([HEAD, P, D, PLAIN])
    p = place("prefill", nodes, [])
    d = place("decode", nodes, [])
    assert (p.node_id, p.node_ip, dict(p.resources)) == ("n1", "10.0.0.2", {"kvrelay_prefill": 1.0})
    assert (d.node_id, dict(d.resources)) == ("n2", {"kvrelay_decode": 1.0})
    # colocated is pinned nowhere: a node pinned to no role first, never the 0-CPU head
    assert place("colocated", nodes, []).node_id == "n4"


def test_role_slots_are_respected_then_no_capacity_says_why() -> None:
    nodes = parse_nodes([P, D])
    placed = [PlacedWorker("d-0", "decode", "n2")]
    with pytest.raises(NoCapacity, match=r"decode worker on 10\.0\.0\.3"):
        place("decode", nodes, placed)
    placed = [PlacedWorker("p-0", "prefill", "n1"), PlacedWorker("p-1", "prefill", "n1")]
    with pytest.raises(NoCapacity):
        place("prefill", nodes, placed)
    with pytest.raises(NoCapacity, match="no alive"):
        place("prefill", (), [])


def test_one_worker_per_gpu_and_cpu_slices() -> None:
    gpu = parse_nodes([GPU])
    placed: list[PlacedWorker] = []
    for i in range(2):
        p = place("decode", gpu, placed)
        assert p.num_gpus == 1.0
        placed.append(PlacedWorker(f"d-{i}", "decode", p.node_id))
    with pytest.raises(NoCapacity):  # 8 decode slots advertised, but only 2 GPUs
        place("decode", gpu, placed)
    cpu = parse_nodes([ray_node("c", "10.0.0.9", CPU=8.0)])
    policy = PlacementPolicy(cpus_per_worker=4.0)
    p = place("colocated", cpu, [], policy)
    assert (p.num_cpus, p.num_gpus, p.threads) == (4.0, 0.0, 4)
    two = [PlacedWorker("a", "colocated", "c"), PlacedWorker("b", "prefill", "c")]
    with pytest.raises(NoCapacity):  # every role counts against the node's cores
        place("colocated", cpu, two, policy)


def test_device_setting_decides_whether_workers_take_gpus() -> None:
    one_gpu = parse_nodes([ray_node("g", "10.0.0.8", CPU=8.0, GPU=1.0)])
    half = PlacementPolicy(role_resources={}, gpus_per_worker=gpu_share(1.0, 2, None))
    placed: list[PlacedWorker] = []
    for i, role in enumerate(("prefill", "decode")):  # 1P + 1D share the machine's one GPU
        p = place(role, one_gpu, placed, half)
        assert p.num_gpus == 0.5
        placed.append(PlacedWorker(f"w-{i}", role, p.node_id))
    with pytest.raises(NoCapacity):
        place("decode", one_gpu, placed, half)
    thirds = PlacementPolicy(role_resources={}, gpus_per_worker=gpu_share(1.0, 3, None))
    three: list[PlacedWorker] = []
    for i in range(3):  # 1/3 does not round a slot away
        three.append(PlacedWorker(f"t-{i}", "colocated", place("colocated", one_gpu, three, thirds).node_id))
    cpu_only = PlacementPolicy(role_resources={}, device="cpu", cpus_per_worker=2.0)
    p = place("decode", one_gpu, [], cpu_only)
    assert (p.num_gpus, p.num_cpus) == (0.0, 2.0)  # --device cpu: the GPU is left alone
    cuda = PlacementPolicy(role_resources={}, device="cuda")
    with pytest.raises(NoCapacity):  # --device cuda: CPU nodes are no place for a worker
        place("decode", parse_nodes([PLAIN]), [], cuda)
    assert (gpu_share(8.0, 2, None), gpu_share(0.0, 2, None), gpu_share(1.0, 2, 0.25)) == (
        1.0, 1.0, 0.25,
    )
    with pytest.raises(ValueError, match="device"):
        PlacementPolicy(device="tpu")


def test_worker_device_and_dtype_resolution() -> None:
    assert resolve_device_dtype("auto", "auto", has_gpu=True) == ("cuda", torch.bfloat16)
    assert resolve_device_dtype("auto", "auto", has_gpu=False) == ("cpu", torch.float32)
    assert resolve_device_dtype("cpu", "auto", has_gpu=True) == ("cpu", torch.float32)
    assert resolve_device_dtype("cuda", "float32", has_gpu=True) == ("cuda", torch.float32)
    with pytest.raises(ValueError, match="no GPU"):
        resolve_device_dtype("cuda", "auto", has_gpu=False)
    with pytest.raises(ValueError, match="device"):
        resolve_device_dtype("gpu", "auto", has_gpu=True)


def test_label_pins_and_spreading_over_the_group() -> None:
    a = ray_node("a", "10.0.1.1", CPU=2.0, labels={"pool": "fast"})
    b = ray_node("b", "10.0.1.2", CPU=2.0, labels={"pool": "fast"})
    c = ray_node("c", "10.0.1.3", CPU=8.0)
    nodes = parse_nodes([a, b, c])
    policy = PlacementPolicy(pool_labels={"decode": {"pool": "fast"}})
    first = place("decode", nodes, [], policy)
    assert first.node_id == "a" and not first.resources
    second = place("decode", nodes, [PlacedWorker("x", "decode", "a")], policy)
    assert second.node_id == "b"  # most free slots: spreads over the labelled group
    assert place("prefill", nodes, [], policy).node_id == "c"  # unpinned avoids others' nodes


def test_policy_validation_and_resource_prefix() -> None:
    with pytest.raises(ValueError):
        PlacementPolicy(cpus_per_worker=0)
    with pytest.raises(ValueError, match="unknown role"):
        PlacementPolicy(pool_labels={"router": {"a": "b"}})
    with pytest.raises(ValueError):
        place("router", parse_nodes([P]), [])
    policy = PlacementPolicy.from_prefix("pool_")
    nodes = parse_nodes([ray_node("z", "10.0.2.1", CPU=2.0, pool_decode=1.0), P])
    assert place("decode", nodes, [], policy).node_id == "z"


def test_actor_options_pin_the_node_and_pass_the_interface() -> None:
    hex_id = "ab" * 28  # Ray validates node ids: 28 bytes of hex
    node = parse_nodes([{**P, "NodeID": hex_id}])
    opts = place("prefill", node, [], PlacementPolicy(interface="eth1")).actor_options()
    assert opts["resources"] == {"kvrelay_prefill": 1.0} and opts["num_cpus"] == 1.0
    assert (
        opts["scheduling_strategy"].node_id == hex_id and opts["scheduling_strategy"].soft is False
    )
    assert opts["runtime_env"] == {"env_vars": {"GLOO_SOCKET_IFNAME": "eth1"}}


def test_fill_plan_fills_only_pinned_free_slots_of_the_given_nodes() -> None:
    nodes = parse_nodes([HEAD, P, D, PLAIN])
    plan = fill_plan(nodes, [PlacedWorker("p-0", "prefill", "n1")])
    assert sorted((p.role, p.node_id) for p in plan) == [("decode", "n2"), ("prefill", "n1")]
    assert [p.node_id for p in fill_plan(nodes, [], only=["n2"])] == ["n2"]
    assert fill_plan(nodes, [], only=["n4"]) == []  # an unpinned node says no pool


def test_diff_nodes_sees_joins_leaves_and_returns() -> None:
    one = parse_nodes([HEAD, P])
    two = parse_nodes([HEAD, P, D])
    assert diff_nodes(one, two) == ((two[2],), ())
    dead = parse_nodes([HEAD, ray_node("n1", "10.0.0.2", alive=False), D])
    joined, left = diff_nodes(two, dead)
    assert joined == () and [n.node_id for n in left] == ["n1"]
    assert [n.node_id for n in diff_nodes(dead, two).joined] == ["n1"]  # came back
    assert diff_nodes(two, two) == ((), ())
    placed = [PlacedWorker("p-0", "prefill", "n1"), PlacedWorker("d-0", "decode", "n2")]
    assert workers_on([n.node_id for n in left], placed) == ["p-0"]


def test_node_watcher_reports_changes_once() -> None:
    snapshots = iter([parse_nodes([HEAD]), parse_nodes([HEAD, D]), parse_nodes([HEAD, D])])
    watcher = NodeWatcher(lambda: next(snapshots))
    assert [n.node_id for n in watcher.poll().joined] == ["n0"]
    assert [n.node_id for n in watcher.poll().joined] == ["n2"]
    assert watcher.poll() == ((), ())


def test_loopback_transport_refused_on_a_multi_host_cluster() -> None:
    check_transport_host("127.0.0.1", parse_nodes([ray_node("a", "127.0.0.1")]))
    check_transport_host("127.0.0.1", parse_nodes([ray_node("a", "192.0.2.2")]))  # one host
    check_transport_host("10.0.0.2", parse_nodes([P, D]))
    with pytest.raises(ValueError, match="loopback"):
        check_transport_host("127.0.0.1", parse_nodes([P, D]))


# ---- kvrelay node ------------------------------------------------------------------------------
def _parse(*argv: str) -> NodeArgs:
    parser = argparse.ArgumentParser()
    add_node_command(parser.add_subparsers())
    return node_args_from(parser.parse_args(["node", *argv]))


def test_node_command_joins_with_role_resource_label_and_address() -> None:
    args = _parse(
        "--address",
        "10.0.0.1:6379",
        "--role",
        "decode",
        "--num-cpus",
        "8",
        "--cpus-per-worker",
        "2",
        "--node-ip-address",
        "10.0.0.3",
        "--label",
        "zone=a",
    )
    argv = ray_start_argv(args, ray_bin="ray", cpu_count=64)
    assert argv[:3] == ["ray", "start", "--disable-usage-stats"]
    assert "--address=10.0.0.1:6379" in argv and "--node-ip-address=10.0.0.3" in argv
    (res,) = [a for a in argv if a.startswith("--resources=")]
    assert json.loads(res.split("=", 1)[1]) == {"kvrelay_decode": 4}  # 8 cores / 2 per worker
    assert "--labels=kvrelay.io/role=decode,zone=a" in argv
    gpu = ray_start_argv(_parse("--address", "h:1", "--role", "prefill", "--num-gpus", "4"))
    assert '--resources={"kvrelay_prefill":4}' in gpu


def test_node_command_head_and_bad_input() -> None:
    head = ray_start_argv(_parse("--head", "--port", "6380", "--role", "none", "--num-cpus", "0"))
    assert "--head" in head and "--port=6380" in head and "--num-cpus=0" in head
    assert not any(a.startswith("--resources") for a in head)
    for bad in (
        ("--role", "decode"),  # neither --head nor --address
        ("--head", "--address", "h:1", "--role", "decode"),
        ("--address", "nohostport", "--role", "decode"),
        ("--address", "h:1", "--port", "2", "--role", "decode"),
        ("--address", "h:1", "--role", "decode", "--label", "novalue"),
        ("--address", "h:1", "--role", "decode", "--slots", "-1"),
        ("--address", "h:1", "--role", "none", "--slots", "2"),
    ):
        with pytest.raises(ValueError):
            _parse(*bad)


# ---- NodePools: the controller's bookkeeping ----------------------------------------------------
def test_node_pools_place_record_and_react_to_joins_and_leaves() -> None:
    snapshots = [parse_nodes([HEAD, P])]
    pools = NodePools(PlacementPolicy(), read=lambda: snapshots[-1])

    async def scenario() -> None:
        await pools.refresh()
        assert (await pools.poll()) == NodeChange((), (), (), ())
        a = await pools.place("prefill", "p-0")
        b = await pools.place("prefill", "p-1")  # recorded at once: the second slot
        assert a.node_id == b.node_id == "n1"
        with pytest.raises(NoCapacity):
            await pools.place("prefill", "p-2")
        with pytest.raises(ValueError, match="already placed"):
            pools.record("p-0", a)
        snapshots.append(parse_nodes([HEAD, P, D]))
        change = await pools.poll()
        assert [n.node_id for n in change.joined] == ["n2"]
        assert [(p.role, p.node_id) for p in change.start] == [("decode", "n2")]
        pools.record("d-0", change.start[0])
        assert pools.node_of("d-0") is not None and pools.node_of("d-0").ip == "10.0.0.3"
        snapshots.append(parse_nodes([HEAD, D]))
        change = await pools.poll()
        assert change.failed == ("p-0", "p-1") and change.start == ()
        assert [w.worker_id for w in pools.placed()] == ["d-0"]
        assert pools.check_integrity() == {"workers": 1, "nodes": 2, "alive_nodes": 2}

    asyncio.run(scenario())


def test_node_pools_integrity_catches_a_worker_left_on_a_dead_node() -> None:
    snapshots = [parse_nodes([P])]
    pools = NodePools(PlacementPolicy(), read=lambda: snapshots[-1], fill_joined=False)

    async def scenario() -> None:
        await pools.refresh()
        await pools.place("prefill", "p-0")

    asyncio.run(scenario())
    pools._watcher.nodes = parse_nodes([ray_node("n1", "10.0.0.2", alive=False)])
    with pytest.raises(AssertionError, match="dead node"):
        pools.check_integrity()
