"""Timing and profiling on the GPU, for the benchmarks that report device figures
(gpu_bench.py and the benches built on it): a printed line kept for the report (``say``),
device time by CUDA events (``cuda_ms``), wall time of a call that ends in a host sync
(``host_ms``), the host's time blocked on the device (``DeviceWaits``) and kernel time by class
from torch.profiler (``profiled``, ``say_profile``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

LINES: list[str] = []  # every line ``say`` printed, for the report file


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def cuda_ms(fn: Callable[[], Any], iters: int = 20, warmup: int = 3) -> float:
    """Median device time of one call, CUDA events around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_ms(fn: Callable[[], Any], iters: int = 30, warmup: int = 3) -> float:
    """Median wall time of one call that ends in a host sync."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class DeviceWaits:
    """Host time spent blocked on the device inside the block: CUDA event and stream
    synchronises and device-to-host reads (``.tolist()``, ``.item()``) of CUDA tensors. With the
    overlapped scheduler working, the step's host work is its time minus this; a step that
    waits ~0 yet takes longer than the graph step is bound by the host."""

    total = 0.0

    def __enter__(self) -> None:
        self._saved = []
        for owner, name in ((torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "synchronize"),
                            (torch.Tensor, "tolist"), (torch.Tensor, "item")):  # fmt: skip
            fn = getattr(owner, name)
            self._saved.append((owner, name, fn))
            setattr(owner, name, self._timed(fn, owner is torch.Tensor))

    def __exit__(self, *exc: object) -> None:
        for owner, name, fn in self._saved:
            setattr(owner, name, fn)

    @staticmethod
    def _timed(fn: Callable[..., Any], tensor: bool) -> Callable[..., Any]:
        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            if tensor and not self.is_cuda:
                return fn(self, *args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                DeviceWaits.total += time.perf_counter() - t0

        return timed


def profiled(
    run: Callable[[], Any], reps: int = 5
) -> tuple[float, dict[str, list[float]], list[tuple[float, float, str]]]:
    """Kernel time by class per call of ``run`` (torch.profiler, CUDA activity): (total ms,
    {class: [us, kernels]}, [(us, count, name)] per kernel)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    kernels_ = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    classes: dict[str, list[float]] = {}
    for ev in kernels_:
        n = ev.key.lower()
        kind = ("gemm" if any(k in n for k in ("gemm", "gemv", "cutlass", "nvjet", "xmma", "splitk"))
                else "attention" if "_decode" in n or "_prefill" in n or "flash" in n
                else "fused" if any(k in n for k in ("_rms_norm", "_rope_write", "_silu_mul"))
                else "write_kv" if "write_kv" in n
                else "memcpy" if "memcpy" in n or "memset" in n
                else "elementwise/other")  # fmt: skip
        c = classes.setdefault(kind, [0.0, 0.0])
        c[0] += ev.self_device_time_total / reps
        c[1] += ev.count / reps
    per_call = [(e.self_device_time_total / reps, e.count / reps, e.key) for e in kernels_]
    return sum(v[0] for v in classes.values()) / 1e3, classes, per_call


def say_profile(label: str, wall: float, total: float, classes: dict[str, list[float]],
                 kernels_: list[tuple[float, float, str]], top: int = 10) -> None:  # fmt: skip
    parts = ", ".join(
        f"{k} {v[0] / 1e3:.3f} ms ({v[1]:.0f} kernels)" for k, v in sorted(classes.items())
    )
    say(f"  profile {label}: wall {wall:.3f} ms; kernel time {total:.3f} ms "
        f"({total / wall:.2f} of the wall): {parts}")  # fmt: skip
    for us, count, key in sorted(kernels_, reverse=True)[:top]:
        say(f"      {us:8.1f} us/call  x{count:4.0f}  {key[:100]}")
