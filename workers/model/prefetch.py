"""Opt-in weight prefetch into L2 during small-batch decode steps (issue 17's batch-1 gap).

At batch 1 a decode step is weight streaming, but between its GEMMs run kernels that barely use
HBM (norms, RoPE + KV write, attention over a short context). With a plan, the model forks a
side stream at each layer's start and queues ``kernels.l2_prefetch`` of weights that the main
stream reads later in that layer or the next; the side stream joins the main one once, at the
end of the forward, so a CUDA graph captures both branches::

    main:  norm ─ qkv ─ rope ─ attention ─ o ─ norm ─ gate_up ─ silu ─ down ─▶ next layer
    side:  └─ prefetch o(i) [, down(i)] [, qkv(i+1)] ─────────────────────────▶ (join at end)

Targets: ``o`` (this layer's o projection, read after attention), ``down`` (this layer's down
projection), ``qkv`` (the next layer's fused q/k/v). A plan is ``"o,qkv"`` or ``"o,qkv@32"``
(thread blocks a prefetch, default 64); ``KVRELAY_L2_PREFETCH`` sets the model's plan at
construction (default: none). Off unless set: whether it pays is measured on the GPU
(benchmarks/prefetch_bench.py), and the side stream is an ordinary stream of the device, so it
would run outside a semi-PD lane's SM share. Results are unchanged either way: a prefetch only
reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kvrelay import kernels

TARGETS = ("o", "down", "qkv")
MAX_TOKENS = 16  # decode batches up to this many tokens are weight-bound enough to prefetch


class LayerWeights(Protocol):
    """What a plan reads of a decoder layer (llama.py's DecoderLayer)."""

    @property
    def qkv_weight(self) -> torch.Tensor: ...

    @property
    def o_weight(self) -> torch.Tensor: ...

    @property
    def down_weight(self) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class PrefetchPlan:
    targets: tuple[str, ...]  # a subset of TARGETS, in TARGETS' order
    programs: int = 64  # thread blocks a prefetch

    @staticmethod
    def parse(spec: str) -> PrefetchPlan | None:
        """``"o,qkv"`` or ``"o,qkv@32"``; ``""`` or ``"off"`` is no plan. Raises ValueError
        naming an unknown target or a bad block count."""
        spec = spec.strip()
        if spec in ("", "off", "0"):
            return None
        names, _, count = spec.partition("@")
        wanted = {n.strip() for n in names.split(",") if n.strip()}
        unknown = wanted - set(TARGETS)
        if unknown or not wanted:
            raise ValueError(f"prefetch plan {spec!r}: targets are {', '.join(TARGETS)}")
        programs = 64
        if count:
            if not count.isdigit() or not 1 <= int(count) <= 1024:
                raise ValueError(f"prefetch plan {spec!r}: blocks must be 1..1024")
            programs = int(count)
        return PrefetchPlan(tuple(t for t in TARGETS if t in wanted), programs)

    @staticmethod
    def from_env() -> PrefetchPlan | None:
        return PrefetchPlan.parse(os.environ.get("KVRELAY_L2_PREFETCH", ""))

    def at_layer(self, layers: Sequence[LayerWeights], i: int) -> list[torch.Tensor]:
        """The weights queued at layer ``i``'s start, in the order the main stream reads them."""
        out = []
        if "o" in self.targets:
            out.append(layers[i].o_weight)
        if "down" in self.targets:
            out.append(layers[i].down_weight)
        if "qkv" in self.targets and i + 1 < len(layers):
            out.append(layers[i + 1].qkv_weight)
        return out


class WeightPrefetch:
    """A plan and its side stream (one per device, made at first use)."""

    def __init__(self, plan: PrefetchPlan) -> None:
        self.plan = plan
        self._side: dict[torch.device, torch.cuda.Stream] = {}

    def applies(self, hidden: torch.Tensor, is_decode: bool, sparse: bool) -> bool:
        """A CUDA decode step of at most MAX_TOKENS rows with dense attention."""
        return hidden.is_cuda and is_decode and not sparse and hidden.shape[0] <= MAX_TOKENS

    def issue(self, tensors: list[torch.Tensor]) -> None:
        """Queue the prefetch of ``tensors`` on the side stream, after the main stream's work
        so far (so it runs alongside what the main stream queues next)."""
        if not tensors:
            return
        main = torch.cuda.current_stream(tensors[0].device)
        side = self._stream(tensors[0].device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for t in tensors:
                kernels.l2_prefetch(t, self.plan.programs)

    def join(self, device: torch.device) -> None:
        """The main stream waits for the side stream (required before a graph capture ends)."""
        if device in self._side:
            torch.cuda.current_stream(device).wait_stream(self._side[device])

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._side:
            self._side[device] = torch.cuda.Stream(device)
        return self._side[device]
