"""What an engine is built with (``EngineConfig``) and what it reports (``EngineStats``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvrelay.workers.engine.prefill_graphs import MAX_TOKENS
from kvrelay.workers.kv.tiers import STREAM_DEMOTION
from kvrelay.workers.model.sparse_attention import SparseConfig
from kvrelay.workers.types import PoolStats


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: as many as kv_cache_gb holds
    kv_cache_gb: float = 0.5
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget (prefill chunk size)
    enable_prefix_caching: bool = True
    seed: int = 0
    # the CPU tier (pinned host memory on CUDA): demotion target, prefix hits, swap space
    cpu_num_blocks: int | None = None  # None: as many as cpu_kv_gb holds; 0 disables the tier
    cpu_kv_gb: float = 0.5
    policy: str = "fcfs"  # "fcfs" | "priority" | "deadline" | "fair" (workers/engine/policy.py)
    ttft_slo_s: float = 2.0  # the deadline policy's time-to-first-token target
    preemption_mode: str = "auto"  # "auto" | "swap" | "recompute"
    swap_gb_per_s: float | None = None  # host<->device copy rate for auto; None: measured
    recompute_tokens_per_s: float | None = None  # None: measured from this engine's prefills
    async_swaps: bool | None = None  # copies on a background thread; None: on CUDA only
    # opt-in (workers/model/sparse_attention.py)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    # schedule step N+1 while step N runs (module doc). None: on for CUDA, where it hides the
    # host's per-step work behind the device; off for CPU, whose device is the host (no gain,
    # and every stop-token finish costs a thrown-away row). Sparse attention keeps host state
    # per step and always runs the plain path.
    overlap_schedule: bool | None = None
    # capture every decode CUDA graph a step can use (batches up to max_num_seqs, every table
    # width) and every prefill graph bucket up to max_num_batched_tokens tokens when the engine
    # starts, not at each bucket's first step: that capture, and the Triton compiles of a new
    # shape, stall the step (a sweep's first, "cold" rates paid them)
    capture_graphs: bool = False
    # decode graphs hold batches up to max(128, max_num_seqs, this): a worker that may turn
    # into a decode worker (a role switch) sizes them for the batch it would adopt
    decode_graph_batch: int = 0
    # prefill graphs (workers/engine/prefill_graphs.py). None: on with the decode graphs on
    # CUDA (KVRELAY_PREFILL_GRAPHS=0 off); True on CPU runs their padded path eagerly (tests);
    # the semi-PD decode lane turns them off (workers/semi_pd/worker.py)
    prefill_graphs: bool | None = None
    # the longest step a prefill graph takes, rounded up to a token bucket (prefill_graphs.py);
    # longer steps run eagerly. The semi-PD prefill lane raises it to its token budget, a served
    # worker to its chunk budget (cluster/runtime/actors.py)
    prefill_graph_tokens: int = MAX_TOKENS
    # demotions inside ``schedule`` queue their copy on the engine's stream, not waiting for it
    # (workers/kv/tiers.py, ``CpuTier.stream_ordered``); the default from KVRELAY_STREAM_DEMOTION
    stream_demotion: bool = STREAM_DEMOTION


@dataclass(frozen=True, slots=True)
class EngineStats:
    pool: PoolStats
    running: int
    waiting: int
    handoff: int
    prompt_tokens_computed: int
    decode_tokens_computed: int
    preemptions: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    steps: int
    extra: dict[str, float] = field(default_factory=dict)
    cpu_pool: PoolStats | None = None  # None: no CPU tier
    prefix_hit_tokens_cpu: int = 0  # of prefix_hit_tokens, served from the CPU tier
    swaps_out: int = 0
    swaps_in: int = 0
    swap_bytes: int = 0  # bytes copied by swaps, both directions
    recompute_preemptions: int = 0  # preemptions = swaps_out + recompute_preemptions
