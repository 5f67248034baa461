"""The sparse Triton kernels (decode tables and bound fold, prefill sampling) compiled ahead of time for Hopper (sm_90) on the CPU: Triton's
own front end, MLIR passes and the bundled ptxas, no GPU. The interpreter
(tests/unit/test_sparse_interpret.py) checks what they compute but not that they compile; this
catches type and constexpr errors that only the compiler sees (tests/gpu runs them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

# Compiled in a child process: a test module that ran earlier in this one (the interpreter
# tests) may have imported the kernels with TRITON_INTERPRET set, and an interpreted kernel has
# nothing to compile. One child for the module, asked once a kernel (a JSON line each way):
# importing triton and the kernels' modules (torch) takes ~2 s, a compile ~0.3-0.5 s.
_COMPILER = """
import importlib, json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for line in sys.stdin:
    try:
        module, name, signature, constexprs, num_warps = json.loads(line)
        sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        names = list(sig)
        fn = getattr(importlib.import_module("kvrelay.kernels." + module), name)
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(names.index(k),): v for k, v in constexprs.items()})
        cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": num_warps}).asm["cubin"]
        reply = {"bytes": len(cubin)}
    except Exception:
        reply = {"error": traceback.format_exc()[-3000:]}
    print(json.dumps(reply), flush=True)
"""


class Compiler:
    """The child that compiles kernels for sm_90, one at a time."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _COMPILER], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip

    def cubin(
        self,
        name: str,
        signature: dict[str, str],
        constexprs: dict[str, object],
        module: str = "triton_sparse",
        num_warps: int = 4,
    ) -> int:
        """Bytes of the sm_90 cubin of ``kvrelay.kernels.<module>.<name>``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = [module, name, signature, constexprs, num_warps]
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the compiler process ended (exit {self.proc.wait()})"
        reply = json.loads(line)
        assert "error" not in reply, reply["error"]
        return int(reply["bytes"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def compiler() -> Iterator[Compiler]:
    c = Compiler()
    yield c
    c.close()


@pytest.mark.parametrize(
    ("picks", "streaming", "gap"), [(True, True, True), (True, False, False), (False, True, False)]
)
def test_tables_kernel_compiles(
    compiler: Compiler, picks: bool, streaming: bool, gap: bool
) -> None:
    sig = {"ctx_ptr": "*i32", "bt_ptr": "*i32", "topk_ptr": "*i64" if picks else "*i32",
           "stream_ptr": "*i1" if streaming else "*i32", "rnb_ptr": "*i64" if gap else "*i32",
           "tables_ptr": "*i32", "lens_ptr": "*i32", "mb": "i32", "width": "i32",
           "n_picks": "i32", "stride_btb": "i32", "stride_kb": "i32", "stride_kh": "i32",
           "stride_kk": "i32"}  # fmt: skip
    consts = dict(D_SINK=4, D_TOPK=256, D_LOCAL=4, S_SINK=8, S_LOCAL=16, BS=16,
                  HAS_PICKS=picks, HAS_STREAM=streaming, HAS_GAP=gap, W_PAD=512,
                  K_PAD=256 if picks else 16)  # fmt: skip
    assert compiler.cubin("_tables_kernel", sig, consts) > 1000


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_fold_kernel_compiles(compiler: Compiler, dtype: str) -> None:
    sig = {"bnd_ptr": f"*{dtype}", "kv_ptr": f"*{dtype}", "slot_ptr": "*i64",
           "stride_bblk": "i64", "stride_bl": "i64", "stride_bmm": "i32", "stride_bsub": "i32",
           "stride_bh": "i32", "stride_kblk": "i64", "stride_kl": "i64", "stride_ktok": "i32",
           "stride_kh": "i32"}  # fmt: skip
    consts = dict(BS=16, SUB=4, KV_HEADS=8, HEAD_DIM=128, HD_PAD=1024)
    assert compiler.cubin("_fold_kernel", sig, consts) > 1000


@pytest.mark.parametrize("fp32_dot", [False, True])
def test_column_mass_kernel_compiles(compiler: Compiler, fp32_dot: bool) -> None:
    dtype = "fp32" if fp32_dot else "bf16"
    sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "part_ptr": "*fp32", "scale_log2": "fp32",
           "n": "i32", "ctx": "i32", "rows": "i32", "first": "i32", "sample_stride": "i32",
           "num_ktiles": "i32", "stride_qt": "i32", "stride_qh": "i32", "stride_kt": "i32",
           "stride_kh": "i32"}  # fmt: skip
    consts = dict(GROUP=4, HEAD_DIM=128, D_PAD=128, BLOCK_M=64, BLOCK_N=64, FP32_DOT=fp32_dot)
    assert compiler.cubin("_column_mass_kernel", sig, consts, "triton_sample") > 1000


@pytest.mark.parametrize(
    ("dtype", "exact", "streaming"),
    [("bf16", False, True), ("bf16", True, True), ("bf16", False, False), ("fp32", False, True)],
)
def test_scores_kernel_compiles(
    compiler: Compiler, dtype: str, exact: bool, streaming: bool
) -> None:
    """bf16 takes the tensor-core dot (fp32 accumulation), fp32 the ieee one; the streaming
    branch and the exact (keys as bounds) single dot over the shortlist's ids, as
    ``block_scores`` launches them (64 (block, sub-page) columns a program)."""
    sig = {"q_ptr": f"*{dtype}", "bnd_ptr": f"*{dtype}", "bt_ptr": "*i32",
           "ids_ptr": "*i64" if exact else "*i32", "stream_ptr": "*i1" if streaming else "*i32",
           "out_ptr": "*fp32", "layer_off": "i64", "mb": "i32", "stride_qb": "i32",
           "stride_qh": "i32", "stride_blk": "i64", "stride_mm": "i32", "stride_sub": "i32",
           "stride_head": "i32", "stride_btb": "i32", "stride_bth": "i32", "stride_ib": "i32",
           "stride_ih": "i32"}  # fmt: skip
    pages = 16 if exact else 4
    consts = dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, D_PAD=128, PAGES=pages, P_PAD=pages,
                  BLOCK_B=64 // pages, EXACT=exact, HAS_IDS=exact, HAS_STREAM=streaming,
                  IEEE=dtype == "fp32")  # fmt: skip
    assert compiler.cubin("_scores_kernel", sig, consts) > 1000


@pytest.mark.parametrize(
    ("has_ids", "chunk", "single"),
    [(False, 4096, True), (True, 8192, True), (False, 8192, True), (False, 8192, False)],
)
def test_topk_kernel_compiles(compiler: Compiler, has_ids: bool, chunk: int, single: bool) -> None:
    """At the warps topk_blocks launches with (16 for a row of 8192 held in registers)."""
    sig = {"val_ptr": "*fp32", "ids_ptr": "*i64" if has_ids else "*fp32", "hi_ptr": "*i64",
           "out_ptr": "*i64", "n": "i32", "k": "i32", "lo": "i32", "heads": "i32",
           "stride_vr": "i32", "stride_ir": "i32"}  # fmt: skip
    consts = dict(HAS_IDS=has_ids, CHUNK=chunk, SINGLE=single)
    warps = 8 if chunk <= 4096 else 16
    assert compiler.cubin("_topk_kernel", sig, consts, "triton_topk", num_warps=warps) > 1000
