"""Batch-1/8/32 decode graph step of the 1B (and 8B) shape under cuBLAS vs cuBLASLt (torch's
preferred_blas_library), same process, alternating, fresh runner (graphs) per setting. The
cache holds every sequence of the largest batch (make_seqs gives each its own CTX / BS + 1
blocks)."""

import torch

from kvrelay.benchmarks import gpu_bench as g

bw, rate = g.ceilings()
g.say(f"copy {bw:.0f} GB/s")
for shape, batches in (("1b", (1, 8, 32)), ("8b", (1,))):
    hf, model, config = g.build(g.SHAPES[shape])
    hf = None
    cache = torch.empty(
        g.kv_cache_shape(config, max(batches) * (g.CTX // g.BS + 1) + 16, g.BS),
        dtype=torch.bfloat16,
        device="cuda",
    ).normal_(0, 0.5)
    for rnd in range(2):
        for lib in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            g.say(f"## {shape} round {rnd} blas {torch.backends.cuda.preferred_blas_library()}")
            g.ours_decode(g.ModelRunner(model, cache, g.BS), model, config, bw, batches=batches)
            torch.cuda.empty_cache()
    model = cache = None
    torch.backends.cuda.preferred_blas_library("cublas")
    torch.cuda.empty_cache()
