"""Loading a Triton kernel module under Triton's interpreter (TRITON_INTERPRET=1) for CPU tests.

Triton fixes interpreted-vs-compiled when ``@triton.jit`` decorates (its own standard library at
``import triton``), so a test loads the module while the variable is set: alone, that is the first
import of triton; after another interpreted test file's collection, triton is already
interpreted. The module is loaded as a private copy, so an earlier import of it cannot hand over
compiled kernels."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch


@contextlib.contextmanager
def interpreted(module: str, kernel: str) -> Iterator[ModuleType]:
    """A private copy of ``module`` whose ``kernel`` runs interpreted on CPU tensors; skips the
    test when triton is absent, CUDA is present (tests/gpu checks compiled kernels) or triton
    was already imported compiled."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: tests/gpu checks the compiled kernels")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl

        if type(tl.standard.sum).__name__ != "InterpretedFunction":
            pytest.skip("triton was imported compiled before this test; run this file alone")
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.loader is not None
        copy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(copy)
        assert type(getattr(copy, kernel)).__name__ == "InterpretedFunction"
        yield copy
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
