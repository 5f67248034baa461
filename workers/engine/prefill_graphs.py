"""Piecewise CUDA graphs for prefill steps (issue 17): everything but attention is captured,
attention runs eagerly between the pieces, so a step issues L + 1 graph replays and L attention
kernels instead of ~10 launches per layer from Python.

A step's T packed tokens are padded to a token bucket of P rows (64, 128, then multiples of
``TOKEN_STEP`` up to ``max_tokens``: short prompts and small mixed decode + chunk steps pad to a
small bucket, longer ones waste at most 255 rows; a step past the cap runs eagerly, where kernel
time dwarfs launch cost).
The pieces read and write static buffers shared by every bucket (a bucket uses their first P
rows), and attention runs on the real T rows only (its grid depends on the sequences)::

    piece 0        embed(ids) ─ L0.pre_attention                      ─▶ x, q
    attention 0    q[:T] ─ paged prefill attention (eager) ─▶ o[:T]
    piece i        L(i-1).post_attention(o, x) ─ Li.pre_attention     ─▶ x, q      0 < i < L
    attention i    ...
    piece L        L(L-1).post_attention(o, x) ─ final norm           ─▶ x (the hidden states)

    static, on the device:  i64 [3, P_max]  ids | positions | slot_mapping
                            x [P_max, hidden], q [P_max, H, D], o [P_max, H * D]

Padded rows are harmless: their slot is -1 (``rope_write_kv`` writes no KV for them), their ids
and positions are whatever an earlier step left (always valid ones, 0 at first), every op of a
piece works row by row, attention never reads them, and their outputs are dropped. Each piece
copies its outputs (x, q) into the static buffers, so no tensor of the graph pool lives past its
piece: the pieces of every bucket share one pool and take only the largest piece's
intermediates of memory (the copies add ~2% to the kernel time at 1k tokens for the 1B shape,
by the bytes they move; not measured).

Without capture (CPU, or ``capture=False``) the same pieces run as plain calls over the same
padded buffers: the tests compare that path with the plain forward.

Captures follow DecodeGraphs (workers/engine/cuda_graphs.py): lazily on a bucket's first step or
up front with ``capture_all``, largest first, each piece inside ``GPU_GATE.capture()`` in
``thread_local`` error mode, after an eager warm-up on a side stream (Triton compiles, cuBLAS
picks its kernels). A failed capture is not fatal: the step runs eagerly and the bucket is tried
again on a later step (``MAX_CAPTURE_FAILURES`` times at most).
"""

from __future__ import annotations

import logging
from typing import cast

import torch

from kvrelay.workers.engine.cuda_graphs import MAX_CAPTURE_FAILURES
from kvrelay.workers.gpu_gate import GPU_GATE
from kvrelay.workers.model.llama import AttentionMetadata, DecoderLayer, LlamaModel

log = logging.getLogger(__name__)

SMALL_BUCKETS = (64, 128)
TOKEN_STEP = 256  # bucket granularity above them: at most 255 padded rows
MAX_TOKENS = 2048  # the default cap; the engine's default chunk is 512 tokens


def token_buckets(max_tokens: int) -> tuple[int, ...]:
    """``SMALL_BUCKETS``, then multiples of ``TOKEN_STEP`` up to ``max_tokens`` rounded up to
    one."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    top = -(-max_tokens // TOKEN_STEP)
    return (*SMALL_BUCKETS, *(TOKEN_STEP * k for k in range(1, top + 1)))


class PrefillGraphs:
    """Piecewise prefill of one model and KV cache. ``run`` returns None when a step fits no
    bucket (or its capture failed): run it eagerly."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
        *,
        max_tokens: int = MAX_TOKENS,
        capture: bool | None = None,  # None: on a CUDA cache; False: the pieces run eagerly
    ) -> None:
        c = model.config
        if c.num_layers < 1:
            raise ValueError("piecewise prefill needs at least one layer")
        self.capture_graphs = kv_cache.is_cuda if capture is None else capture
        if self.capture_graphs and not kv_cache.is_cuda:
            raise ValueError("CUDA graphs need a CUDA KV cache")
        self.model, self.kv_cache = model, kv_cache
        self.layers = [cast(DecoderLayer, layer) for layer in model.layers]
        self.device = kv_cache.device
        self.sizes = token_buckets(max_tokens)
        p, dtype, dev = self.sizes[-1], model.embed.dtype, self.device
        self._i64 = torch.zeros((3, p), dtype=torch.int64, device=dev)
        self._i64[2].fill_(-1)
        self._x = torch.zeros((p, c.hidden_size), dtype=dtype, device=dev)
        self._q = torch.zeros((p, c.num_heads, c.head_dim), dtype=dtype, device=dev)
        self._o = torch.zeros((p, c.q_size), dtype=dtype, device=dev)
        self._pool = torch.cuda.graph_pool_handle() if self.capture_graphs else None
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # bucket -> L + 1 pieces
        self.capture_failures: dict[int, int] = {}
        self.steps = 0  # steps run piecewise
        self.replays = 0  # piece graphs replayed

    # ---- the pieces -----------------------------------------------------------------------
    def _piece(self, i: int, size: int) -> None:
        """Piece ``i`` over the first ``size`` rows of the static buffers."""
        ids, positions, slots = self._i64[0, :size], self._i64[1, :size], self._i64[2, :size]
        x_buf = self._x[:size]
        if i == 0:
            x, delta = self.model.embed_tokens(ids), None
        else:
            x, delta = self.layers[i - 1].post_attention(self._o[:size], x_buf)
        if i == len(self.layers):
            x_buf.copy_(self.model.final_norm(x, delta))
            return
        rope = (self.model.rope_cos, self.model.rope_sin)
        q, x = self.layers[i].pre_attention(x, delta, positions, rope, self.kv_cache, slots)
        self._q[:size].copy_(q)
        x_buf.copy_(x)

    def _run_piece(self, i: int, size: int) -> None:
        graphs = self._graphs.get(size)
        if graphs is None:
            self._piece(i, size)
        else:
            graphs[i].replay()
            self.replays += 1

    # ---- capture --------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, size: int) -> None:
        """Capture bucket ``size``'s L + 1 pieces (all or none)."""
        if not self.capture_graphs:
            raise ValueError("this PrefillGraphs runs its pieces eagerly (capture=False)")
        if size not in self.sizes:
            raise ValueError(f"no bucket {size} in {self.sizes}")
        if size in self._graphs:
            return
        # every row padding: no KV write during the warm-up
        self._i64[:2, :size].zero_()
        self._i64[2, :size].fill_(-1)
        pieces = range(len(self.layers) + 1)
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for i in pieces:
                self._piece(i, size)
        current.wait_stream(stream)
        graphs = []
        for i in pieces:
            graph = torch.cuda.CUDAGraph()
            with (
                GPU_GATE.capture(),
                torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"),
            ):
                self._piece(i, size)
            graphs.append(graph)
        self._graphs[size] = graphs

    def capture_all(self, max_tokens: int | None = None) -> int:
        """Capture every bucket up to the one holding ``max_tokens`` (largest first); returns
        the number of buckets captured."""
        top = None if max_tokens is None else self.bucket(max_tokens)
        for size in reversed(self.sizes):
            if top is None or size <= top:
                self.capture(size)
        return len(self._graphs)

    @property
    def num_graphs(self) -> int:
        return sum(len(g) for g in self._graphs.values())

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
            log.warning("prefill graph capture of bucket %d failed (%d): %s; running eagerly",
                        size, self.capture_failures[size], exc)  # fmt: skip
            return False
        return True

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        attn: AttentionMetadata,  # of the T real rows; dense attention
    ) -> torch.Tensor | None:  # [T, hidden], a view of a static buffer: read before next run
        """The model's forward over the T rows, piecewise; None: run this step eagerly."""
        tokens = input_ids.shape[0]
        size = self.bucket(tokens)
        if tokens == 0 or size is None or not self._ready(size):
            return None
        self._i64[0, :tokens].copy_(input_ids)
        self._i64[1, :tokens].copy_(positions)
        self._i64[2, :tokens].copy_(attn.slot_mapping)
        self._i64[2, tokens:size].fill_(-1)  # rows a longer step left: no KV write
        q, o = self._q[:tokens], self._o[:tokens]
        for i, layer in enumerate(self.layers):
            self._run_piece(i, size)
            o.copy_(layer.attention(q, self.kv_cache, attn).reshape(tokens, -1))
        self._run_piece(len(self.layers), size)
        self.steps += 1
        return self._x[:tokens]
