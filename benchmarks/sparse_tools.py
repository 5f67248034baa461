"""Tools of the sparse-attention benchmark (sparse_bench.py): a call's median time (``bench``;
on the host, one timed call: the CPU dry run), the aten ops it dispatches (``ops_of``, where a
``kvrelay.kernels`` op counts as one launch), the torch reference bodies of named ops forced
(``reference_ops``), a step captured in a CUDA graph (``captured``) and ``empty_cache``."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

from kvrelay import kernels


def bench(fn: Callable[[], object], rep: int = 50) -> float:
    if not torch.cuda.is_available():  # a CPU dry run of the script (tiny contexts)
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return float(triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median")) / 1e3


class OpCounter(TorchDispatchMode):
    """The aten ops a call dispatches: on a GPU each non-view op is a kernel launch, and every op
    pays Python and dispatcher time (~10-20 µs eager). A ``kvrelay.kernels`` op counts as one
    (its Triton body is one launch; its torch reference on CPU would be many)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.views = 0
        self.inside = False  # in a kernels op's body

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not self.inside:
            self.ops += 1
            self.views += func.is_view
        return func(*args, **(kwargs or {}))


@contextmanager
def count_ops() -> Iterator[OpCounter]:
    counter = OpCounter()
    saved = {name: getattr(kernels, name) for name in kernels.__all__}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def op(*args: Any, **kwargs: Any) -> Any:
            counter.ops += 1
            counter.inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                counter.inside = False

        return op

    for name, fn in saved.items():
        setattr(kernels, name, wrap(fn))
    try:
        with counter:
            yield counter
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)


def ops_of(fn: Callable[[], object]) -> dict[str, int]:
    with count_ops() as c:
        fn()
    return {"ops": c.ops, "non_view": c.ops - c.views}


@contextlib.contextmanager
def reference_ops(names: str) -> Iterator[None]:
    """Force the torch reference bodies of the named ops (kernels/__init__.py)."""
    saved = os.environ.get("KVRELAY_REFERENCE_OPS")
    os.environ["KVRELAY_REFERENCE_OPS"] = names
    try:
        yield
    finally:
        if saved is None:
            del os.environ["KVRELAY_REFERENCE_OPS"]
        else:
            os.environ["KVRELAY_REFERENCE_OPS"] = saved


def captured(step: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``step`` captured in a CUDA graph, after a warm-up on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
