"""The scheduler honours its policy (workers/engine/policy.py), driven without a model: each step
"computes" what was scheduled and appends a token for every sequence that samples.

Priority: admission order under a full pool, and preemption of less important work (by swap
when a CPU tier exists). Fair: a light tenant is admitted ahead of a flooding tenant's backlog.
Deadline: on the scheduler's own clock, requests past their first-token target wait behind
fresh ones.
No starvation: every request finishes within a bounded number of steps under each policy."""

from __future__ import annotations

import time

import pytest
import torch

from kvrelay.workers.engine.policy import (
    DeadlinePolicy,
    FairPolicy,
    PriorityPolicy,
    SchedulingPolicy,
    make_policy,
)
from kvrelay.workers.engine.scheduler import Scheduler
from kvrelay.workers.engine.sequence import SeqStatus, Sequence
from kvrelay.workers.kv.block_pool import BlockPool
from kvrelay.workers.kv.tiers import BlockCopier, CpuTier
from kvrelay.workers.types import SamplingParams

BS = 4


def _scheduler(
    policy: SchedulingPolicy, num_blocks: int, *, max_num_seqs: int = 8, cpu_blocks: int = 0,
    budget: int = 64,
) -> Scheduler:
    pool = BlockPool(num_blocks, BS)
    tier = None
    if cpu_blocks:
        cache = torch.zeros(num_blocks, 1, 2, BS, 1, 2)  # [n, L, 2, bs, Hkv, D]
        tier = CpuTier(cache, pool, cpu_blocks, BlockCopier(torch.device("cpu"),
                                                            async_copies=False))
    return Scheduler(pool, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                     hash_root=1, policy=policy, tier=tier, preemption_mode="swap")


class Driver:
    def __init__(self, s: Scheduler) -> None:
        self.s = s
        self.t = 0.0
        self.admitted: list[str] = []  # first time each request ran
        self.finished: dict[str, int] = {}  # request -> step it finished
        self.steps = 0

    def add(self, rid: str, prompt_len: int, out: int, *, tenant: str = "",
            priority: int = 0, arrival: float | None = None) -> Sequence:
        self.t += 1e-3  # distinct, increasing arrivals
        base = 1000 * (len(self.admitted) + len(self.s.waiting) + len(self.s.running) + 1)
        # distinct prompts: no prefix-cache hits between requests
        seq = Sequence(rid, [base + rid.__hash__() % 997 + j for j in range(prompt_len)],
                       SamplingParams(max_tokens=out),
                       arrival_time=self.t if arrival is None else arrival, tenant=tenant,
                       priority=priority)
        self.s.add(seq)
        return seq

    def step(self, n: int) -> None:
        for _ in range(n):
            self.steps += 1
            plan = self.s.schedule()
            for item in plan.scheduled:
                seq = item.seq
                if seq.request_id not in self.admitted:
                    self.admitted.append(seq.request_id)
                prefill = max(0, min(seq.num_computed + item.num_tokens, len(seq.prompt_ids))
                              - seq.num_computed)
                self.s.policy.on_served(seq.tenant, prefill, item.num_tokens - prefill)
                samples = item.samples  # judged before the chunk is committed
                self.s.commit_computed(item)
                if samples:
                    seq.output_ids.append(7)
                    if len(seq.output_ids) >= seq.params.max_tokens:
                        self.s.remove(seq)
                        seq.status = SeqStatus.FINISHED
                        self.finished[seq.request_id] = self.steps
            self.s.pool.check_integrity()
            if self.s.tier is not None:
                self.s.tier.pool.check_integrity()
            if not self.s.has_work():
                return


def test_priority_orders_admission_under_a_full_pool() -> None:
    d = Driver(_scheduler(PriorityPolicy(), num_blocks=4))
    d.add("first", 12, 4, priority=5)  # 3 blocks + growth: the pool holds one at a time
    d.step(1)
    for rid, prio in [("low", 9), ("mid", 5), ("high", 0), ("high2", 0)]:
        d.add(rid, 12, 4, priority=prio)
    d.step(200)
    assert not d.s.has_work()
    assert d.admitted == ["first", "high", "high2", "mid", "low"]


def test_priority_preempts_less_important_work_by_swap() -> None:
    d = Driver(_scheduler(PriorityPolicy(), num_blocks=6, cpu_blocks=16))
    low = d.add("low", 12, 8, priority=9)  # at most 5 of the 6 blocks
    d.step(3)
    assert low.status is SeqStatus.RUNNING
    d.add("urgent", 12, 4, priority=0)
    d.step(1)
    assert low.status is SeqStatus.SWAPPED_OUT and low.cpu_block_ids
    assert d.admitted == ["low", "urgent"]
    d.step(200)
    assert set(d.finished) == {"low", "urgent"}
    assert d.finished["urgent"] < d.finished["low"]
    assert d.s.swaps_out >= 1 and d.s.swaps_in >= 1 and d.s.recompute_preemptions == 0


def test_fair_admits_the_light_tenant_ahead_of_the_flood() -> None:
    policy = FairPolicy(bound=64.0, idle_s=10.0)
    d = Driver(_scheduler(policy, num_blocks=12, max_num_seqs=2))
    for i in range(30):
        d.add(f"flood{i}", 8, 6, tenant="flood")
    d.step(20)  # the flood tenant is served for a while
    for i in range(3):
        d.add(f"light{i}", 8, 6, tenant="light")
    d.step(600)
    assert not d.s.has_work()
    order = d.admitted
    light_last = max(order.index(f"light{i}") for i in range(3))
    flood_after = [r for r in order[light_last:] if r.startswith("flood")]
    # every light request got in while most of the flood's backlog (22) still waited
    assert len(flood_after) >= 15
    fcfs = Driver(_scheduler(make_policy("fcfs"), num_blocks=12, max_num_seqs=2))
    for i in range(30):
        fcfs.add(f"flood{i}", 8, 6, tenant="flood")
    fcfs.step(20)
    for i in range(3):
        fcfs.add(f"light{i}", 8, 6, tenant="light")
    fcfs.step(600)
    assert fcfs.admitted[-3:] == ["light0", "light1", "light2"]  # FCFS: behind the flood


def test_deadline_admits_fresh_requests_before_those_past_their_target() -> None:
    """Arrivals on the scheduler's clock (``time.monotonic``): two requests waited 5 s against
    a 1 s target, two just came. The pool holds one at a time."""
    now = time.monotonic()

    def admitted(policy: SchedulingPolicy) -> list[str]:
        d = Driver(_scheduler(policy, num_blocks=4))
        for i, rid in enumerate(["late0", "late1"]):
            d.add(rid, 12, 4, arrival=now - 5.0 + i * 1e-3)
        for i, rid in enumerate(["fresh0", "fresh1"]):
            d.add(rid, 12, 4, arrival=now + i * 1e-3)
        d.step(200)
        assert not d.s.has_work() and len(d.finished) == 4  # nobody dropped
        return d.admitted

    assert admitted(DeadlinePolicy(ttft_s=1.0)) == ["fresh0", "fresh1", "late0", "late1"]
    assert admitted(make_policy("fcfs")) == ["late0", "late1", "fresh0", "fresh1"]
    # past ten targets a request has waited long enough: arrival order again
    assert admitted(DeadlinePolicy(ttft_s=0.4)) == ["late0", "late1", "fresh0", "fresh1"]


def test_deadline_gives_the_budget_to_an_on_time_prompt_before_a_late_admitted_one() -> None:
    """A late prompt already admitted (its prefill chunked at 8 tokens a step) yields the
    step's budget to a fresh one: the fresh request's first token comes first. FCFS keeps
    chunking the late one."""
    now = time.monotonic()

    def finished(policy: SchedulingPolicy) -> dict[str, int]:
        d = Driver(_scheduler(policy, num_blocks=64, budget=8))
        d.add("late", 40, 1, arrival=now - 5.0)
        d.step(1)  # admitted: 8 of its 40 prompt tokens computed
        d.add("fresh", 8, 1, arrival=now)
        d.step(50)
        assert not d.s.has_work()
        return d.finished

    deadline, fcfs = finished(DeadlinePolicy(ttft_s=1.0)), finished(make_policy("fcfs"))
    assert deadline["fresh"] < deadline["late"] and fcfs["late"] < fcfs["fresh"]


@pytest.mark.parametrize("name", ["fcfs", "priority", "deadline", "fair"])
def test_no_starvation(name: str) -> None:
    d = Driver(_scheduler(make_policy(name), num_blocks=10, max_num_seqs=3, cpu_blocks=32))
    for i in range(12):
        d.add(f"r{i}", 5 + i % 7, 3 + i % 5, tenant=f"t{i % 3}", priority=i % 2)
    d.step(1000)
    assert not d.s.has_work()
    assert len(d.finished) == 12
    assert d.s.pool.stats().used == 0


def test_fair_preempts_an_over_served_tenant_by_swap() -> None:
    policy = FairPolicy(bound=16.0, idle_s=10.0)
    d = Driver(_scheduler(policy, num_blocks=16, cpu_blocks=32))
    for i in range(2):
        d.add(f"flood{i}", 28, 16, tenant="flood")  # 8 blocks each after 2 steps: pool full
    d.step(2)
    assert d.s.pool.num_available == 0
    d.add("light", 8, 3, tenant="light")
    d.step(1)
    assert "light" not in d.admitted  # room for it is not there yet
    d.step(20)
    assert "light" in d.admitted and d.s.swaps_out >= 1
    d.step(200)
    assert d.finished["light"] < min(d.finished["flood0"], d.finished["flood1"])
    assert len(d.finished) == 3 and d.s.recompute_preemptions == 0
    policy.check_integrity()


def test_deadline_orders_a_decode_batch_once_not_every_step() -> None:
    """Once every running request has its first token the deadline order is arrival order,
    and the scheduler reuses it (as FCFS's) instead of building a view per row every step."""

    class Counting(DeadlinePolicy):
        calls = 0

        def order(self, requests, now):  # type: ignore[no-untyped-def]
            self.calls += 1
            return super().order(requests, now)

    policy = Counting(ttft_s=1.0)
    d = Driver(_scheduler(policy, num_blocks=64))
    for i in range(3):
        d.add(f"r{i}", 4, 30, arrival=time.monotonic())
    d.step(2)  # all prefilled in the first step: three decodes from then on
    assert all(s.output_ids for s in d.s.running) and not d.s.waiting
    before = policy.calls
    d.step(10)
    assert len(d.s.running) == 3 and policy.calls - before <= 2, policy.calls - before


def test_a_changed_sequence_cap_admits_from_the_next_step_and_preempts_nobody() -> None:
    """``set_max_num_seqs`` (a worker's role switch): raised, the waiting requests are admitted
    at the next step; lowered, the running ones keep running and no new one is admitted until
    they fall below the cap."""
    d = Driver(_scheduler(PriorityPolicy(), num_blocks=64, max_num_seqs=2))
    for i in range(6):
        d.add(f"r{i}", 4, 8)
    d.step(1)
    assert len(d.s.running) == 2 and len(d.s.waiting) == 4
    d.s.set_max_num_seqs(5)
    d.step(1)
    assert len(d.s.running) == 5 and len(d.s.waiting) == 1
    d.s.set_max_num_seqs(1)
    d.step(1)
    assert len(d.s.running) == 5 and len(d.s.waiting) == 1 and d.s.recompute_preemptions == 0
    d.step(200)
    assert len(d.finished) == 6
    with pytest.raises(ValueError, match="max_num_seqs"):
        d.s.set_max_num_seqs(0)
