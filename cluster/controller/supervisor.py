"""Keep every pool at its configured size: a worker that dies is replaced, with backoff.

The decision core is pure (a snapshot in, roles to start out); ``ControllerActor`` runs it every
``interval_s`` and starts what it returns through ``add_worker``, the same path node joins use.

    sup = Supervision(targets={"prefill": 1, "decode": 1})
    roles = sup.due(now, live={"prefill": 1}, starting={})   # -> ["decode"]
    sup.started(role, now)                                   # a start was attempted

Backoff: after ``k`` start attempts of a role in the last ``window_s``, the next waits
``min(max_backoff_s, base_s * 2**k)``; a crash-looping worker (a model that does not load, a
node that cannot place it) costs a start every 30 s at most, not a busy loop. Drained workers still count as pool members (draining is the operator's decision);
with pool sizing on, roles change under the planner, so only the total is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(slots=True)
class Supervision:
    targets: Mapping[str, int]
    keep_total_only: bool = False  # pool sizing moves workers between roles
    base_s: float = 0.5
    max_backoff_s: float = 30.0
    window_s: float = 300.0
    _attempts: dict[str, list[float]] = field(default_factory=dict)  # role -> start times
    _next_at: dict[str, float] = field(default_factory=dict)  # role -> earliest next start

    def deficits(self, live: Mapping[str, int], starting: Mapping[str, int]) -> dict[str, int]:
        have = {r: live.get(r, 0) + starting.get(r, 0) for r in self.targets}
        if self.keep_total_only:
            short = sum(self.targets.values()) - sum(live.values()) - sum(starting.values())
            if short <= 0:
                return {}
            # refill the role furthest below its configured share
            role = max(self.targets, key=lambda r: self.targets[r] - have[r])
            return {role: short}
        return {r: n - have[r] for r, n in self.targets.items() if n > have[r]}

    def due(self, now: float, live: Mapping[str, int], starting: Mapping[str, int]) -> list[str]:
        """Roles to start one worker of, now (at most one per role per call)."""
        return [r for r in self.deficits(live, starting) if now >= self._next_at.get(r, 0.0)]

    def started(self, role: str, now: float) -> None:
        recent = [t for t in self._attempts.get(role, []) if now - t < self.window_s]
        recent.append(now)
        self._attempts[role] = recent
        delay = min(self.max_backoff_s, self.base_s * 2 ** (len(recent) - 1))
        self._next_at[role] = now + delay

    def backoff_s(self, role: str, now: float) -> float:
        return max(0.0, self._next_at.get(role, 0.0) - now)
