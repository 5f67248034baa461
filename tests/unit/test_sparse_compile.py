"""The sparse decode Triton kernels compiled ahead of time for Hopper (sm_90) on the CPU: Triton's
own front end, MLIR passes and the bundled ptxas, no GPU. The interpreter
(tests/unit/test_sparse_interpret.py) checks what they compute but not that they compile; this
catches type and constexpr errors that only the compiler sees (tests/gpu runs them)."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvrelay.kernels import triton_sparse

HOPPER = GPUTarget("cuda", 90, 32)


def _cubin(fn: object, signature: dict[str, str], constexprs: dict[str, object]) -> bytes:
    sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    names = list(sig)
    src = ASTSource(
        fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()}
    )
    return triton.compile(src, target=HOPPER).asm["cubin"]


@pytest.mark.parametrize(
    ("picks", "streaming", "gap"), [(True, True, True), (True, False, False), (False, True, False)]
)
def test_tables_kernel_compiles(picks: bool, streaming: bool, gap: bool) -> None:
    sig = {"ctx_ptr": "*i32", "bt_ptr": "*i32", "topk_ptr": "*i64" if picks else "*i32",
           "stream_ptr": "*i1" if streaming else "*i32", "rnb_ptr": "*i64" if gap else "*i32",
           "tables_ptr": "*i32", "lens_ptr": "*i32", "mb": "i32", "width": "i32",
           "n_picks": "i32", "stride_btb": "i32", "stride_kb": "i32", "stride_kh": "i32",
           "stride_kk": "i32"}  # fmt: skip
    consts = dict(D_SINK=4, D_TOPK=256, D_LOCAL=4, S_SINK=8, S_LOCAL=16, BS=16,
                  HAS_PICKS=picks, HAS_STREAM=streaming, HAS_GAP=gap, W_PAD=512,
                  K_PAD=256 if picks else 16, CHUNK=32)  # fmt: skip
    assert len(_cubin(triton_sparse._tables_kernel, sig, consts)) > 1000


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_fold_kernel_compiles(dtype: str) -> None:
    sig = {"bnd_ptr": f"*{dtype}", "kv_ptr": f"*{dtype}", "slot_ptr": "*i64",
           "stride_bblk": "i64", "stride_bl": "i64", "stride_bmm": "i32", "stride_bsub": "i32",
           "stride_bh": "i32", "stride_kblk": "i64", "stride_kl": "i64", "stride_ktok": "i32",
           "stride_kh": "i32"}  # fmt: skip
    consts = dict(BS=16, SUB=4, KV_HEADS=8, HEAD_DIM=128, HD_PAD=1024)
    assert len(_cubin(triton_sparse._fold_kernel, sig, consts)) > 1000
