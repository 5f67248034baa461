"""Router weights and knobs, validated once where they enter.

Example (YAML under ``router:`` in the cluster config)::

    router:
      prefix_weight: 2.0      # cached prefix from the KV directory
      kv_util_weight: 1.0     # free KV blocks
      queue_weight: 1.0       # queue depth, min-max over candidates
      gpu_hit_value: 1.0      # worth of a matched GPU-tier token
      cpu_hit_value: 0.5      # worth of a matched CPU-tier token (needs a promote copy)
      chunk_tokens: 512       # a prefill worker needs room for at least one chunk
      block_size: 16
      tie_break: lowest_id    # or "random" (seeded)
      seed: 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class RouterConfig:
    prefix_weight: float = 2.0
    kv_util_weight: float = 1.0
    queue_weight: float = 1.0
    tenant_weight: float = 0.5
    slo_weight: float = 0.5
    gpu_hit_value: float = 1.0
    cpu_hit_value: float = 0.5
    chunk_tokens: int = 512
    block_size: int = 16  # tokens per KV block (the directory's)
    tie_break: Literal["lowest_id", "random"] = "lowest_id"
    seed: int = 0

    def __post_init__(self) -> None:
        weights = (
            self.prefix_weight, self.kv_util_weight, self.queue_weight, self.tenant_weight,
            self.slo_weight,
        )
        names = ("prefix_weight", "kv_util_weight", "queue_weight", "tenant_weight", "slo_weight")
        for name, v in zip(names, weights, strict=True):
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        if sum(weights) == 0:
            raise ValueError("at least one scorer weight must be positive")
        for name, v in (
            ("gpu_hit_value", self.gpu_hit_value),
            ("cpu_hit_value", self.cpu_hit_value),
        ):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.tie_break not in ("lowest_id", "random"):
            raise ValueError(f"tie_break must be 'lowest_id' or 'random', got {self.tie_break!r}")
