"""Decode-only ablation behind benchmarks/README.md (sparse attention): teacher-forced perplexity of
the last 32 tokens of one 2048-token ShareGPT text, dense vs sparse decode variants (no streaming
heads), from one shared dense prefill. CPU, default model: python benchmarks/sparse_decode_ablation.py
"""

# ruff: noqa
import math, copy, torch, time
from kvrelay.workers.model.loader import load_model
from kvrelay.workers.model.llama import AttentionMetadata, kv_cache_shape
from kvrelay.workers.model.sparse_attention import SparseAttention, SparseConfig
from kvrelay.workers.model.sparse_select import HeadShape
from kvrelay.workers.model.calibrate_heads import sharegpt_texts

def main() -> None:
    torch.set_num_threads(2)
    BS=16
    loaded = load_model(None)
    (ids,) = sharegpt_texts(loaded.tokenizer, 1, 2048)
    n=len(ids); steps=32; p=n-steps; nb=-(-n//BS)+1
    kv0 = torch.zeros(kv_cache_shape(loaded.config, nb, BS))
    table = torch.arange(nb, dtype=torch.int32)[None]
    attn = AttentionMetadata(torch.arange(p), table, torch.tensor([p], dtype=torch.int32), torch.tensor([0, p], dtype=torch.int32), False)
    t=time.time(); loaded.model(torch.tensor(ids[:p]), torch.arange(p), kv0, attn); print("prefill", time.time()-t, flush=True)
    def run(sp):
        kv = kv0.clone(); total=0.0
        for pos in range(p-1, n-1):
            if sp is not None: sp.begin_step(["r"], [pos+1], True)
            a = AttentionMetadata(torch.tensor([pos]), table, torch.tensor([pos+1], dtype=torch.int32), torch.tensor([0,1], dtype=torch.int32), True, sparse=sp)
            h = loaded.model(torch.tensor([ids[pos]]), torch.tensor([pos]), kv, a)
            total += float(torch.nn.functional.cross_entropy(loaded.model.compute_logits(h), torch.tensor([ids[pos+1]])))
        return math.exp(total/steps)
    print("dense", run(None), flush=True)
    sp = SparseAttention(SparseConfig(mode="decode", budget=1024), kv0)
    sp.dense = HeadShape(1, 1024//BS, 1)
    print("sink1 local1 +gap", run(sp), sp.stats_extra()["sparse_decode_read_fraction"], flush=True)
    sp = SparseAttention(SparseConfig(mode="decode", budget=1024), kv0)
    print("default 64/64", run(sp), sp.stats_extra()["sparse_decode_read_fraction"], flush=True)
    sp = SparseAttention(SparseConfig(mode="decode", budget=512), kv0)
    print("default 64/64 budget 512", run(sp), sp.stats_extra()["sparse_decode_read_fraction"], flush=True)


if __name__ == "__main__":
    main()
