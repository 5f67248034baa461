"""Decode page selection on the real default model (SmolLM2-135M-Instruct GGUF, CPU, fp32) over
real ShareGPT text: at one decode step of a 2k-token context, the middle blocks each dense KV head
selects overlap the exact top blocks by max q·k (its query group's, over the same candidates)."""

from __future__ import annotations

import torch

from kvrelay.kernels.sparse_reference import gather_kv
from kvrelay.workers.model.calibrate_heads import sharegpt_texts
from kvrelay.workers.model.llama import AttentionMetadata, kv_cache_shape
from kvrelay.workers.model.loader import load_model
from kvrelay.workers.model.sparse_attention import SparseAttention, SparseConfig

BS = 16


class _Recorder(SparseAttention):
    """Sparse decode that keeps each layer's query and middle-block selection."""

    def __init__(self, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kw)
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def decode(self, layer, query, kv_cache, attn, scale):  # type: ignore[no-untyped-def,override]
        out = super().decode(layer, query, kv_cache, attn, scale)
        self.seen[layer] = (query[0].clone(), self._topk[layer][0].clone())
        return out


@torch.inference_mode()
def test_selection_overlaps_exact_top_blocks_on_real_text() -> None:
    loaded = load_model(None)
    ids = sharegpt_texts(loaded.tokenizer, 2, 2048)[1]  # not the text the benchmark reports
    n = len(ids)
    nb = n // BS
    kv = torch.zeros(kv_cache_shape(loaded.config, nb + 1, BS))
    table = torch.arange(nb + 1, dtype=torch.int32)[None]
    p = n - 1
    attn = AttentionMetadata(torch.arange(p), table, torch.tensor([p], dtype=torch.int32),
                             torch.tensor([0, p], dtype=torch.int32), False)  # fmt: skip
    loaded.model(torch.tensor(ids[:p]), torch.arange(p), kv, attn)
    # budget 512: 32 of the ~120 middle blocks, a shortlist of 64 (the re-rank sees about half)
    sparse = _Recorder(SparseConfig(mode="decode", budget=512), kv)
    sparse.begin_step(["r"], [n], True)
    attn = AttentionMetadata(torch.tensor([p]), table, torch.tensor([n], dtype=torch.int32),
                             torch.tensor([0, 1], dtype=torch.int32), True, sparse=sparse)  # fmt: skip
    loaded.model(torch.tensor([ids[p]]), torch.tensor([p]), kv, attn)

    shape = sparse.dense
    assert shape.topk == 32 and nb - shape.sink - shape.local > 2 * shape.topk
    overlaps = []
    for layer, (query, picked) in sparse.seen.items():
        k, _ = gather_kv(kv, layer, table[0], n)  # [n, Hkv, D]
        group = query.shape[0] // k.shape[1]
        for g in range(k.shape[1]):
            qk = (query[g * group : (g + 1) * group] @ k[:, g].T).amax(0)  # [n]
            exact = qk.view(nb, BS).amax(1)[shape.sink : nb - shape.local]
            want = set((exact.topk(shape.topk).indices + shape.sink).tolist())
            overlaps.append(len(want & set(picked[g].tolist())) / shape.topk)
    assert len(overlaps) == loaded.config.num_layers * loaded.config.num_kv_heads
    mean = sum(overlaps) / len(overlaps)
    assert mean >= 0.9, (mean, min(overlaps))
