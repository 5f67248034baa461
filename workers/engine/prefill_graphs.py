"""Prefill steps as one CUDA graph per token bucket (issue 17): embed, every layer (attention
included) and the final norm are captured together, so a step is one graph replay.

A step's T packed tokens of B sequences are padded to a token bucket of P rows (64, 128, then
multiples of ``TOKEN_STEP`` up to ``max_tokens``: short prompts and small mixed decode + chunk
steps pad to a small bucket, longer ones waste at most 255 rows; a step past the cap runs
eagerly, where kernel time dwarfs launch cost), and to ``max_seqs`` sequences. Every input
lives in static buffers of fixed shape shared by all buckets (a bucket reads their first P rows)::

    static, on the device:  i64 [3, P_max]        ids | positions | slot_mapping (-1 padding)
                            i32 [2 Bmax + 2]      context_lens [Bmax] (0 padding) |
                                                  query_start_loc [Bmax + 1] (T padding) |
                                                  live sequences [1] (B)
                            i32 [Bmax, W]         block tables, the step's [B, w] top left
                            o [P_max, H, D]       attention output, x [P_max, hidden] hidden states

    graph(P)   embed(ids) ─ L × (pre_attention ─ attention ─▶ o[:P] ─ post_attention)
               ─ final norm ─▶ x[:P]

Attention (kernels/triton_prefill.py) numbers its tiles from shapes only: with the padded
metadata its grid is ``P // BLOCK_M + Bmax`` tiles per head for every step of the bucket.
Sequences B..Bmax-1 own no rows (``query_start_loc`` stays at T past the real ones), and the
kernel gets B itself (``live_seqs``, the static entry written at staging): programs past the
real sequences' last tile id (qsl[B] // BLOCK_M + B) exit before searching for a sequence, and
the real tiles are dispatched first. Without that bound the ~Bmax empty programs per head each
binary-searched qsl (~log2 Bmax dependent loads) and ran first: measured on an H100 at T = 1024
with one real sequence (1B shape, bf16), attention took 715 us a forward in the graph against
426 us eagerly, ~18 us a layer, leaving the 1k prefill at 0.55 of the matmul limit (0.6 the
goal); the bounded kernel is not timed on a GPU yet. Nothing of the padded sequences is read
(their context lengths, table rows, starts past index B), so the columns past a step's widest
table ``w`` and the rows past B may hold anything; the padding above is still written, so the
metadata also holds for a call without the bound (the reference, a test). ``W`` is the widest
table a sequence can have (the model's context in blocks, at most the cache's blocks); a step
with more than ``max_seqs`` sequences, a wider table, or sparse attention that handles it runs
eagerly (a sparse decode-only config leaves prefill steps dense, and here). So does a pure
decode step that no decode graph took (a batch or table past their buckets): the prefill
kernel has no split-K, and the eager step's decode kernel splits a long context across
programs.

Padded rows are harmless: their slot is -1 (``rope_write_kv`` writes no KV for them), their ids
and positions are whatever an earlier step left (always valid ones, 0 at first), every op but
attention works row by row, attention owns no padded row to any sequence (it neither reads
their q nor writes their o), and their outputs are dropped. The only copies inside the graph
are the final hidden states into ``x`` (``run`` returns a view of it); layers hand x, q and
the MLP output on as tensors of the graph's pool. A step's staging is ~10 small copies/fills on
the device (three i64 rows, the slot padding, context lengths, starts and their padding, the
live count, the tables) then the replay.

Memory: a graph keeps its intermediates in the pool shared by every bucket. Within a capture
the allocator reuses a freed tensor's memory, so a graph holds about one layer's live set at P
rows (for the 1B shape at 2048 rows ~120 MB by the tensor sizes, dominated by the MLP's
[P, 2I] and [P, I]; not measured), as the largest piece of the piecewise design did. The
graphs of different buckets never run at once and keep nothing live past a replay, so captured
largest first (``capture_all``) the smaller buckets fit in the largest one's memory; a bucket
captured lazily before a larger one can leave its blocks beside the larger one's (up to the sum
over buckets in the worst case).

Measured vs expected: the piecewise design this replaces (L + 1 graphs, attention eager between
them, per-piece copies into static x/q) ran a 1k-token 1B step in 4.98 ms on an H100, 0.55 of
the matmul limit (benchmarks/README.md, "Prefill at 1k tokens with piecewise graphs"): 4.15 ms
of kernels, 0.19 ms more than the eager forward's 3.85 (the copies), and 0.84 ms of gaps between
17 replays and 16 eager attention launches. One replay removes the gaps and every copy but the
final one, so ~3.9 ms (~0.70 of the limit) was expected, plus the padded sequences' tiles:
Bmax x H programs per layer. Measured (H100, 2026-12-06, before the bound): 4.86 ms, 0.55 of the
limit; 4.17 ms of kernels, the padded attention 0.29 ms of it more than eager (~18 us a layer;
see "Attention" above), and 0.68 ms of staging and host work before the replay. Hence the
``live_seqs`` bound that makes the padded programs exit after two cached loads, last (not timed
yet; graphs per sequence-count bucket would remove them altogether). tests/gpu/test_prefill_graphs_gpu.py checks the graphs' results and one replay a
step.

Without capture (CPU, or ``capture=False``) the same forward runs as plain calls over the same
padded buffers and metadata: the tests compare that path with the plain forward.

Captures follow DecodeGraphs (workers/engine/cuda_graphs.py): lazily on a bucket's first step or
up front with ``capture_all``, largest first, inside ``GPU_GATE.capture()`` in ``thread_local``
error mode, after an eager warm-up on the capture stream (Triton compiles, cuBLAS picks its
kernels). A failed capture is not fatal: the step runs eagerly and the bucket is tried again on
a later step (``MAX_CAPTURE_FAILURES`` times at most).

Graph sets, as DecodeGraphs': ``use_set(key, stream)`` makes set ``key`` the one captured into
and replayed from, captured on ``stream``. A semi-PD prefill lane keeps one set per SM share,
captured on that share's green-context stream, because a graph keeps to the SMs of the stream
it was captured on (workers/semi_pd/worker.py). The static buffers are shared by every set (one
thread runs the steps), and so is the memory pool (no two graphs of one PrefillGraphs run at
once); but the caching allocator reuses a freed block only for allocations on the stream it
was allocated on, so a set captured on another stream takes its own intermediates' memory.
Without ``use_set`` there is one set (key None), captured on torch's side stream.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import cast

import torch

from kvrelay import kernels
from kvrelay.workers.engine.cuda_graphs import MAX_CAPTURE_FAILURES, capture_graph
from kvrelay.workers.model.llama import AttentionMetadata, DecoderLayer, LlamaModel

log = logging.getLogger(__name__)

SMALL_BUCKETS = (64, 128)
TOKEN_STEP = 256  # bucket granularity above them: at most 255 padded rows
MAX_TOKENS = 2048  # the default cap; the engine's default chunk is 512 tokens
MAX_SEQS = 128  # the default Bmax; the engine passes its max_num_seqs


def token_buckets(max_tokens: int) -> tuple[int, ...]:
    """``SMALL_BUCKETS``, then multiples of ``TOKEN_STEP`` up to ``max_tokens`` rounded up to
    one."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    top = -(-max_tokens // TOKEN_STEP)
    return (*SMALL_BUCKETS, *(TOKEN_STEP * k for k in range(1, top + 1)))


@dataclass(slots=True)
class _GraphSet:
    graphs: dict[int, torch.cuda.CUDAGraph]  # bucket -> its graph
    capture_failures: dict[int, int]  # bucket -> failed captures


class PrefillGraphs:
    """Graph-replayed prefill of one model and KV cache. ``run`` returns None when a step fits
    no bucket, has too many sequences, too wide a table or sparse attention for it (or its
    capture failed): run it eagerly."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
        *,
        max_tokens: int = MAX_TOKENS,
        max_seqs: int = MAX_SEQS,
        capture: bool | None = None,  # None: on a CUDA cache; False: eager over the buffers
    ) -> None:
        c = model.config
        if c.num_layers < 1:
            raise ValueError("prefill graphs need at least one layer")
        if max_seqs < 1:
            raise ValueError(f"max_seqs must be >= 1, got {max_seqs}")
        self.capture_graphs = kv_cache.is_cuda if capture is None else capture
        if self.capture_graphs and not kv_cache.is_cuda:
            raise ValueError("CUDA graphs need a CUDA KV cache")
        self.model, self.kv_cache = model, kv_cache
        self.layers = [cast(DecoderLayer, layer) for layer in model.layers]
        self.device = kv_cache.device
        self.sizes = token_buckets(max_tokens)
        self.max_seqs = max_seqs
        # the widest table a sequence can need: its context in blocks, at most the cache's
        self.max_blocks = min(kv_cache.shape[0], -(-c.max_context // kv_cache.shape[3]))
        p, dtype, dev = self.sizes[-1], model.embed.dtype, self.device
        self._i64 = torch.zeros((3, p), dtype=torch.int64, device=dev)
        self._i64[2].fill_(-1)
        self._i32 = torch.zeros(2 * max_seqs + 2, dtype=torch.int32, device=dev)
        self._tables = torch.zeros((max_seqs, self.max_blocks), dtype=torch.int32, device=dev)
        self._o = torch.zeros((p, c.num_heads, c.head_dim), dtype=dtype, device=dev)
        self._x = torch.zeros((p, c.hidden_size), dtype=dtype, device=dev)
        self._context_lens = self._i32[:max_seqs]  # [Bmax], 0 past the step's sequences
        self._starts = self._i32[max_seqs : 2 * max_seqs + 1]  # [Bmax + 1], T past them
        self._live = self._i32[2 * max_seqs + 1 :]  # [1]: the step's sequences B
        self._pool = torch.cuda.graph_pool_handle() if self.capture_graphs else None
        self._sets: dict[Hashable, _GraphSet] = {}
        self.use_set(None, None)
        self.steps = 0  # steps run over the static buffers (replayed or eager)
        self.replays = 0  # graphs replayed: one a step when captured

    def use_set(self, key: Hashable, stream: torch.cuda.Stream | None) -> None:
        """Capture into and replay from graph set ``key`` from now on, capturing on ``stream``
        (None: a private side stream of torch's). A semi-PD prefill lane keeps one set per SM
        share, captured on that share's green-context stream: a graph captured elsewhere runs
        on every SM whatever stream replays it (tests/gpu/test_semi_pd_gpu.py). Without
        capture (``capture=False``) a set only keeps its key."""
        graph_set = self._sets.get(key)
        if graph_set is None:
            graph_set = self._sets[key] = _GraphSet({}, {})
        self._graphs, self.capture_failures = graph_set.graphs, graph_set.capture_failures
        self._capture_stream = stream
        self.set_key = key

    # ---- the forward over the static buffers ---------------------------------------------
    def _forward(self, size: int) -> None:
        """The model over the first ``size`` rows of the static buffers, hidden states into
        ``_x[:size]``; attention over the padded metadata (fixed shapes for a fixed grid)."""
        ids, positions, slots = self._i64[0, :size], self._i64[1, :size], self._i64[2, :size]
        o = self._o[:size]
        rope = (self.model.rope_cos, self.model.rope_sin)
        x, delta = self.model.embed_tokens(ids), None
        for layer in self.layers:
            q, x = layer.pre_attention(x, delta, positions, rope, self.kv_cache, slots)
            kernels.paged_prefill_attention(
                q, self.kv_cache, layer.layer_idx, self._tables, self._starts,
                self._context_lens, layer.scale, out=o, live_seqs=self._live,
            )  # fmt: skip
            x, delta = layer.post_attention(o, x)
        self._x[:size].copy_(self.model.final_norm(x, delta))

    # ---- capture --------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, size: int) -> None:
        """Capture bucket ``size``'s graph into the current set, on its capture stream."""
        if not self.capture_graphs:
            raise ValueError("this PrefillGraphs runs eagerly (capture=False)")
        if size not in self.sizes:
            raise ValueError(f"no bucket {size} in {self.sizes}")
        if size in self._graphs:
            return
        # every row padding, every sequence empty, none live: the warm-up writes no KV and
        # attends nothing
        self._i64[:2, :size].zero_()
        self._i64[2, :size].fill_(-1)
        self._i32.zero_()
        self._graphs[size], _ = capture_graph(
            lambda: self._forward(size), self.device, self._pool, self._capture_stream
        )

    def capture_all(self, max_tokens: int | None = None) -> int:
        """Capture every bucket up to the one holding ``max_tokens`` (largest first) into the
        current set; returns the number of buckets that set holds."""
        top = None if max_tokens is None else self.bucket(max_tokens)
        for size in reversed(self.sizes):
            if top is None or size <= top:
                self.capture(size)
        return len(self._graphs)

    @property
    def num_graphs(self) -> int:
        """Graphs captured, in every set: one per bucket and set."""
        return sum(len(s.graphs) for s in self._sets.values())

    # ---- a step ---------------------------------------------------------------------------
    def bucket(self, tokens: int) -> int | None:
        return next((s for s in self.sizes if s >= tokens), None)

    def _ready(self, size: int) -> bool:
        """Whether bucket ``size`` can run now: captured (capturing it on first use) or eager."""
        if not self.capture_graphs or size in self._graphs:
            return True
        if self.capture_failures.get(size, 0) >= MAX_CAPTURE_FAILURES:
            return False
        try:
            self.capture(size)
        except RuntimeError as exc:  # torch.AcceleratorError is one: run eagerly instead
            self.capture_failures[size] = self.capture_failures.get(size, 0) + 1
            log.warning("prefill graph capture of bucket %d (set %r) failed (%d): %s; running "
                        "eagerly", size, self.set_key, self.capture_failures[size], exc)  # fmt: skip
            return False
        return True

    def _fits(self, tokens: int, attn: AttentionMetadata) -> bool:
        """Whether a step of ``tokens`` rows and this metadata fits the static buffers."""
        sparse = attn.sparse
        return (
            0 < tokens <= self.sizes[-1]
            and not attn.is_decode
            and attn.context_lens.shape[0] <= self.max_seqs
            and attn.block_tables.shape[1] <= self.max_blocks
            and (sparse is None or not sparse.handles(attn.is_decode))
        )

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        attn: AttentionMetadata,  # of the T real rows and B sequences
    ) -> torch.Tensor | None:  # [T, hidden], a view of a static buffer: read before next run
        """The model's forward over the T rows, one graph replay; None: run this step eagerly."""
        tokens = input_ids.shape[0]
        if not self._fits(tokens, attn):
            return None
        size = self.bucket(tokens)
        if size is None or not self._ready(size):
            return None
        seqs, width = attn.context_lens.shape[0], attn.block_tables.shape[1]
        self._i64[0, :tokens].copy_(input_ids)
        self._i64[1, :tokens].copy_(positions)
        self._i64[2, :tokens].copy_(attn.slot_mapping)
        self._i64[2, tokens:size].fill_(-1)  # rows a longer step left: no KV write
        self._context_lens[:seqs].copy_(attn.context_lens)
        self._context_lens[seqs:].zero_()
        self._starts[: seqs + 1].copy_(attn.query_start_loc)
        self._starts[seqs + 1 :].fill_(tokens)  # the padded sequences own no rows
        self._live.fill_(seqs)  # attention's bound: its programs past these sequences exit
        self._tables[:seqs, :width].copy_(attn.block_tables)
        graph = self._graphs.get(size)
        if graph is None:
            self._forward(size)
        else:
            graph.replay()
            self.replays += 1
        self.steps += 1
        return self._x[:tokens]
