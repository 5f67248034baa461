"""Sparse attention accuracy on the real default model (SmolLM2-135M-Instruct, CPU, fp32), on
ShareGPT text: per-layer attention output error vs dense, perplexity dense vs sparse (prefill over
the whole text; decode teacher-forced over its last ``--decode-tokens``), selection overlap with
the exact top blocks by q·K, and passkey retrieval (a key hidden in the classic repeated filler,
or with ``--haystack sharegpt`` in ShareGPT text) under every mode and decode budget.

    python benchmarks/sparse_accuracy.py --lengths 2048 4096 --passkeys 8 3 --threads 1 \\
        --heads benchmarks/results/sparse_heads_smollm2.json --out /tmp/sparse_accuracy.json
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
from kvrelay.workers.model.calibrate_heads import FILLER, sharegpt_texts
from kvrelay.workers.model.llama import AttentionMetadata, kv_cache_shape
from kvrelay.workers.model.loader import LoadedModel, load_model
from kvrelay.workers.model.sparse_attention import SparseAttention, SparseConfig, load_head_mask

BS = 16


class Probe(SparseAttention):
    """Runs sparse attention, records its error against dense, and returns dense (``exact``) or
    sparse; at decode steps it also records the overlap of the selection in use (made now or,
    with ``reuse_steps`` > 1, at an earlier step; with ``shortlist_steps`` > 1 re-ranked now from
    an earlier step's shortlist) with this step's exact top blocks."""

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
        o = super().decode(layer, query, kv_cache, attn, scale)
        d = kernels.paged_decode_attention(
            query, kv_cache, layer, attn.block_tables, attn.context_lens, scale
        )
        self._record("decode", layer, rel_err(o, d))
        if layer in self._topk:  # a reused selection against this step's exact top blocks too
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


INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)


def _haystack(tok: Any, source: list[int] | None, units: int) -> str:
    """``units`` filler sentences' worth, or the first ``units`` tokens of a ShareGPT text."""
    return FILLER * units if source is None else tok.decode(source[:units])


def _render(tok: Any, hay: str, depth: float, key: str) -> list[int]:
    cut = hay.rfind(" ", 0, int(len(hay) * depth)) + 1  # between words
    needle = f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
    text = INTRO + hay[:cut] + needle + hay[cut:] + "\n\nWhat is the pass key?"
    return tok.apply_chat_template([{"role": "user", "content": text}])


def passkey_prompts(
    tok: Any, length: int, count: int, seed: int, haystack: str, max_context: int
) -> list[tuple[list[int], str]]:
    """``count`` chat prompts of ``length`` tokens or a few more (but at most ``max_context`` - 32:
    room for the answer), each hiding a 5-digit key at a random depth of the haystack: the classic repeated
    filler (``repeat``) or consecutive ShareGPT messages (``sharegpt``)."""
    rng = random.Random(seed)
    target = min(length, max_context - 32)
    sources = sharegpt_texts(tok, count, target) if haystack == "sharegpt" else [None] * count
    unit = len(tok.encode(FILLER * 64, False)) / 64 if haystack == "repeat" else 1.0
    out = []
    for src in sources:
        key = str(rng.randint(10000, 99999))
        depth = rng.uniform(0.05, 0.95)
        units = int((target - len(_render(tok, _haystack(tok, src, 0), depth, key))) / unit)
        ids = _render(tok, _haystack(tok, src, units), depth, key)
        while len(ids) > target:  # never past the target (the model's context)
            units -= max(1, int((len(ids) - target) / unit))
            ids = _render(tok, _haystack(tok, src, units), depth, key)
        while len(ids) < length and target == length:  # at least `length` (min_prefill: 2048)
            units += 1
            ids = _render(tok, _haystack(tok, src, units), depth, key)
        out.append((ids, key))
    return out


def _greedy(
    loaded: LoadedModel, ids: list[int], kv: torch.Tensor, first: int, steps: int,
    sparse: SparseAttention | None,
) -> list[int]:  # fmt: skip
    """Greedy decode of ``steps`` tokens after a prefill of ``ids`` (already in ``kv``) whose
    last logits chose ``first``; stops at EOS."""
    table = torch.arange(kv.shape[0], dtype=torch.int32)[None]
    out = [first]
    eos = set(loaded.tokenizer.eos_token_ids)
    for pos in range(len(ids), len(ids) + steps - 1):
        if out[-1] in eos:
            break
        if sparse is not None:
            sparse.begin_step(["r"], [pos + 1], True)
        attn = AttentionMetadata(torch.tensor([pos]), table, torch.tensor([pos + 1], dtype=torch.int32),
                                 torch.tensor([0, 1], dtype=torch.int32), True, sparse=sparse)  # fmt: skip
        hidden = loaded.model(torch.tensor([out[-1]]), torch.tensor([pos]), kv, attn)
        out.append(int(loaded.model.compute_logits(hidden).argmax(-1)[0]))
    return out


@torch.inference_mode()
def passkey_item(
    loaded: LoadedModel, ids: list[int], key: str, budgets: list[int], heads: str | None,
    mask: torch.Tensor | None, reuse_steps: int, shortlist_steps: int = 1, steps: int = 12,
    sample_last: int = SparseConfig().sample_last,
) -> dict[str, bool]:  # fmt: skip
    """One passkey prompt under every mode, two prefills shared: dense prefill -> dense decode
    ("off") and sparse decode ("decode/B"); sparse prefill -> dense ("prefill") and sparse decode
    ("both/B"), for each decode budget B. Greedy; right when the key is in the answer."""
    n = len(ids)
    kv = torch.zeros(kv_cache_shape(loaded.config, -(-(n + steps) // BS), BS))
    table = torch.arange(kv.shape[0], dtype=torch.int32)[None]
    right: dict[str, bool] = {}
    for prefill_mode, dense_name, sparse_name in (
        ("off", "off", "decode"), ("prefill", "prefill", "both"),
    ):  # fmt: skip
        sp = None
        if prefill_mode == "prefill":
            pcfg = SparseConfig(mode="prefill", heads_path=heads, sample_last=sample_last)
            sp = SparseAttention(pcfg, kv, mask)
        attn = AttentionMetadata(torch.arange(n), table, torch.tensor([n], dtype=torch.int32),
                                 torch.tensor([0, n], dtype=torch.int32), False, sparse=sp)  # fmt: skip
        hidden = loaded.model(torch.tensor(ids), torch.arange(n), kv, attn)
        first = int(loaded.model.compute_logits(hidden[-1:]).argmax(-1)[0])
        variants: list[tuple[str, SparseAttention | None]] = [(dense_name, None)]
        for b in budgets:
            cfg = SparseConfig(mode="decode", budget=b, heads_path=heads, reuse_steps=reuse_steps,
                               shortlist_steps=shortlist_steps)  # fmt: skip
            variants.append((f"{sparse_name}/{b}", SparseAttention(cfg, kv, mask)))
        for name, dec in variants:  # each overwrites the answer's slots of the last
            answer = loaded.tokenizer.decode(_greedy(loaded, ids, kv, first, steps, dec))
            right[name] = key in answer
    return right


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--budget", type=int, default=1024, help="decode budget of the probes")
    ap.add_argument("--heads", default=None, help="calibrate-heads output (default: none)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--text", type=int, default=0, help="which ShareGPT text (0: the first)")
    ap.add_argument("--skip-ppl", action="store_true", help="passkey only")
    ap.add_argument("--passkeys", type=int, nargs="+", default=[10, 10, 10], help="per length")
    ap.add_argument("--passkey-budgets", type=int, nargs="+", default=[4096, 1024])
    ap.add_argument("--haystack", choices=["repeat", "sharegpt"], default="repeat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse-steps", type=int, default=SparseConfig().reuse_steps)
    ap.add_argument("--shortlist-steps", type=int, default=SparseConfig().shortlist_steps,
                    help="reuse the shortlist, re-ranked every step (with --reuse-steps 1)")  # fmt: skip
    ap.add_argument("--sample-last", type=int, default=SparseConfig().sample_last,
                    help="sparse prefill: the last rows sampled in full (0: the strided sample only)")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(None)
    c = loaded.config
    mask = load_head_mask(args.heads, c.num_layers, c.num_kv_heads) if args.heads else None
    results: dict[str, Any] = {"args": vars(args), "lengths": {}}
    for i, length in enumerate(args.lengths):
        t0 = time.time()
        row: dict[str, Any] = {} if args.skip_ppl else ppl_row(loaded, length, args, mask)
        count = args.passkeys[min(i, len(args.passkeys) - 1)]
        prompts = passkey_prompts(
            loaded.tokenizer, length, count, length, args.haystack, c.max_position_embeddings
        )
        passkey: dict[str, list[bool]] = {}
        for ids, key in prompts:
            t1 = time.time()
            got = passkey_item(
                loaded,
                ids,
                key,
                args.passkey_budgets,
                args.heads,
                mask,
                args.reuse_steps,
                args.shortlist_steps,
                sample_last=args.sample_last,
            )
            for name, ok in got.items():
                passkey.setdefault(name, []).append(ok)
            print(length, len(ids), "tokens", {k: sum(v) for k, v in passkey.items()},
                  f"{time.time() - t1:.0f}s", flush=True)  # fmt: skip
        row["passkey_tokens"] = [len(ids) for ids, _ in prompts]
        row["passkey"] = passkey
        row["seconds"] = time.time() - t0
        results["lengths"][str(length)] = row
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


def ppl_row(
    loaded: LoadedModel, length: int, args: argparse.Namespace, mask: torch.Tensor | None
) -> dict[str, Any]:
    """Perplexity, per-layer error and overlap on one ShareGPT text of ``length`` tokens (the
    ``--text``-th)."""
    cfg = SparseConfig(
        mode="both",
        budget=args.budget,
        heads_path=args.heads,
        reuse_steps=args.reuse_steps,
        shortlist_steps=args.shortlist_steps,
        sample_last=args.sample_last,
    )
    dummy = torch.zeros(kv_cache_shape(loaded.config, 1, BS))
    ids = sharegpt_texts(loaded.tokenizer, args.text + 1, length)[args.text]
    dense_probe = Probe(cfg, dummy, mask, exact=True)
    dense_nll = nll_prefill(loaded, ids, dense_probe)
    sparse_nll = nll_prefill(loaded, ids, Probe(cfg, dummy, mask, exact=False))
    dec_exact = Probe(cfg, dummy, mask, exact=True)
    dense_dec = nll_decode(loaded, ids, args.decode_tokens, dec_exact)
    sparse_dec = nll_decode(loaded, ids, args.decode_tokens, Probe(cfg, dummy, mask, exact=False))
    row: dict[str, Any] = {
        "ppl_prefill_dense": math.exp(dense_nll), "ppl_prefill_sparse": math.exp(sparse_nll),
        "ppl_decode_dense": math.exp(dense_dec), "ppl_decode_sparse": math.exp(sparse_dec),
        "layer_err_prefill": [sum(e) / len(e) for e in dense_probe.errors["prefill"]],
        "layer_err_decode": [sum(e) / len(e) for e in dec_exact.errors["decode"]],
        "overlap_mean": sum(dec_exact.overlap) / max(1, len(dec_exact.overlap)),
        "overlap_min": min(dec_exact.overlap, default=1.0),
        "overlap_steps": len(dec_exact.overlap),
        "prefill_density": dense_probe.stats_extra()["sparse_prefill_density"],
        "decode_read_fraction": dec_exact.stats_extra()["sparse_decode_read_fraction"],
    }  # fmt: skip
    print(length, {k: v for k, v in row.items() if not k.startswith("layer")}, flush=True)
    return row


if __name__ == "__main__":
    main()
