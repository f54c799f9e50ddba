#!/usr/bin/env python
"""Micro-benchmark of a mixture-of-experts FFN (megadistill.model.transformer.MoEFeedForward): forward + backward with
the experts' projections as one grouped GEMM each (torch._grouped_mm) vs the loop over the experts, timed round-robin
in one process, with the grouped path's max relative error against the loop (same weights, same routing); and
torch._grouped_mm alone on group layouts (multiples of 16 rows, of 8, unaligned; empty groups) against per-expert
matmuls (on CUDA the aligned one only: an unaligned group is a device-side assert there).

`moe_check(device, ...) -> dict` (tools/gpu_check.py calls it with Qwen3-30B-A3B's block: d 2048, 128 experts of
width 768, top 8, at 4096 tokens in bf16, and the grouped path compiled with Inductor too); as a script it prints the
JSON (CPU default: a small block in fp32; --compile-backend adds the compiled path).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megadistill.config import ModelConfig  # noqa: E402
from megadistill.model import kernels  # noqa: E402
from megadistill.model.transformer import MoEFeedForward  # noqa: E402
from megadistill.parallel.layers import LayerFactory  # noqa: E402


def _run(block, x, gy, grouped: bool, fn=None):
    """One forward + backward of fn (default: the block itself; or its compiled form); returns (output, grads of x
    and of the experts' weights)."""
    x = x.detach().requires_grad_()
    with mock.patch.object(kernels, "_grouped_mm_works", lambda *a: grouped):  # the loop: as if the probe failed
        y = (block if fn is None else fn)(x)
        y.backward(gy)
    grads = [x.grad] + [p.grad.clone() for p in block.experts.parameters()]
    block.zero_grad(set_to_none=True)
    return [y.detach()] + grads


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# group sizes (rows per expert) torch._grouped_mm is tried with, empty groups among them: what the dispatch makes on
# CUDA (kernels.pad_groups: multiples of 16 rows), multiples of 8 (torchtitan's bf16 padding) and none
GROUP_LAYOUTS = {"multiples_of_16": [16, 32, 0, 48], "multiples_of_8": [8, 24, 0, 40], "unaligned": [3, 29, 0, 13]}


def group_layout_check(device: str = "cpu", dtype=torch.bfloat16, d_in: int = 256, d_out: int = 512) -> dict:
    """torch._grouped_mm, forward and backward (input and weight gradients), against per-expert matmuls in fp32 for
    each of GROUP_LAYOUTS: {layout: {"err": max relative error} or {"error": message} or {"skipped": why}}. On CUDA
    only groups of multiples of kernels.group_rows rows: a misaligned group there is a device-side assert, which
    would end this process."""
    out = {}
    for name, counts in GROUP_LAYOUTS.items():
        if any(n % kernels.group_rows(torch.device(device)) for n in counts):
            out[name] = {"skipped": "a misaligned group would be a device-side assert (the end of the process)"}
            continue
        g = torch.Generator().manual_seed(0)
        x = torch.randn(sum(counts), d_in, generator=g)
        w = torch.randn(len(counts), d_out, d_in, generator=g) / d_in ** 0.5
        gy = torch.randn(sum(counts), d_out, generator=g)
        ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref_y = torch.cat([p @ ref_w[e].T for e, p in enumerate(ref_x.split(counts))])
        ref_y.backward(gy)
        try:
            xl = x.to(device, dtype).requires_grad_()
            wl = w.to(device, dtype).requires_grad_()
            offs = torch.tensor(counts, device=device).cumsum(0, dtype=torch.int32)
            y = torch._grouped_mm(xl, wl.transpose(1, 2), offs=offs)
            y.backward(gy.to(device, dtype))
            _sync(device)
            out[name] = {"err": max(_rel_err(a.float().cpu(), b) for a, b in (
                (y.detach(), ref_y.detach()), (xl.grad, ref_x.grad), (wl.grad, ref_w.grad)))}
        except (RuntimeError, NotImplementedError, TypeError) as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return out


def moe_check(device: str = "cpu", dtype=torch.float32, tokens: int = 1024, d: int = 256, experts: int = 16,
              d_ff: int = 128, top_k: int = 2, iters: int = 10, warmup: int = 2,
              compile_backend: Optional[str] = None) -> dict:
    """ms of one fwd + bwd per path (median, round-robin), grouped speedup over the loop, grouped vs loop error. With
    compile_backend, a third path: the grouped one under torch.compile (routing, dispatch and grouped GEMMs in one
    graph, as train.compile runs a bf16 mixture block), its error against the eager grouped path and its speedup."""
    cfg = ModelConfig(n_layers=1, d_model=d, n_heads=max(1, d // 128), head_dim=128 if d >= 128 else d, d_ff=d_ff,
                      vocab_size=128, moe_experts=experts, moe_top_k=top_k)
    cfg.validate()
    torch.manual_seed(0)
    block = MoEFeedForward(cfg, d_ff, LayerFactory(device=device, dtype=torch.float32))
    x32 = torch.randn(1, tokens, d, device=device)
    gy32 = torch.randn_like(x32) / tokens ** 0.5
    ref = _run(block, x32, gy32, grouped=False)
    block.to(dtype)
    x, gy = x32.to(dtype), gy32.to(dtype)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": str(dtype).split(".")[-1], "tokens": tokens, "d": d, "experts": experts, "d_ff": d_ff,
           "top_k": top_k}
    # first what the probe decided and how the kernel handles each group layout: if it is unusable, that is the why
    out["probe"] = kernels._grouped_mm_works(x.device.type, x.device.index, dtype)
    out["group_layouts"] = group_layout_check(device, dtype)
    if not kernels.grouped_mm_usable(x, d_ff, d):
        out["error"] = "torch._grouped_mm is not used for these operands here (probe, alignment or dtype): no timing"
        return out
    # the kernel's error: grouped vs loop on the same weights and routing in `dtype`; and the loop in `dtype` vs fp32
    # (in bf16 that includes tokens whose top k flips: near-tied router scores round apart)
    loop = _run(block, x, gy, grouped=False)
    out["grouped_err_vs_loop"] = max(_rel_err(a, r) for a, r in zip(_run(block, x, gy, grouped=True), loop))
    out["loop_err_vs_fp32"] = max(_rel_err(a, r) for a, r in zip(loop, ref))
    times = {"grouped": [], "loop": []}
    compiled = None
    if compile_backend:
        import torch._dynamo as dynamo
        dynamo.reset()
        compiled = torch.compile(block, backend=compile_backend, dynamic=False)
        t0 = time.perf_counter()
        grouped = _run(block, x, gy, grouped=True)
        out["compiled_err_vs_grouped"] = max(_rel_err(a, r) for a, r in zip(_run(block, x, gy, True, compiled),
                                                                             grouped))
        out["compile_first_call_s"] = round(time.perf_counter() - t0, 2)
        times["compiled"] = []
    for i in range(warmup + iters):
        for name in times:  # round-robin: drift hits every path alike
            _sync(device)
            t0 = time.perf_counter()
            _run(block, x, gy, name != "loop", compiled if name == "compiled" else None)
            _sync(device)
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    for name, ts in times.items():
        out[f"{name}_ms"] = statistics.median(ts)
    out["grouped_speedup"] = out["loop_ms"] / out["grouped_ms"]
    if compiled is not None:
        out["compiled_speedup_over_grouped"] = out["grouped_ms"] / out["compiled_ms"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--d-ff", type=int, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile-backend", default=None,
                    help="also time the grouped path under torch.compile with this backend (inductor, aot_eager)")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    shape = dict(tokens=4096, d=2048, experts=128, d_ff=768, top_k=8) if gpu else dict(
        tokens=1024, d=256, experts=16, d_ff=128, top_k=2)
    shape.update({k: v for k, v in (("tokens", args.tokens), ("d", args.d), ("experts", args.experts),
                                    ("d_ff", args.d_ff), ("top_k", args.top_k)) if v is not None})
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if gpu else "fp32")]
    print(json.dumps(moe_check(args.device, dtype, iters=args.iters, compile_backend=args.compile_backend, **shape),
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
