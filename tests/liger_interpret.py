"""Run Liger-Kernel's Triton kernels on CPU under Triton's interpreter (TRITON_INTERPRET=1) against our torch ops;
prints one JSON object of max relative errors. Used by tests/test_kernels.py (slow); run as a script to see figures.

Two gaps of the interpreter (triton 3.9) are bridged here, leaving Liger's kernel code itself as it is:
- it passes Python float arguments (eps, offset, gate_multiplier) to the kernel unwrapped, where the compiler
  hands it an fp32 scalar; Liger then calls eps.to(tl.float32) -> AttributeError. They are wrapped as fp32 scalars.
- it has no libdevice: triton.language.extra.libdevice.rsqrt (Liger's RMSNorm) is a stub that returns None. It is
  pointed at tl.math.rsqrt, which the interpreter implements.
It also has no bf16 arithmetic (see main), so bf16 is checked here for RMSNorm only.
"""
import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit then builds interpreted functions

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

_cvt = interpreter._implicit_cvt


def _implicit_cvt(arg):
    if isinstance(arg, float):
        return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
    return _cvt(arg)


interpreter._implicit_cvt = _implicit_cvt

import liger_kernel.ops.rms_norm as _liger_rms_norm  # noqa: E402

_liger_rms_norm.rsqrt = lambda x: tl.math.rsqrt(x)  # looked up at call time, when the interpreter has patched tl.math

sys.path.insert(0, os.path.dirname(__file__))
import liger_cases  # noqa: E402


def main() -> dict:
    t0 = time.time()
    out = {"ops_fp32": liger_cases.op_errors("cpu", torch.float32, small=True),
           "model_fp32": liger_cases.model_errors("cpu", torch.float32, small=True, build_liger=False),
           "compiled_fp32": liger_cases.compiled_errors("cpu", "aot_eager", small=True, build_liger=False),
           "block_graphs": {k: liger_cases.graphs_per_block(k) for k in ("torch", "liger")}}
    # bf16: the interpreter keeps bf16 as raw uint16 and converts it to / from fp32, but has no bf16 arithmetic
    # (a bf16 product is a product of bit patterns). Only RMSNorm (casting_mode gemma: everything in fp32) computes
    # in fp32 throughout; SwiGLU's forward product and RoPE run in the inputs' bf16 and are left to the gpu tests.
    out["ops_bf16"] = liger_cases.op_errors("cpu", torch.bfloat16, small=True, only=("rms_norm", "rms_norm_heads"))
    out["seconds"] = round(time.time() - t0, 1)
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
