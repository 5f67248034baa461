"""Opt-in sparse attention for long contexts: LServe page selection in decode, SampleAttention
prefill, streaming heads in both (``--sparse-attention {off,decode,prefill,both}``).

Owned by the ModelRunner; the runner tells it which sequences a step holds (``begin_step``) and
hands it to the model through ``AttentionMetadata.sparse``; each layer then asks ``handles`` and
calls ``decode`` or ``prefill`` instead of the dense kernel. With mode "off" none of this exists
and the dense path is untouched.

Key bounds (kernels/sparse_reference.py) live in a side tensor beside the KV pool,
``[num_blocks, L, 2, P, Hkv, D]``: per-channel max and min of each of a block's P sub-pages of
``sub_page_tokens`` (LServe's hierarchical paging; 4-token sub-pages of our 16-token block cost
a quarter of the KV pool's bytes). They are *recomputed on receipt*, not shipped: a sequence that
was not in the previous decode step (first decode after a local prefill or a chunked step, a PD
handoff, a swap-in, a tier hit, a migration) has the bounds of all its blocks recomputed from the
cache before its first sparse decode (one read of its K, the cost of one dense step); after that
the keys a decode step wrote are folded in at the next decode step's first layer, for every layer
at once (one op set per step, not one per layer: exact, see ``_begin_decode``). The bounds are a pure function of a block's keys, so no
wire format, tier or handoff had to learn about them, and nothing stale can be selected.

Selection (dense heads): the top ``rerank``·K middle blocks by bound score, re-ranked by the
exact max q·k over their keys, keep K. Bounds alone (``rerank=1``, LServe) pick blocks that
overlap the exact top-K by only ~0.8 on real text even with 4-token sub-pages (benchmarks/README.md,
sparse attention); the re-rank reads the keys of rerank·K blocks per KV head at refresh steps.
Selections are refreshed every ``reuse_steps`` decode steps, or at once when the batch changes.
LServe reuses a selection for 4 steps; with the exact re-rank that lost a pass key on SmolLM2-135M
(2k context, budget 1024: a selection sharpened for the query of "The" was reused for "is", whose
next token is the key) where refreshing every step kept it, so the default refreshes every step
(the bounds are then read each step: a quarter of the KV bytes at 4-token sub-pages).
The middle way, ``shortlist_steps`` > 1 (with ``reuse_steps`` 1): the bound scores and the
shortlist run only at a refresh (every ``shortlist_steps`` steps, or when the batch changes),
and every step in between re-ranks the refresh's shortlist exactly with its own query (the
exact scores, the top-K and the tables: about half a refresh layer). As with a reused
selection, the block that left the local window since the refresh is read too.

CUDA graphs (workers/engine/cuda_graphs.py; on wherever the engine replays dense decode graphs,
off with ``SparseConfig.graphs`` False): a decode step with no fresh rows that refreshes its
selection is ``capturable``; the graph records its layers in the ``static_step`` form (the same
ops on the graph's static metadata, with every host-data branch made static), so its replay
runs no Python per layer. It folds the step's own keys at its last layer instead of at the next
step's first (exact for the reason the eager fold may come late: those keys are in last blocks,
which no selection of the step scores). Fresh rows (data-dependent rebuild sizes) run eagerly.
A step reusing a selection that a replayed graph made replays a graph of the same bucket that
reads those static picks (eagerly, from views of them, when its tables outgrew that bucket);
with ``shortlist_steps`` > 1 that graph reads the refresh's static shortlists and re-ranks them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvrelay import kernels
from kvrelay.workers.model.sparse_options import SPARSE_MODES
from kvrelay.workers.model.sparse_select import DecodeStep, HeadShape, sample_columns

if TYPE_CHECKING:
    from kvrelay.workers.model.llama import AttentionMetadata
    from kvrelay.workers.model.loader import LoadedModel


@dataclass(frozen=True, slots=True)
class SparseConfig:
    mode: str = "off"
    budget: int = 4096  # decode: middle tokens a dense head reads beyond its sink and last page
    page_tokens: int = 64  # decode: a dense head always reads the first and the last page
    sub_page_tokens: int = 4  # decode: key bounds per sub-page of a block (LServe's logical page)
    rerank: int = 2  # decode: the top rerank·K blocks by bound are re-ranked by exact max q·k
    reuse_steps: int = 1  # decode steps a selection is reused for (LServe: 4; see the docstring)
    # decode steps a shortlist (the top rerank·K blocks by bound) is reused for, re-ranked
    # exactly by each step's own query (see the docstring); 1: every step shortlists anew
    shortlist_steps: int = 1
    stream_sink: int = 128  # streaming heads, decode and prefill
    stream_local: int = 256  # streaming heads, decode
    stream_prefill_local: int = 8192  # streaming heads, prefill
    window_frac: float = 0.08  # SampleAttention local window r_w, of the context
    alpha: float = 0.95  # cumulative attention the kept columns reach on the sampled rows
    sample_stride: int = 20  # 1 sampled query row in 20 (5%)
    # the last rows of a prefill, all sampled: their own alpha columns join (sample_columns);
    # in a chunked prefill only the chunk that ends it (the runner's begin_step ``ends``)
    sample_last: int = 64
    col_block: int = 64  # prefill column granularity (the Triton key tile)
    min_prefill: int = 2048  # shorter prompts prefill dense (nothing worth skipping)
    heads_path: str | None = None  # calibrated streaming heads (JSON); None: none streaming
    # capturable decode steps replay as CUDA graphs (workers/engine/cuda_graphs.py) where the
    # runner uses graphs for dense decode (CUDA, KVRELAY_CUDA_GRAPHS not 0); False: sparse decode
    # steps run eagerly (and so do all decode steps of a runner with sparse decode)
    graphs: bool = True

    def __post_init__(self) -> None:
        if self.mode not in SPARSE_MODES:
            raise ValueError(f"sparse mode must be one of {SPARSE_MODES}, got {self.mode!r}")
        if self.budget < 0 or self.reuse_steps < 1 or not 0 < self.alpha <= 1:
            raise ValueError("sparse budget >= 0, reuse_steps >= 1, 0 < alpha <= 1")
        if self.sub_page_tokens < 1 or self.rerank < 1:
            raise ValueError("sparse sub_page_tokens >= 1, rerank >= 1")
        if self.shortlist_steps < 1 or self.sample_last < 0:
            raise ValueError("sparse shortlist_steps >= 1, sample_last >= 0")
        if self.shortlist_steps > 1 and (self.reuse_steps > 1 or self.rerank == 1):
            raise ValueError(
                "sparse shortlist_steps > 1 re-ranks a reused shortlist: it needs rerank > 1 "
                "(else the shortlist is the selection: use reuse_steps) and reuse_steps 1"
            )

    @property
    def refresh_steps(self) -> int:
        """Decode steps between two full selections (bound scores over every block)."""
        return max(self.reuse_steps, self.shortlist_steps)

    @property
    def decode(self) -> bool:
        return self.mode in ("decode", "both")

    @property
    def prefill(self) -> bool:
        return self.mode in ("prefill", "both")


def load_head_mask(path: str | Path, num_layers: int, kv_heads: int) -> torch.Tensor:
    """[L, Hkv] bool streaming-head mask from ``kvrelay calibrate-heads`` output."""
    data = json.loads(Path(path).read_text())
    mask = torch.tensor(data["streaming"], dtype=torch.bool)
    if tuple(mask.shape) != (num_layers, kv_heads):
        raise ValueError(
            f"{path}: head mask {tuple(mask.shape)}, model has {num_layers}x{kv_heads}"
        )
    return mask


@dataclass(slots=True)
class SparseCounters:
    decode_steps: int = 0  # layer calls, summed over layers
    selected_tokens: float = 0.0  # tokens read, summed over (sequence, KV head, layer)
    context_tokens: float = 0.0  # what dense decode would have read
    prefill_pairs: float = 0.0  # (query, key) tile pairs computed by sparse prefill
    prefill_causal_pairs: float = 0.0  # ... of the causal pairs dense would compute


@dataclass(slots=True)
class CapturedStep:
    """The tensors a sparse decode step captured in a CUDA graph leaves behind (static: each
    replay rewrites them), for the host to carry on from."""

    reuses: CapturedStep | None = None  # the refresh whose picks this step reads; None: selects
    step: DecodeStep | None = None  # built at the first layer; its ``nb`` [size] is refresh_nb
    picks: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [size, Hkv, K']
    # shortlist_steps > 1: layer -> [size, Hkv, R·K] the shortlists a reusing step re-ranks
    shorts: dict[int, torch.Tensor] = field(default_factory=dict)
    lens: list[torch.Tensor] = field(default_factory=list)  # per layer [size, Hkv]


class SparseAttention:
    def __init__(
        self,
        config: SparseConfig,
        kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
        streaming: torch.Tensor | None = None,  # [L, Hkv] bool; None: every head dense
    ) -> None:
        nblk, layers, _, bs, kv_heads, dim = kv_cache.shape
        self.config = config
        self.block_size = bs
        if bs % config.sub_page_tokens:
            raise ValueError(f"sub-page of {config.sub_page_tokens} tokens does not divide {bs}")
        if config.refresh_steps > bs:  # a reused pick list misses at most one block (the gap)
            raise ValueError(f"reuse_steps and shortlist_steps must be <= the block size {bs}")
        self.pages = bs // config.sub_page_tokens  # sub-pages per block
        self.bounds = torch.zeros(nblk if config.decode else 0, layers, 2, self.pages, kv_heads,
                                  dim, dtype=kv_cache.dtype, device=kv_cache.device)  # fmt: skip
        if streaming is None:
            streaming = torch.zeros(layers, kv_heads, dtype=torch.bool)
        self.streaming = streaming.to(kv_cache.device)
        self.has_streaming = [bool(row.any()) for row in streaming]
        # each layer's [Hkv] row, None where no head streams (indexed once, not per decode call)
        rows = zip(self.streaming, self.has_streaming, strict=True)
        self._stream_rows = [row if some else None for row, some in rows]
        self._dense_kv = [(~row).nonzero().flatten().to(kv_cache.device) for row in streaming]
        page = -(-config.page_tokens // bs)  # LServe's first and last 64-token page
        self.dense = HeadShape(page, config.budget // bs, page)
        self.stream = HeadShape(-(-config.stream_sink // bs), 0, -(-config.stream_local // bs))
        self.counters = SparseCounters()
        self._keys: tuple[str, ...] = ()
        self._ends: tuple[bool, ...] | None = None  # this step's rows that end their prefill
        self._age = 0  # decode steps since the selections were made
        self._refresh = True
        self._topk: dict[int, torch.Tensor] = {}
        self._short: dict[int, torch.Tensor] = {}  # shortlist_steps > 1: layer -> [B, Hkv, R·K]
        self._refresh_nb: torch.Tensor | None = None  # [B] context blocks at the last refresh
        self._fresh: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._rebuild: tuple[torch.Tensor, torch.Tensor] | None = None  # fresh blocks, fills
        self._step: DecodeStep | None = None  # built at the step's first decode layer
        self._step_attn: AttentionMetadata | None = None  # ... of this forward
        self._written: torch.Tensor | None = None  # slots of the last decode step, not yet folded
        self._lens: list[torch.Tensor] = []  # this step's lens per layer, summed once per step
        self._context = 0  # tokens in this step's contexts
        self._captured: CapturedStep | None = None  # set while a graph step is recorded
        self._replayed: CapturedStep | None = None  # the refresh replayed since the last selection
        # selected tokens of replayed steps, accumulated on the device by the graphs
        self._graph_selected = torch.zeros((), dtype=torch.int64, device=kv_cache.device)

    # ---- per step ------------------------------------------------------------------------
    def begin_step(
        self, keys: Sequence[str], context_lens: Sequence[int], is_decode: bool,
        ends: Sequence[bool] | None = None,
    ) -> None:  # fmt: skip
        """Called by the runner before each forward: request ids and contexts (new token
        included) of the batch rows, in order; ``ends``: whether each row's new tokens end what
        the sequence has to prefill (only such a chunk samples its last rows in full, see
        ``SparseConfig.sample_last``; None: every row does)."""
        self._count()
        self._step = None
        self._ends = None if ends is None else tuple(ends)
        keys = tuple(keys)
        if not (is_decode and self.config.decode):
            # every row of the next decode step is fresh (its bounds rebuilt): nothing to fold
            self._keys, self._fresh, self._written = (), None, None
            return
        seen = set(self._keys)
        rows: list[int] = []
        blocks: list[int] = []
        fills: list[int] = []
        bs = self.block_size
        for i, (key, ctx) in enumerate(zip(keys, context_lens, strict=True)):
            if key in seen:
                continue
            nb = -(-ctx // bs)
            rows += [i] * nb
            blocks += range(nb)
            fills += [bs] * (nb - 1) + [ctx - (nb - 1) * bs]
        dev = self.bounds.device
        self._fresh = None
        if rows:
            self._fresh = tuple(torch.tensor(x, device=dev) for x in (rows, blocks, fills))  # type: ignore[assignment]
        self._refresh = keys != self._keys or self._age >= self.config.refresh_steps
        self._age = 1 if self._refresh else self._age + 1
        self._keys = keys
        self._context = sum(context_lens)

    def handles(self, is_decode: bool) -> bool:
        return self.config.decode if is_decode else self.config.prefill

    # ---- CUDA graphs (workers/engine/cuda_graphs.py) ---------------------------------------
    def capturable(self) -> bool:
        """Whether the decode step ``begin_step`` announced may replay a captured graph: it
        has no fresh rows (their bounds rebuild has data-dependent sizes) and either refreshes
        its selection or reuses one a replayed graph made (``reused_picks``); a step that does
        not select (mode "prefill") always may."""
        return not self.config.decode or (
            self._fresh is None and (self._refresh or self._replayed is not None)
        )

    def reused_picks(self) -> CapturedStep | None:
        """For a capturable step: None when it selects, else the replayed refresh whose static
        picks it reuses (a graph of that refresh's bucket can read them; another bucket's can
        not, and the step runs eagerly)."""
        return None if self._refresh else self._replayed

    @contextmanager
    def static_step(self, reuses: CapturedStep | None = None) -> Iterator[CapturedStep]:
        """Around the model's forward while a decode step is captured (and its warm-up): every
        layer selects (or, given ``reuses``, reads that refresh's static picks), on the static
        metadata's tensors alone. What a layer does with host data eagerly is static here: the
        re-rank's middle mask is always applied (exact either way), the step's keys are folded
        into the bounds at its last layer (after every layer wrote its key; slot -1 folds
        nothing, so padding rows are harmless), its selected tokens are added to a device
        accumulator, and host counters are left to :meth:`replayed`."""
        self._captured = CapturedStep(reuses)
        try:
            yield self._captured
        finally:
            self._captured = None

    def fold_pending(self, kv_cache: torch.Tensor) -> None:
        """Before a replay: fold the keys an eager decode step left unfolded."""
        if self._written is not None:
            kernels.update_bounds(self.bounds, kv_cache, self._written)
            self._written = None

    def replayed(self, captured: CapturedStep, rows: int) -> None:
        """After a replay of ``rows`` live rows: the host's share of the step (counters; the
        picks and context blocks a reused selection would start from, left in static tensors
        that stay valid until the same graph runs again)."""
        layers = len(captured.lens)
        self.counters.decode_steps += layers
        self.counters.context_tokens += self._context * self.bounds.shape[4] * layers
        self._written = None  # folded at the graph's last layer
        if captured.reuses is None and self.config.refresh_steps > 1:
            self._replayed = captured
            assert captured.step is not None
            # for a reusing step that runs eagerly (its tables outgrew the refresh's bucket)
            self._refresh_nb = captured.step.nb[:rows]
            self._topk = {layer: t[:rows] for layer, t in captured.picks.items()}
            self._short = {layer: t[:rows] for layer, t in captured.shorts.items()}

    def _begin_decode(self, kv_cache: torch.Tensor, attn: AttentionMetadata) -> DecodeStep:
        """The step's work shared by its layers, at the first: the keys the last decode step
        wrote are folded into the bounds of every layer (one launch, not ~18 ops per layer), and
        the selection's per-step masks are built. Folding a step late is exact: the only block that a key
        written at step t is in, is its sequence's last at step t, which is read whole (local)
        and never scored; the fold comes before this step's first selection and before the
        fresh rows' rebuild (which then overwrites what it folded into a recycled block)."""
        self.fold_pending(kv_cache)
        self._written = attn.slot_mapping
        step = self._decode_step(attn, kv_cache, None if self._refresh else self._refresh_nb)
        if self._refresh:
            self._refresh_nb = step.nb
            self._replayed = None
        self._rebuild = None
        if self._fresh is not None:
            rows, logical, fills = self._fresh
            self._rebuild = (attn.block_tables[rows, logical].long(), fills)
        return step

    # ---- decode --------------------------------------------------------------------------
    def decode(
        self,
        layer: int,
        query: torch.Tensor,  # [B, H, D], its K/V already written
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [B, H, D]
        from kvrelay.kernels import sparse_reference as ref

        if self._captured is not None:
            return self._decode_static(layer, query, kv_cache, attn, scale)
        if self._step is None or self._step_attn is not attn:  # the step's first layer
            self._step, self._step_attn = self._begin_decode(kv_cache, attn), attn
        step = self._step
        if self._rebuild is not None:
            ids, fills = self._rebuild
            self.bounds[ids, layer] = ref.block_bounds(kv_cache, layer, ids, fills, self.pages)
        streaming = self._stream_rows[layer]
        topk = self._topk.get(layer)
        short = self._short.get(layer)
        reused = not self._refresh and (topk if short is None else short) is not None
        if self.dense.topk and not reused:
            topk = self._topk[layer] = self._select(layer, query, kv_cache, step, self._short)
        elif self.dense.topk and short is not None:  # a reused shortlist, re-ranked now
            topk = self._topk[layer] = self._rerank(layer, query, kv_cache, step, short)
        tables, lens = step.tables(topk, streaming, reused)
        self.counters.decode_steps += 1
        self._lens.append(lens)
        return kernels.sparse_decode_attention(query, kv_cache, layer, tables, lens, scale)

    def _decode_step(
        self, attn: AttentionMetadata, kv_cache: torch.Tensor, refresh_nb: torch.Tensor | None
    ) -> DecodeStep:
        return DecodeStep(
            attn.context_lens, attn.block_tables, self.dense, self.stream, self.block_size,
            kv_cache.shape[4], refresh_nb,
        )  # fmt: skip

    def _decode_static(
        self,
        layer: int,
        query: torch.Tensor,  # [size, H, D]: the graph's rows, padding included
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [size, H, D]
        """``decode`` of a step with no fresh rows, as captured (``static_step``). Padding
        rows (context 0, slot -1) select nothing, read nothing (lens 0) and fold nothing."""
        cap = self._captured
        assert cap is not None
        reuses = cap.reuses
        if cap.step is None:
            refresh_nb = None
            if reuses is not None:
                assert reuses.step is not None
                refresh_nb = reuses.step.nb
            cap.step = self._decode_step(attn, kv_cache, refresh_nb)
        step = cap.step
        topk = None
        if reuses is not None and layer in reuses.shorts:  # a reused shortlist, re-ranked now
            topk = cap.picks[layer] = self._rerank(layer, query, kv_cache, step,
                                                   reuses.shorts[layer])  # fmt: skip
        elif reuses is not None:
            topk = reuses.picks.get(layer)
        elif self.dense.topk:
            topk = cap.picks[layer] = self._select(layer, query, kv_cache, step, cap.shorts)
        reused = reuses is not None and topk is not None
        tables, lens = step.tables(topk, self._stream_rows[layer], reused)
        cap.lens.append(lens)
        out = kernels.sparse_decode_attention(query, kv_cache, layer, tables, lens, scale)
        if layer == self.bounds.shape[1] - 1:  # the last layer: every layer's key is written
            kernels.update_bounds(self.bounds, kv_cache, attn.slot_mapping)
            self._graph_selected += torch.stack(cap.lens).sum()
        return out

    def _select(
        self,
        layer: int,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        step: DecodeStep,
        shorts: dict[int, torch.Tensor],  # where the layer's shortlist is kept for reuse
    ) -> torch.Tensor:  # [B, Hkv, K'] logical middle blocks of the dense heads
        """Top-K by bound score, or (rerank > 1) the top rerank·K by bound re-ranked by the exact
        max q·k: a refresh step then also reads the keys of rerank·K blocks per KV head. With
        ``shortlist_steps`` > 1 the shortlist is kept in ``shorts`` for the steps up to the next
        refresh, which re-rank it (``_rerank``) with their own queries."""
        streaming = self._stream_rows[layer]  # their picks are ignored: not scored
        scores = kernels.block_scores(query, self.bounds, layer, step.block_tables, streaming)
        if self.config.rerank == 1:
            return step.select(scores, self.dense.topk)
        short = step.select(scores, self.dense.topk * self.config.rerank)
        if self.config.shortlist_steps > 1:
            shorts[layer] = short
        return self._rerank(layer, query, kv_cache, step, short)

    def _rerank(
        self,
        layer: int,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        step: DecodeStep,
        short: torch.Tensor,  # [B, Hkv, R·K] logical blocks, shortlisted now or at the refresh
    ) -> torch.Tensor:  # [B, Hkv, K'] the shortlist's top-K by exact max q·k, middle blocks only
        from kvrelay.kernels.sparse_reference import keys_as_bounds

        exact = kernels.block_scores(
            query, keys_as_bounds(kv_cache), layer, step.block_tables, self._stream_rows[layer],
            ids=short,
        )  # fmt: skip
        return step.rerank(short, exact)

    def _count(self) -> None:
        """Adds the last step's selected tokens (one device sum per step, not per layer)."""
        if self._lens:
            c = self.counters
            # a device sum, read in stats; not in place (stats run outside inference mode)
            c.selected_tokens = c.selected_tokens + torch.stack(self._lens).sum()  # type: ignore[assignment]
            c.context_tokens += self._context * self._lens[0].shape[1] * len(self._lens)
            self._lens = []

    # ---- prefill -------------------------------------------------------------------------
    def prefill(
        self,
        layer: int,
        query: torch.Tensor,  # [T, H, D] packed
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        keep, window = self.prefill_masks(layer, query, kv_cache, attn, scale)
        return kernels.sparse_prefill_attention(
            query, kv_cache, layer, attn.block_tables, attn.query_start_loc, attn.context_lens,
            scale, keep, window, self.config.col_block,
        )  # fmt: skip

    def prefill_masks(
        self,
        layer: int,
        query: torch.Tensor,  # [T, H, D] packed
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # keep [B, H, NKB] bool, window [B, H] int32
        """What each head of each sequence reads (kernels.sparse_prefill_attention's mask): the
        sampled columns and window of a dense head, sink columns and a band of a streaming one,
        everything for a prompt under ``min_prefill``; counted into the density."""
        from kvrelay.kernels import sparse_reference as ref

        cfg = self.config
        heads = query.shape[1]
        kv_heads = kv_cache.shape[4]
        cb = cfg.col_block
        max_ctx = attn.block_tables.shape[1] * self.block_size
        nkb = -(-max_ctx // cb)
        starts = attn.query_start_loc.tolist()
        ctxs = attn.context_lens.tolist()
        batch = len(ctxs)
        keep = torch.ones(batch, heads, nkb, dtype=torch.bool, device=query.device)
        window = torch.full((batch, heads), 1 << 30, dtype=torch.int32, device=query.device)
        stream_q = self.streaming[layer].repeat_interleave(heads // kv_heads)  # [H]
        dense_kv = self._dense_kv[layer]  # only dense heads are sampled
        ends = self._ends if self._ends is not None and len(self._ends) == len(ctxs) else None
        group = heads // kv_heads
        for i, ctx in enumerate(ctxs):
            n = starts[i + 1] - starts[i]
            if ctx < cfg.min_prefill or n == 0:
                continue
            nkb_i = -(-ctx // cb)
            sink = torch.arange(nkb, device=query.device) < -(-cfg.stream_sink // cb)
            keep[i] = sink  # streaming heads: sink + band; dense heads overwritten below
            if dense_kv.numel():
                k, _ = ref.gather_kv(kv_cache, layer, attn.block_tables[i], ctx)
                q = query[starts[i] : starts[i + 1]].unflatten(1, (kv_heads, group))
                cols, _ = sample_columns(
                    q[:, dense_kv].flatten(1, 2), k[:, dense_kv], scale, cb, cfg.alpha,
                    cfg.sample_stride, cfg.sample_last if ends is None or ends[i] else 0,
                )  # fmt: skip
                dense_q = dense_kv[:, None] * group + torch.arange(group, device=q.device)
                keep[i, dense_q.flatten(), :nkb_i] = cols
                keep[i, dense_q.flatten(), nkb_i:] = False
            dense_w = max(cb, int(cfg.window_frac * ctx))
            window[i] = torch.where(stream_q, cfg.stream_prefill_local, dense_w).to(torch.int32)
            self._count_prefill(keep[i], window[i], ctx - n, n, ctx)
        return keep, window

    def _count_prefill(
        self, keep: torch.Tensor, window: torch.Tensor, prefix: int, n: int, ctx: int
    ) -> None:
        """Tile-level density: (query tile, key block) pairs computed / causal pairs."""
        cb = self.config.col_block
        done, causal = prefill_tile_pairs(keep, window, prefix, n, ctx, cb, cb, cb)
        self.counters.prefill_pairs += done
        self.counters.prefill_causal_pairs += causal

    # ---- figures -------------------------------------------------------------------------
    def stats_extra(self) -> dict[str, float]:
        self._count()
        c = self.counters
        sel = float(c.selected_tokens) + float(self._graph_selected)
        ctx = float(c.context_tokens)
        return {
            "sparse_decode_layer_steps": float(c.decode_steps),
            "sparse_decode_selected_tokens": sel,
            "sparse_decode_read_fraction": sel / ctx if ctx else 1.0,
            "sparse_prefill_density": (
                c.prefill_pairs / c.prefill_causal_pairs if c.prefill_causal_pairs else 1.0
            ),
        }


def prefill_tile_pairs(
    keep: torch.Tensor,  # [H, NKB] bool, one sequence's
    window: torch.Tensor,  # [H]
    prefix: int,  # cached tokens before the n new ones
    n: int,
    ctx: int,
    col_block: int,
    block_m: int,
    block_n: int,  # divides col_block or is a multiple of it
) -> tuple[float, float]:  # (pairs where a row sees a key, causal pairs), summed over the heads
    """(query tile of ``block_m`` new rows, key tile of ``block_n``) pairs, per head: those where
    some row sees some key under the sparse mask (what kernels.sparse_prefill_attention runs, one
    tile each) and those with a causal pair (what the dense kernel runs at these tile shapes). A
    row sees a causally visible key tile if a column block of it is kept (a tile behind the
    window lies behind every row) or its nearest key is less than the window behind the tile's
    first row."""
    from kvrelay.kernels.sparse_reference import kept_tiles

    q_end = prefix + torch.arange(block_m, n + block_m, block_m, device=keep.device).clamp(max=n)
    q_start = prefix + torch.arange(0, n, block_m, device=keep.device)  # [nq]
    k_lo = torch.arange(0, ctx, block_n, device=keep.device)  # [nk]
    causal = k_lo[None, :] < q_end[:, None]  # [nq, nk]
    near = (k_lo[None, None, :] + block_n) > (q_start[None, :, None] - window[:, None, None] + 1)
    cols = kept_tiles(keep, col_block, block_n)[0][:, : k_lo.numel()][:, None, :]
    done = causal[None] & (near | cols)
    return float(done.sum()), float(causal.sum()) * keep.shape[0]


def bounds_bytes(config: SparseConfig, block_bytes: int) -> int:
    """Bytes of key bounds kept beside each KV block of ``block_bytes`` (its bs K and bs V rows:
    2·P = 2·bs / sub_page_tokens bound rows), none unless decode is sparse; the engine sizes its
    pool with them."""
    return block_bytes // config.sub_page_tokens if config.decode else 0


def default_heads_path(source: str) -> Path:
    """Where ``kvrelay calibrate-heads`` stores a model's head mask: beside the model."""
    path = Path(source)
    return path / "kvrelay_heads.json" if path.is_dir() else path.with_suffix(".heads.json")


def build_sparse(
    config: SparseConfig, loaded: LoadedModel, kv_cache: torch.Tensor
) -> SparseAttention | None:
    """None when off; streaming heads from ``config.heads_path``, else from the calibration file
    beside the model when there is one, else none (every head dense)."""
    if config.mode == "off":
        return None
    c = loaded.config
    path = Path(config.heads_path) if config.heads_path else default_heads_path(loaded.source)
    streaming = None
    if config.heads_path or path.is_file():
        streaming = load_head_mask(path, c.num_layers, c.num_kv_heads)
    return SparseAttention(config, kv_cache, streaming)
