"""The fused index-dispatch kernels (mmoe_ds/moe/kernels/triton_ops.py) without a GPU.

1. Under TRITON_INTERPRET=1 every kernel runs on the CPU and must equal the torch reference
   (float64) forward and backward, in fp32, fp16 and bf16, with routes that are not kept (inverse -1),
   rows spanning two column blocks, and empty inputs. The interpreter must be chosen before
   Triton is first imported, so one subprocess (tests/triton_interp_worker.py) runs every case.
2. Each kernel is compiled ahead of time for sm_90 (H100/H200) with the divisibility hints a
   real launch gets, so compile errors and shared-memory overflows show without a device.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton has no wheel for this platform (non-x86 Linux): the fused kernels are not tested here",
                allow_module_level=True)

from launch_util import REPO, child_env  # noqa: E402
from triton_interp_worker import cases  # noqa: E402

from mmoe_ds.moe.kernels import ops_for, reference  # noqa: E402

TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 8e-3}  # fp32 math, output rounding only


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "results.json"
    proc = subprocess.run([sys.executable, "tests/triton_interp_worker.py", "--out", str(out)], cwd=REPO,
                          env=child_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", cases())
def test_fused_kernel_equals_the_reference_forward_and_backward(interpreted, case):
    r = interpreted[case]
    dtype = case.rsplit("/", 1)[1]
    assert r["out_dtype"] == r["input_dtypes"][0] == f"torch.{dtype}", r
    assert r["grad_dtypes"] == r["input_dtypes"], "each gradient comes back in its input's dtype"
    assert r["out"] <= TOLERANCE[dtype], f"forward: max relative error {r['out']:.2e}"
    for i, err in enumerate(r["grads"]):
        assert err <= TOLERANCE[dtype], f"gradient of input {i}: max relative error {err:.2e}"


def test_the_reference_is_chosen_on_the_cpu():
    x = torch.zeros(2, 2)
    assert ops_for(x) is reference and ops_for(x, fused=False) is reference


# -- ahead-of-time compilation for sm_90 ------------------------------------------------------------
TRITON_TYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
KERNELS = ["gather_rows_kernel", "sum_routes_kernel", "swiglu_fwd_kernel", "swiglu_bwd_kernel",
           "combine_fwd_kernel", "combine_bwd_rows_kernel", "combine_bwd_weights_kernel"]


def aot_signature(kernel, dtype: str) -> dict[str, str]:
    """Argument types as a real launch sees them: data pointers of `dtype`, int64 index pointers,
    fp32 gate pointers, i32 sizes; BLOCK and K (routes per token, compiled for k=2 here) are constexprs."""
    types = {"src_ptr": "*i64", "inverse_ptr": "*i64", "order_ptr": "*i64", "w_ptr": "*fp32", "dw_ptr": "*fp32",
             "S": "i32", "D": "i32", "F": "i32", "K": "constexpr", "BLOCK": "constexpr"}
    return {name: types.get(name, f"*{dtype}") for name in kernel.arg_names}


@pytest.mark.parametrize("name", KERNELS)
def test_kernels_compile_ahead_of_time_for_sm90(name):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mmoe_ds.moe.kernels import triton_ops

    kernel = getattr(triton_ops, name)
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    for dtype in TRITON_TYPES:
        for block in (64, triton_ops.MAX_BLOCK):
            signature = aot_signature(kernel, dtype)
            pointers = [(i,) for i, t in enumerate(signature.values()) if t.startswith("*")]
            widths = [(i,) for i, n in enumerate(signature) if n in ("D", "F")]  # model widths are multiples of 16
            constexprs = {"BLOCK": block, **({"K": 2} if "K" in signature else {})}
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                               attrs={key: [["tt.divisibility", 16]] for key in pointers + widths})
            options = backend.parse_options({"num_warps": triton_ops.launch_config(block)[1]}).__dict__
            compiled = triton.compile(source, target=target, options=options)
            assert "ld.global" in compiled.asm["ptx"] and compiled.asm["cubin"], (name, dtype, block)
            assert compiled.metadata.shared <= 227 * 1024, (name, dtype, block, compiled.metadata.shared)
