"""Counting Triton compiles (workers/engine/kernel_compiles.py) through Triton's own hooks, called
as Triton calls them (keyword arguments of ``JITFunction._call_hook``): this CPU has no GPU
driver, so no kernel really compiles here (tests/gpu/test_kernel_compiles_gpu.py does that).

Triton is imported when a test runs, not when this module is collected: tests/unit/
test_kernels_interpret.py must be the first to import it (with TRITON_INTERPRET set)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from kvrelay.workers.engine.kernel_compiles import PHASE, KernelCompiles
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay_testing.clock import spin


def runtime() -> Any:
    """Triton's runtime knobs, where the hooks live."""
    from triton import knobs

    return knobs.runtime


@pytest.fixture(autouse=True)
def restore_hooks() -> Iterator[None]:
    """The hooks are process-wide: each test puts back what it found."""
    rt = runtime()
    saved = rt.jit_cache_hook, rt.jit_post_compile_hook
    rt.jit_cache_hook = rt.jit_post_compile_hook = None
    yield
    rt.jit_cache_hook, rt.jit_post_compile_hook = saved


def hook_kwargs(name: str) -> dict[str, Any]:
    from triton.runtime.jit import JitFunctionInfo

    return dict(
        key=("sig", name), repr=f"{name}[num_warps=4](n: i32, x_ptr: *fp16)",
        fn=JitFunctionInfo(__import__(__name__), name, None),  # type: ignore[arg-type]
        compile={}, is_manual_warmup=False, already_compiled=False,
    )  # fmt: skip


def compile_once(name: str, seconds: float) -> Any:
    """What Triton does around one compile of ``name``: the cache hook, the work, the post hook."""
    rt = runtime()
    skipped = rt.jit_cache_hook(**hook_kwargs(name))
    if skipped:
        return skipped
    spin(seconds)
    return rt.jit_post_compile_hook(**hook_kwargs(name))


def test_each_compile_is_timed_counted_and_recorded_in_the_sink() -> None:
    sink, k = PhaseTimes(), KernelCompiles()
    assert k.install(sink)
    compile_once("_decode_kernel", 0.03)
    compile_once("_reduce_kernel", 0.0)
    assert k.count == 2 and k.serving_count == 0
    first = k.recent()[0]
    assert first.kernel == "_decode_kernel" and first.seconds >= 0.03
    assert "n: i32" in first.signature
    assert k.seconds >= 0.03
    phase = sink.summary()[PHASE]
    assert phase["count"] == 2 and phase["max_ms"] >= 30
    assert k.totals() == {"kernel_compiles": 2.0, "kernel_compile_seconds": k.seconds}


def test_only_compiles_after_serving_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    k = KernelCompiles()
    k.install()
    with caplog.at_level(logging.WARNING, logger="kvrelay.workers.engine.kernel_compiles"):
        compile_once("_startup_kernel", 0.0)
        assert not caplog.records
        k.serving()
        compile_once("_late_kernel", 0.01)
    assert k.serving_count == 1 and k.recent()[-1].serving
    (rec,) = caplog.records
    assert "_late_kernel" in rec.getMessage() and "while serving" in rec.getMessage()


def test_hooks_set_before_are_kept_and_a_skipped_compile_is_not_counted() -> None:
    rt = runtime()
    seen: list[str] = []
    skip = {"_skipped"}
    rt.jit_cache_hook = lambda **kw: seen.append("cache " + kw["fn"].name) or kw["fn"].name in skip
    rt.jit_post_compile_hook = lambda **kw: seen.append("post " + kw["fn"].name)
    k = KernelCompiles()
    assert k.install()
    assert compile_once("_skipped", 0.0) is True  # the earlier hook's answer stands
    compile_once("_kept", 0.0)
    assert seen == ["cache _skipped", "cache _kept", "post _kept"]
    assert [c.kernel for c in k.recent()] == ["_kept"]


def test_install_is_once_per_process_and_adds_each_sink_once() -> None:
    a, b, k = PhaseTimes(), PhaseTimes(), KernelCompiles()
    assert k.install(a) and k.install(b) and k.install(a)
    assert runtime().jit_cache_hook == k._before  # not wrapped around itself
    compile_once("_k", 0.0)
    assert a.summary()[PHASE]["count"] == 1 and b.summary()[PHASE]["count"] == 1


def test_a_post_hook_without_its_start_records_nothing() -> None:
    k = KernelCompiles()
    k.install()
    runtime().jit_post_compile_hook(**hook_kwargs("_began_before_install"))
    assert k.count == 0


def test_a_compile_that_raised_does_not_lend_its_start_to_the_next() -> None:
    k = KernelCompiles()
    k.install()
    runtime().jit_cache_hook(**hook_kwargs("_broken"))  # its compile raises: no post hook
    spin(0.05)
    compile_once("_next", 0.0)
    (c,) = k.recent()
    assert c.kernel == "_next" and c.seconds < 0.05
