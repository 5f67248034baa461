"""A launched step whose tokens the host has not read yet (the overlapped engine's step N)."""

from __future__ import annotations

import torch

from kvrelay.workers.engine.runner import DeviceTokens
from kvrelay.workers.engine.sequence import Sequence


class InFlight:
    """A launched step whose sampled tokens the host has not read: ``seqs[i]`` gets row i."""

    __slots__ = ("_host", "_ready", "num_tokens", "seqs", "step", "t0", "tokens")

    def __init__(
        self, seqs: list[Sequence], tokens: torch.Tensor, num_tokens: int, t0: float, step: int
    ) -> None:
        self.seqs, self.tokens, self.num_tokens, self.t0 = seqs, tokens, num_tokens, t0
        self.step = step  # the engine's step count when it launched
        self._host: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        if tokens.is_cuda:  # queue the copy now; reading it waits for this step only
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def device_tokens(self) -> DeviceTokens:
        return DeviceTokens(self.tokens, self.seqs)

    def read(self) -> list[int]:
        if self._ready is None:
            return self.tokens.tolist()
        assert self._host is not None
        self._ready.synchronize()
        return self._host.tolist()
