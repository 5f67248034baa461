"""KV transport on a GPU machine, without Ray: two processes on one GPU hand off KV blocks.

The pytest process sends; a peer process (this file run as a script: it must not be forked
after CUDA is initialised) receives into its own cache and reports whether the bits match.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kvrelay.workers.transport.kv_transport import KVTransport, start_rendezvous_store

GEOMETRY = (30, 2, 16, 3, 64)  # SmolLM2-135M: [L, 2, bs, Hkv, D]
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4
SRC_IDS = [5, 0, 63, 17, 18, 19, 40, 2, 3, 4, 50, 51, 52, 53, 9, 33]
DST_IDS = list(range(31, 15, -1))
# later transfers: a smaller one (reuses the IPC staging buffer) and a larger one (grows it)
MORE = [("req-2", [1, 2, 3, 60], [0, 1, 2, 3]), ("req-3", list(range(10, 42)), list(range(32)))]


def source_cache(device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    return torch.randn((64, *GEOMETRY), generator=gen).to(device)


def run_peer(port: int, device: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, str(port), device],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def peer_result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.gpu
@pytest.mark.parametrize("sender_device", ["cuda", "cpu"])
def test_handoff_to_a_process_on_the_same_gpu_is_bit_identical(sender_device: str) -> None:
    """cuda -> cuda on one GPU goes through CUDA IPC; cpu -> cuda through gloo staging."""
    store, port = start_rendezvous_store()
    peer = run_peer(port, "cuda:0")
    with KVTransport("p", "127.0.0.1", port, device=sender_device, timeout_s=60) as p:
        cache = source_cache(sender_device)
        assert p.send_blocks("d", "req-1", cache, SRC_IDS) == len(SRC_IDS) * BLOCK_BYTES
        assert p.path("d") == ("cuda-ipc" if sender_device == "cuda" else "gloo")
        for tid, src, _ in MORE:
            p.send_blocks("d", tid, cache, src)
        got = peer_result(peer)
        sent = p.stats().peers["d"].bytes_sent
    assert got["equal"] == [True, True, True]
    assert got["received"] == sent == (16 + 4 + 32) * BLOCK_BYTES
    del store


def _peer(port: int, device: str) -> dict:
    with KVTransport("d", "127.0.0.1", port, device=device, timeout_s=60) as d:
        source = source_cache("cpu")
        equal = []
        for tid, src, dst in [("req-1", SRC_IDS, DST_IDS), *MORE]:
            cache = torch.zeros((32, *GEOMETRY), device=device)
            d.recv_blocks("p", tid, cache, dst)
            torch.cuda.synchronize()
            got = cache[dst].cpu().view(torch.int32)
            equal.append(torch.equal(got, source[src].view(torch.int32)))
        return {"equal": equal, "received": d.stats().peers["p"].bytes_received}


if __name__ == "__main__":
    print(json.dumps(_peer(int(sys.argv[1]), sys.argv[2])), flush=True)
