"""Sparse attention accuracy on the real default model (SmolLM2-135M-Instruct, CPU, fp32), on
ShareGPT text: per-layer attention output error vs dense, perplexity dense vs sparse (prefill over
the whole text; decode teacher-forced over its last ``--decode-tokens``), selection overlap with
the exact top blocks by q·K, and passkey retrieval (a key hidden in ShareGPT text).

    python benchmarks/sparse_accuracy.py --lengths 2048 4096 8192 --budget 1024 \\
        --heads /tmp/heads.json --out benchmarks/results/sparse_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from typing import Any

import torch

from kvrelay import kernels
from kvrelay.kernels.reference import rel_err
from kvrelay.kernels.sparse_reference import gather_kv
from kvrelay.workers.engine.engine import EngineConfig
from kvrelay.workers.llm import LLM
from kvrelay.workers.model.calibrate_heads import sharegpt_texts
from kvrelay.workers.model.llama import AttentionMetadata, kv_cache_shape
from kvrelay.workers.model.loader import LoadedModel, load_model
from kvrelay.workers.model.sparse_attention import SparseAttention, SparseConfig, load_head_mask
from kvrelay.workers.types import SamplingParams

BS = 16


class Probe(SparseAttention):
    """Runs sparse attention, records its error against dense, and returns dense (``exact``) or
    sparse; at decode refreshes it also records the overlap with the exact top blocks."""

    def __init__(self, *args: Any, exact: bool, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.exact = exact
        self.errors: dict[str, list[list[float]]] = {"prefill": [], "decode": []}
        self.overlap: list[float] = []

    def _record(self, kind: str, layer: int, err: float) -> None:
        rows = self.errors[kind]
        while len(rows) <= layer:
            rows.append([])
        rows[layer].append(err)

    def prefill(self, layer, query, kv_cache, attn, scale):  # type: ignore[no-untyped-def,override]
        o = super().prefill(layer, query, kv_cache, attn, scale)
        d = kernels.paged_prefill_attention(
            query, kv_cache, layer, attn.block_tables, attn.query_start_loc, attn.context_lens,
            scale,
        )  # fmt: skip
        self._record("prefill", layer, rel_err(o, d))
        return d if self.exact else o

    def decode(self, layer, query, kv_cache, attn, scale):  # type: ignore[no-untyped-def,override]
        refresh = self._refresh
        o = super().decode(layer, query, kv_cache, attn, scale)
        d = kernels.paged_decode_attention(
            query, kv_cache, layer, attn.block_tables, attn.context_lens, scale
        )
        self._record("decode", layer, rel_err(o, d))
        if refresh and layer in self._topk:
            self._overlap(layer, query, kv_cache, attn)
        return d if self.exact else o

    def _overlap(self, layer, query, kv_cache, attn) -> None:  # type: ignore[no-untyped-def]
        ctx = int(attn.context_lens[0])
        nb = -(-ctx // BS)
        k, _ = gather_kv(kv_cache, layer, attn.block_tables[0], ctx)
        kv_heads = k.shape[1]
        group = query.shape[1] // kv_heads
        topk = self._topk[layer][0]
        kk = topk.shape[-1]
        if nb <= self.dense.width:
            return
        for g in range(kv_heads):
            if self.has_streaming[layer] and bool(self.streaming[layer, g]):
                continue
            qk = (query[0, g * group : (g + 1) * group].float() @ k[:, g].float().T).amax(0)
            qk = torch.nn.functional.pad(qk, (0, nb * BS - ctx), value=-1e30).view(nb, BS)
            # the candidates select_topk ranks: the middle, past the sink, before the local page
            sink, local = self.dense.sink, self.dense.local
            exact = qk.amax(1)[sink : nb - local]
            want = set((exact.topk(kk).indices + sink).tolist())
            self.overlap.append(len(want & set(topk[g].tolist())) / kk)


def nll_prefill(loaded: LoadedModel, ids: list[int], probe: Probe | None) -> float:
    n = len(ids)
    nb = -(-n // BS) + 1
    kv = torch.zeros(kv_cache_shape(loaded.config, nb, BS))
    attn = AttentionMetadata(
        torch.arange(n), torch.arange(nb, dtype=torch.int32)[None],
        torch.tensor([n], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32), False,
        sparse=probe,
    )  # fmt: skip
    if probe is not None:
        probe.bounds = torch.zeros(nb, *probe.bounds.shape[1:])
    hidden = loaded.model(torch.tensor(ids), torch.arange(n), kv, attn)
    logits = loaded.model.compute_logits(hidden[:-1])
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])))


def nll_decode(loaded: LoadedModel, ids: list[int], steps: int, probe: Probe) -> float:
    """Dense prefill of all but the last ``steps`` tokens, then teacher-forced decode."""
    n = len(ids)
    nb = -(-n // BS) + 1
    kv = torch.zeros(kv_cache_shape(loaded.config, nb, BS))
    probe.bounds = torch.zeros(nb, *probe.bounds.shape[1:])
    table = torch.arange(nb, dtype=torch.int32)[None]
    p = n - steps
    attn = AttentionMetadata(torch.arange(p), table, torch.tensor([p], dtype=torch.int32),
                             torch.tensor([0, p], dtype=torch.int32), False)  # fmt: skip
    loaded.model(torch.tensor(ids[:p]), torch.arange(p), kv, attn)
    total = 0.0
    for pos in range(p - 1, n - 1):
        probe.begin_step(["r"], [pos + 1], True)
        attn = AttentionMetadata(torch.tensor([pos]), table, torch.tensor([pos + 1], dtype=torch.int32),
                                 torch.tensor([0, 1], dtype=torch.int32), True, sparse=probe)  # fmt: skip
        # position pos is rewritten with the same token: the cache holds it already (dense)
        hidden = loaded.model(torch.tensor([ids[pos]]), torch.tensor([pos]), kv, attn)
        logits = loaded.model.compute_logits(hidden)
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor([ids[pos + 1]])))
    return total / steps


def passkey_prompts(tok: Any, length: int, count: int, seed: int) -> list[tuple[list[int], str]]:
    rng = random.Random(seed)
    hay = sharegpt_texts(tok, count, length - 120)
    out = []
    for ids in hay:
        key = str(rng.randint(10000, 99999))
        cut = rng.randint(len(ids) // 10, len(ids) * 9 // 10)
        text = (
            "There is a pass key hidden inside a lot of irrelevant text. Find it.\n\n"
            + tok.decode(ids[:cut]) + f"\n\nThe pass key is {key}. Remember it. {key} is the "
            "pass key.\n\n" + tok.decode(ids[cut:]) + "\n\nWhat is the pass key?"
        )  # fmt: skip
        out.append((tok.apply_chat_template([{"role": "user", "content": text}]), key))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--heads", default=None, help="calibrate-heads output (default: none)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--passkeys", type=int, nargs="+", default=[6, 4, 3])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(None)
    c = loaded.config
    cfg = SparseConfig(mode="both", budget=args.budget, heads_path=args.heads)
    mask = load_head_mask(args.heads, c.num_layers, c.num_kv_heads) if args.heads else None
    dummy = torch.zeros(kv_cache_shape(c, 1, BS))
    results: dict[str, Any] = {"budget": args.budget, "heads": args.heads, "lengths": {}}
    for i, length in enumerate(args.lengths):
        t0 = time.time()
        (ids,) = sharegpt_texts(loaded.tokenizer, 1, length)
        dense_probe = Probe(cfg, dummy, mask, exact=True)
        dense_nll = nll_prefill(loaded, ids, dense_probe)
        sparse_nll = nll_prefill(loaded, ids, Probe(cfg, dummy, mask, exact=False))
        dec_exact = Probe(cfg, dummy, mask, exact=True)
        dense_dec = nll_decode(loaded, ids, args.decode_tokens, dec_exact)
        sparse_dec = nll_decode(
            loaded, ids, args.decode_tokens, Probe(cfg, dummy, mask, exact=False)
        )
        row: dict[str, Any] = {
            "ppl_prefill_dense": math.exp(dense_nll), "ppl_prefill_sparse": math.exp(sparse_nll),
            "ppl_decode_dense": math.exp(dense_dec), "ppl_decode_sparse": math.exp(sparse_dec),
            "layer_err_prefill": [sum(e) / len(e) for e in dense_probe.errors["prefill"]],
            "layer_err_decode": [sum(e) / len(e) for e in dec_exact.errors["decode"]],
            "overlap_mean": sum(dec_exact.overlap) / max(1, len(dec_exact.overlap)),
            "overlap_min": min(dec_exact.overlap, default=1.0),
            "prefill_density": dense_probe.stats_extra()["sparse_prefill_density"],
            "decode_read_fraction": dec_exact.stats_extra()["sparse_decode_read_fraction"],
        }  # fmt: skip
        print(length, {k: v for k, v in row.items() if not k.startswith("layer")}, flush=True)
        count = args.passkeys[min(i, len(args.passkeys) - 1)]
        prompts = passkey_prompts(loaded.tokenizer, length, count, seed=length) if count else []
        for mode in ("off", "both") if count else ():
            ec = EngineConfig(
                max_num_batched_tokens=length, kv_cache_gb=length * 50e3 / 2**30 + 0.05,
                sparse=SparseConfig(mode=mode, budget=args.budget, heads_path=args.heads),
                enable_prefix_caching=False,
            )  # fmt: skip
            llm = LLM(engine_config=ec)
            outs = llm.generate([p for p, _ in prompts], SamplingParams(max_tokens=10))
            row[f"passkey_{mode}"] = [
                key in o.text for o, (_, key) in zip(outs, prompts, strict=True)
            ]
            del llm
        row["seconds"] = time.time() - t0
        print(length, "passkey", row.get("passkey_off"), row.get("passkey_both"), flush=True)
        results["lengths"][str(length)] = row
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
