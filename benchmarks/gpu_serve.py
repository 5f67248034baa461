"""kvrelay served on one GPU: ``Cluster.start`` (a local Ray cluster, as ``kvrelay serve`` runs
it) with 1 prefill + 1 decode worker sharing the GPU (0.5 each), KV handed off through CUDA IPC,
requests through the public gRPC API.

    python benchmarks/gpu_serve.py --tokenizer DIR [--out DIR] [--goodput]   # on the GPU machine

The model is a random-weight bf16/fp32 Llama with the shapes of Llama-3.2-1B (hidden 2048, 16
layers, 32/8 heads, intermediate 8192, tied) and SmolLM2's tokenizer and vocabulary (49152),
written with transformers' ``save_pretrained`` (the default model's GGUF is over the GPU
machine's transfer limit). Checks, fp32 (TF32 off):

* every worker computes on CUDA (its process holds the GPU share placement gave it);
* 8 prompts sent one at a time: the served greedy tokens equal our engine's, run alone on the
  same GPU (same kernels and shapes, so bit-identical is expected);
* 16 concurrent: the fraction of tokens equal to the reference (batch composition changes fp32
  reduction order: near-ties of random weights may flip, so this is reported, not asserted);
* one handoff per request, bytes = prompt blocks x block bytes, all over the same-GPU IPC path.

With ``--semi-pd`` the served cluster is ONE semi-PD worker owning the GPU instead (issue 16:
prefill and decode lanes over one KV storage): the same token checks, and every handoff stays
inside it — no controller handoff, one internal handover per request, 0 transport bytes.

With ``--goodput``, benchmarks/goodput_bench.py then runs on the GPU with bf16 workers (PD,
colocated and the pool-sizing planner at equal worker count) and its table is kept in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
    # Llama-3.1-8B's layers (issue 16's goodput where a 2048-token chunk takes ~50 ms, so the
    # 50 ms ITL target binds a colocated engine's chunk size); SmolLM2's vocabulary, tied
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,  # CPU dry runs
                 num_attention_heads=4, num_key_value_heads=2),
    # tokens as cheap as a real model makes them (serve_path_bench: the served path's ceiling);
    # its 512 token ids are a prefix of the tokenizer's, so they detokenize as usual
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}


def make_model(out: Path, tokenizer: Path, dtype: torch.dtype, shape: str, device: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape_kw: dict[str, Any] = {"vocab_size": 49152, **SHAPES[shape]}
    cfg = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **shape_kw)
    torch.manual_seed(0)
    # 8b: initialised in its own dtype (fp32 first would take 32 GB); the others in fp32 and
    # cast, as they always were (the same weights as earlier runs)
    init_dtype = dtype if shape == "8b" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(init_dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, out / name)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def prompts_for(tok_dir: Path, n: int) -> list[list[int]]:
    from kvrelay.workers.model.source import load_tokenizer

    _, tok, _ = load_tokenizer(str(tok_dir))
    topics = ["the moon", "volcanoes", "a lighthouse", "bread", "chess", "rivers", "paper",
              "octopuses", "rain", "jazz", "glaciers", "bees", "computers", "cacti", "trains",
              "origami"]
    return [tok.encode(f"Tell me about {topics[i % 16]}." + " Be precise." * (i * 7 % 40))
            for i in range(n)]


def reference(model: Path, prompts: list[list[int]], max_tokens: int,
              device: str) -> list[list[int]]:
    from kvrelay.workers.engine.config import EngineConfig
    from kvrelay.workers.llm import LLM
    from kvrelay.workers.types import SamplingParams

    llm = LLM(str(model), device=device, dtype=torch.float32,
              engine_config=EngineConfig(kv_cache_gb=2.0))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out = [list(llm.generate([p], params)[0].token_ids) for p in prompts]  # one at a time
    del llm
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def check_served(model: Path, prompts: list[list[int]], expected: list[list[int]],
                 max_tokens: int, device: str, semi_pd: bool = False) -> dict[str, Any]:
    from kvrelay.client import Client
    from kvrelay.cluster.runtime.config import ServeConfig
    from kvrelay.cluster.runtime.serve import Cluster

    cfg = ServeConfig(model=str(model), device=device, dtype="float32", kv_cache_gb=2.0,
                      grpc_port=0, http_port=None, threads_per_worker=2,
                      router="least_loaded", conditional_disagg=False, prefix_pull=False,
                      enable_prefix_caching=False)
    if semi_pd:
        cfg = cfg.model_copy(update={"prefill_workers": 0, "decode_workers": 0,
                                     "colocated_workers": 1, "semi_pd": True})
    greedy = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    with Cluster.start(cfg) as cluster:
        devices = cluster.call("worker_devices")
        with Client(f"127.0.0.1:{cluster.ports['grpc_port']}", timeout=300) as client:
            def one_by_one() -> list[list[int]]:
                return [list(client.generate(token_ids=p, **greedy).token_ids)
                        for p in prompts[:8]]

            t0 = time.perf_counter()
            cold = one_by_one()  # the workers' first requests
            sequential_s = time.perf_counter() - t0
            with ThreadPoolExecutor(len(prompts)) as pool:
                t0 = time.perf_counter()
                futures = [pool.submit(client.generate, token_ids=p, **greedy) for p in prompts]
                together = [list(f.result().token_ids) for f in futures]
                concurrent_s = time.perf_counter() - t0
            warm = one_by_one()  # the same, once every batch shape has run
        counters = cluster.counters()
        totals = cluster.call("transport_totals")
        handovers = sum(f.get("handovers", 0) for f in cluster.integrity().values())
    blocks = sum(-(-len(p) // cfg.block_size) for p in prompts[:8] + prompts + prompts[:8])

    def divergence(got: list[list[int]]) -> list[int | None]:
        """Per prompt: the first token index where ``got`` leaves the reference (None: equal)."""
        return [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
                for x, y in zip(got, expected, strict=False)]

    return {
        "worker_devices": devices,
        "sequential_cold_identical": cold == expected[:8],
        "sequential_warm_identical": warm == expected[:8],
        "concurrent_identical": together == expected,
        "divergence": {"cold": divergence(cold), "warm": divergence(warm),
                       "concurrent": divergence(together)},
        "tokens": {"reference": expected[:8], "cold": cold, "warm": warm},
        "semi_pd": semi_pd, "internal_handovers": handovers,
        "handoffs": counters["handoffs"], "requests": 16 + len(prompts),
        "handoff_bytes": counters["handoff_bytes"],
        "expected_bytes": blocks * counters["block_bytes"],
        "transport_totals": totals, "sequential_s": sequential_s, "concurrent_s": concurrent_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer files")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--goodput", action="store_true")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run")
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--goodput-only", action="store_true", help="skip the correctness checks")
    ap.add_argument("--goodput-args", default="", help="extra goodput_bench arguments")
    ap.add_argument("--semi-pd", action="store_true",
                    help="check one semi-PD worker (shared KV storage) instead of 1P+1D")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Path(args.tokenizer)
    dev = args.device
    ok = True
    if not args.goodput_only:
        ok = check(args, tok, out)
    if args.goodput:
        bf16 = make_model(Path(f"/tmp/kvrelay-{args.shape}-bf16"), tok, torch.bfloat16,
                          args.shape, dev)
        argv = [sys.executable, str(ROOT / "benchmarks" / "goodput_bench.py"), "--model", str(bf16),
                "--device", dev, "--out", str(out), *args.goodput_args.split()]
        print("goodput:", " ".join(argv), flush=True)
        subprocess.run(argv, check=False)
    return 0 if ok else 1


def check(args: argparse.Namespace, tok: Path, out: Path) -> bool:
    dev = args.device
    fp32 = make_model(Path(f"/tmp/kvrelay-{args.shape}-fp32"), tok, torch.float32, args.shape, dev)
    prompts = prompts_for(tok, 16)
    expected = reference(fp32, prompts, args.max_tokens, dev)
    result = check_served(fp32, prompts, expected, args.max_tokens, dev, semi_pd=args.semi_pd)
    print("GPU-SERVE " + json.dumps({k: v for k, v in result.items() if k != "tokens"}), flush=True)
    (out / "gpu_serve.json").write_text(json.dumps(result, indent=1))
    if args.semi_pd:  # every handoff inside the worker, by block ids: no byte on a transport
        moved = sum(t.get("bytes_sent", 0) for t in result["transport_totals"].values())
        handed = (result["handoffs"] == 0 and moved == 0
                  and result["internal_handovers"] == result["requests"])
    else:
        handed = (result["handoffs"] == result["requests"]
                  and result["handoff_bytes"] == result["expected_bytes"])
    ok = (result["sequential_warm_identical"] and handed
          and all(d.startswith(dev) and d.endswith("/float32")
                  for d in result["worker_devices"].values()))
    print("checks", "PASSED" if ok else "FAILED", flush=True)
    return bool(ok)


if __name__ == "__main__":
    raise SystemExit(main())
