#!/usr/bin/env python
"""GPU micro-benchmark of model.kernels: each op (RMSNorm, QK-norm, SwiGLU, RoPE) and one whole block, fwd + bwd,
torch eager vs Liger-Kernel vs torch under Inductor, at the 975M model's widths and seq 4096 in bf16, with each
side's max error against the fp32 torch op.

`liger_check() -> dict` (tools/gpu_check.py calls it); as a script it prints the JSON. About a minute on an H100/H200,
most of it compiling (--no-compile skips the Inductor columns).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _fwd_bwd(fn: Callable, inputs: List[torch.Tensor], grads: List[torch.Tensor], dtype) -> List[torch.Tensor]:
    """fn on fresh leaf copies of inputs in dtype (Liger rotates / overwrites its inputs and incoming grads in place,
    so every call gets its own), backward with copies of grads; outputs + input grads."""
    leaves = [t.detach().to(dtype).requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*[t * 1 if t.requires_grad else t for t in leaves])
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    torch.autograd.backward(outs, [g.detach().to(dtype).clone() for g in grads])
    return [o.detach() for o in outs] + [t.grad for t in leaves if t.requires_grad]


def _time_ms(fn: Callable, inputs: List[torch.Tensor], grads: List[torch.Tensor], dtype, iters: int,
             warmup: int) -> float:
    """Median ms of one forward + backward; the per-call copies of inputs / grads are made outside the timed span."""
    cuda = inputs[0].is_cuda
    times = []
    for i in range(warmup + iters):
        leaves = [t.detach().to(dtype).requires_grad_(t.is_floating_point()) for t in inputs]
        args = [t * 1 if t.requires_grad else t for t in leaves]  # non-leaf inputs, as in the model
        gs = [g.detach().to(dtype).clone() for g in grads]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
        t0 = time.perf_counter()
        outs = fn(*args)
        torch.autograd.backward(list(outs) if isinstance(outs, tuple) else [outs], gs)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def _op_cases(device, b: int, s: int, d: int, f: int, h: int, kv: int, hd: int):
    """name -> (fn(kernels), inputs, grads) for the model's four kernel call sites."""
    from megadistill.model import kernels
    from megadistill.model.attention import Rotary

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    rotary = Rotary(hd, 500000.0)  # tables cached per dtype: in the inputs' dtype, as the model passes them

    def rope(kern):
        return lambda q, k: kernels.rope(q, k, *rotary(s, q.device, q.dtype), kern)

    return {
        "rms_norm": (lambda kern: (lambda x, w: kernels.rms_norm(x, w, 1e-5, kern)),
                     [rnd(b, s, d, scale=2.0, shift=0.3), rnd(d, scale=0.1, shift=1.0)], [rnd(b, s, d)]),
        "qk_norm": (lambda kern: (lambda x, w: kernels.rms_norm(x, w, 1e-5, kern)),
                    [rnd(b, s, h, hd, scale=2.0), rnd(hd, scale=0.1, shift=1.0)], [rnd(b, s, h, hd)]),
        "swiglu": (lambda kern: (lambda a, u: kernels.swiglu(a, u, kern)), [rnd(b, s, f, scale=2.0), rnd(b, s, f)],
                   [rnd(b, s, f)]),
        "rope": (rope, [rnd(b, s, h, hd), rnd(b, s, kv, hd)], [rnd(b, s, h, hd), rnd(b, s, kv, hd)]),
    }


def _block_case(device, dtype, size: str, seq: int, batch: int):
    """One transformer block of `size` (QK-norm on), fwd + bwd of sum(out * g); fn(kernels, compiled)."""
    from megadistill import config
    from megadistill.model.transformer import Block
    from megadistill.parallel.layers import LayerFactory

    mcfg = config.load([], [f"model.size={size}", "train.steps=1"]).model
    x = torch.randn(batch, seq, mcfg.d_model, device=device, dtype=dtype)
    gy = torch.randn_like(x)

    def make(kern: str, compiled: bool):
        mcfg.kernels = kern
        torch.manual_seed(0)
        block = Block(mcfg, mcfg.d_ff, LayerFactory(device=device, dtype=dtype))
        cos, sin = _rotary(mcfg, seq, device, dtype)
        if compiled:
            block.compile()

        def fn(inp):
            return block(inp, cos, sin, None)
        return fn
    return make, x, gy


def _rotary(mcfg, seq, device, dtype):
    from megadistill.model.attention import RopeScaling, Rotary
    return Rotary(mcfg.head_dim, mcfg.rope_base, RopeScaling.of(mcfg))(seq, device, dtype)


def liger_check(seq: int = 4096, batch: int = 1, size: str = "975M", dtype=torch.bfloat16, device: str = "cuda",
                compiled: bool = True, block: bool = True, iters: int = 20, warmup: int = 5,
                shape: Optional[Dict[str, int]] = None) -> dict:
    """Per op and for one block: fwd + bwd ms (torch, liger, torch_inductor), speedups, and max relative error
    against the fp32 torch op of liger and of torch in `dtype` (the noise floor liger is judged by)."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError as e:
        return {"liger": f"not installed ({e}): pip install -e '.[liger]'", "ok": None}
    from importlib.metadata import PackageNotFoundError, version
    try:
        liger_version = version("liger-kernel")
    except PackageNotFoundError:
        liger_version = "unknown"
    from megadistill import config

    if shape is None:
        m = config.load([], [f"model.size={size}", "train.steps=1"]).model
        shape = dict(d=m.d_model, f=m.d_ff, h=m.n_heads, kv=m.n_kv_heads or m.n_heads, hd=m.head_dim)
    out: dict = {"liger_version": liger_version, "torch": torch.__version__, "dtype": str(dtype).split(".")[-1],
                 "seq": seq, "batch": batch, "size": size, "shape": shape, "ops": {}}
    if device == "cuda":
        out["device"] = torch.cuda.get_device_name()
    ok = True
    for name, (make, inputs, grads) in _op_cases(device, batch, seq, **shape).items():
        ref = _fwd_bwd(make("torch"), inputs, grads, torch.float32)
        res = {"liger_err_vs_fp32": max(_rel_err(a.float(), r) for a, r in
                                        zip(_fwd_bwd(make("liger"), inputs, grads, dtype), ref)),
               "torch_err_vs_fp32": max(_rel_err(a.float(), r) for a, r in
                                        zip(_fwd_bwd(make("torch"), inputs, grads, dtype), ref))}
        ok &= res["liger_err_vs_fp32"] <= 2 * res["torch_err_vs_fp32"] + 8e-3
        res["torch_ms"] = _time_ms(make("torch"), inputs, grads, dtype, iters, warmup)
        res["liger_ms"] = _time_ms(make("liger"), inputs, grads, dtype, iters, warmup)
        res["liger_speedup"] = res["torch_ms"] / res["liger_ms"]
        if compiled:
            res["torch_inductor_ms"] = _time_ms(torch.compile(make("torch")), inputs, grads, dtype, iters, warmup)
            res["liger_speedup_vs_inductor"] = res["torch_inductor_ms"] / res["liger_ms"]
        out["ops"][name] = res
    if block:
        make, x, gy = _block_case(device, dtype, size, seq, batch)
        blk = {}
        variants = [("torch", False), ("liger", False)] + ([("torch", True), ("liger", True)] if compiled else [])
        for kern, comp in variants:
            blk[f"{kern}{'_compiled' if comp else ''}_ms"] = _time_ms(make(kern, comp), [x], [gy], dtype, iters,
                                                                       warmup)
        out["block"] = blk
    out["ok"] = bool(ok)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", default="975M")
    ap.add_argument("--no-compile", action="store_true", help="skip the Inductor columns (and compiled blocks)")
    ap.add_argument("--no-block", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    t0 = time.time()
    result = liger_check(args.seq, args.batch, args.size, compiled=not args.no_compile, block=not args.no_block)
    result["wall_s"] = time.time() - t0
    print(json.dumps(result, indent=1))
    return 0 if result.get("ok") is not False else 2


if __name__ == "__main__":
    sys.exit(main())
