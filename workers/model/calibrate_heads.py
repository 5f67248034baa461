"""``kvrelay calibrate-heads``: pick a model's streaming heads offline, by attention mass on real
text, and store the mask beside the model (workers/model/sparse_attention.py loads it).

A KV head whose query group puts nearly all its attention on the first ``sink`` tokens and the
last ``local`` ones loses little when it reads only those (DuoAttention's streaming heads). For
the last ``rows`` positions of each calibration text the dense prefill's attention is measured,
and a head's score is its mean (sink ∪ local) mass over rows, texts and its query group; the
``fraction`` of heads with the highest score (LServe: half) become streaming heads.

Output, JSON: ``{"streaming": [[bool] * Hkv] * L, "mass": [[float] * Hkv] * L, ...}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from kvrelay import kernels
from kvrelay.kernels.sparse_reference import gather_kv
from kvrelay.workers.model.llama import AttentionMetadata, kv_cache_shape
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.model.sparse_attention import SparseAttention, SparseConfig


class _MassProbe(SparseAttention):
    """Dense prefill that also records each head's (sink ∪ local) attention mass."""

    def __init__(self, kv_cache: torch.Tensor, sink: int, local: int, rows: int) -> None:
        super().__init__(SparseConfig(mode="prefill"), kv_cache)
        self.sink, self.local, self.rows = sink, local, rows
        layers, kv_heads = kv_cache.shape[1], kv_cache.shape[4]
        self.mass = torch.zeros(layers, kv_heads, dtype=torch.float64)
        self.samples = 0

    def prefill(
        self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # fmt: skip
        ctx = int(attn.context_lens[0])
        k, _ = gather_kv(kv_cache, layer, attn.block_tables[0], ctx)  # [ctx, Hkv, D]
        heads, kv_heads = query.shape[1], k.shape[1]
        q = query[-self.rows :].float()  # [r, H, D] (positions ctx - r .. ctx - 1)
        s = torch.einsum("rhd,khd->hrk", q, k.float().repeat_interleave(heads // kv_heads, 1))
        pos = torch.arange(ctx - q.shape[0], ctx)[:, None]
        k_pos = torch.arange(ctx)[None, :]
        s = (s * scale).masked_fill((k_pos > pos)[None], float("-inf"))
        p = torch.softmax(s, -1)
        near = (k_pos < self.sink) | (pos - k_pos < self.local)  # [r, ctx]
        mass = (p * near[None]).sum(-1).mean(-1)  # [H]
        self.mass[layer] += mass.view(kv_heads, -1).mean(-1).double()
        if layer == 0:
            self.samples += 1
        return kernels.paged_prefill_attention(
            query, kv_cache, layer, attn.block_tables, attn.query_start_loc, attn.context_lens,
            scale,
        )  # fmt: skip


@torch.inference_mode()
def head_mass(
    loaded: LoadedModel,
    texts: Sequence[Sequence[int]],
    sink: int = 128,
    local: int = 256,
    rows: int = 64,
    block_size: int = 16,
) -> torch.Tensor:  # [L, Hkv] float64 mean (sink ∪ local) attention mass
    model = loaded.model
    device = model.embed.device
    longest = max(len(t) for t in texts)
    nb = -(-longest // block_size)
    kv = torch.zeros(kv_cache_shape(loaded.config, nb, block_size), dtype=model.embed.dtype,
                     device=device)  # fmt: skip
    probe = _MassProbe(kv, sink, local, rows)
    for ids in texts:
        n = len(ids)
        attn = AttentionMetadata(
            slot_mapping=torch.arange(n, device=device),
            block_tables=torch.arange(nb, device=device, dtype=torch.int32)[None],
            context_lens=torch.tensor([n], device=device, dtype=torch.int32),
            query_start_loc=torch.tensor([0, n], device=device, dtype=torch.int32),
            is_decode=False,
            sparse=probe,
        )
        tokens = torch.tensor(list(ids), device=device)
        model(tokens, torch.arange(n, device=device), kv, attn)
    return probe.mass / max(1, probe.samples)


def pick_streaming(mass: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:  # [L, Hkv] bool
    flat = mass.flatten()
    count = round(fraction * flat.numel())
    streaming = torch.zeros(flat.numel(), dtype=torch.bool)
    if count:
        streaming[flat.topk(count).indices] = True
    return streaming.view_as(mass)


def write_heads(path: Path, mass: torch.Tensor, streaming: torch.Tensor, meta: dict) -> None:
    path.write_text(
        json.dumps(
            {
                "streaming": streaming.tolist(),
                "mass": [[round(float(x), 5) for x in row] for row in mass],
                **meta,
            }
        )
    )


def sharegpt_texts(tokenizer, count: int, tokens: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """``count`` token lists of ``tokens`` each, consecutive ShareGPT messages joined."""
    from kvrelay.benchmarks.multiturn_bench import iter_records, sharegpt_path

    texts: list[list[int]] = []
    buf: list[int] = []
    for rec in iter_records(sharegpt_path()):
        for m in rec.get("conversations") or []:
            buf += tokenizer.encode(str(m.get("value", "")) + "\n\n", False)
        while len(buf) >= tokens and len(texts) < count:
            texts.append(buf[:tokens])
            buf = buf[tokens:]
        if len(texts) == count:
            return texts
    raise ValueError(f"ShareGPT ran out after {len(texts)} texts of {tokens} tokens")


def calibrate(
    source: str | None, count: int, tokens: int, fraction: float, output: str | None,
    threads: int | None = None,
) -> Path:  # fmt: skip
    from kvrelay.workers.model.loader import load_model
    from kvrelay.workers.model.sparse_attention import default_heads_path

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(source)
    texts = sharegpt_texts(loaded.tokenizer, count, min(tokens, loaded.config.max_context))
    mass = head_mass(loaded, texts)
    streaming = pick_streaming(mass, fraction)
    path = Path(output) if output else default_heads_path(loaded.source)
    meta = {"model": loaded.model_id, "texts": count, "tokens": tokens, "sink": 128, "local": 256}
    write_heads(path, mass, streaming, meta)
    return path
