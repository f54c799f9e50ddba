"""Liger vs torch comparisons shared by the gpu tests (CUDA) and the Triton-interpreter run on CPU (liger_interpret.py):
each returns max |liger - torch| / max |torch| per output and gradient (and, in bf16, each side's error against fp32)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from megadistill.model import kernels
from megadistill.model.attention import Rotary

# Tolerances (relative to the largest magnitude of the reference tensor):
# fp32: liger == torch up to reduction order (RMSNorm's mean and its gain-grad sum over rows, Liger's sums per
#   program in another order): FP32_TOL.
# bf16: both sides rounded to bf16 at different points; liger's error against the fp32 result may be at most twice
#   torch's own bf16 error plus BF16_SLACK (a few bf16 ulps of the largest value; bf16 eps = 2^-8 = 3.9e-3).
FP32_TOL = 2e-5
# whole models (two blocks, attention and matmuls in between; on CUDA SDPA's backward may sum in another order from
# run to run, and Inductor's fused kernels round elementwise chains differently): MODEL_FP32_TOL.
MODEL_FP32_TOL = 1e-4
BF16_SLACK = 8e-3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _run(fn, inputs: List[torch.Tensor], grads: List[torch.Tensor], dtype) -> List[torch.Tensor]:
    """fn on fresh copies of inputs (cast to dtype, leaves for grads), backward with copies of grads (Liger writes
    into the incoming grad and into its inputs); returns outputs + input grads, in fp32."""
    leaves = [t.detach().to(dtype).requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*[t * 1 if t.requires_grad else t for t in leaves])  # non-leaf inputs: Liger may rotate them in place
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    torch.autograd.backward(outs, [g.detach().to(dtype).clone() for g in grads])
    return [o.detach().float() for o in outs] + [t.grad.float() for t in leaves if t.requires_grad]


def op_cases(device, small: bool = False):
    """(name, fn(kernels) -> callable, inputs, grads, output names) for RMSNorm (row and block kernel shapes),
    SwiGLU and RoPE (GQA, and a single kv head)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    b, s, d, f, h, kv, hd = (2, 8, 64, 96, 4, 2, 32) if small else (2, 1024, 2176, 5888, 16, 4, 128)
    cases = []
    for name, rows_shape in (("rms_norm", (b, s, d)), ("rms_norm_heads", (b, s, h, hd))):  # model norm / QK-norm
        x, gain = rnd(*rows_shape, scale=2.0, shift=0.3), rnd(rows_shape[-1], scale=0.1, shift=1.0)
        cases.append((name, lambda kern: (lambda x, w: kernels.rms_norm(x, w, 1e-5, kern)), [x, gain],
                      [rnd(*rows_shape)], ["y", "dx", "dgain"]))
    a, u = rnd(b, s, f, scale=2.0), rnd(b, s, f)
    cases.append(("swiglu", lambda kern: (lambda a, u: kernels.swiglu(a, u, kern)), [a, u], [rnd(b, s, f)],
                  ["y", "dgate", "dup"]))
    for name, n_kv in (("rope_gqa", kv), ("rope_kv1", 1)):
        q, k = rnd(b, s, h, hd), rnd(b, s, n_kv, hd)
        cases.append((name, lambda kern: (lambda q, k: kernels.rope(q, k, *_tables(hd, s, q), kern)), [q, k],
                      [rnd(b, s, h, hd), rnd(b, s, n_kv, hd)], ["q", "k", "dq", "dk"]))
    return cases


def _tables(hd, s, like):
    return Rotary(hd, 500000.0)(s, like.device, like.dtype)  # [s, hd] each, in the inputs' dtype (as the model)


def op_errors(device, dtype, small: bool = False, only: Optional[Tuple[str, ...]] = None) -> Dict[str, float]:
    """{op.tensor: err(liger, torch)} in `dtype`; in bf16 also {op.tensor.liger_vs_fp32, op.tensor.torch_vs_fp32}.
    only: the op cases to run (names from op_cases), None = all."""
    out = {}
    for name, make, inputs, grads, names in op_cases(device, small):
        if only is not None and name not in only:
            continue
        lig = _run(make("liger"), inputs, grads, dtype)
        ref = _run(make("torch"), inputs, grads, dtype)
        exact = _run(make("torch"), inputs, grads, torch.float32) if dtype != torch.float32 else None
        for i, tname in enumerate(names):
            out[f"{name}.{tname}"] = rel_err(lig[i], ref[i])
            if exact is not None:
                out[f"{name}.{tname}.liger_vs_fp32"] = rel_err(lig[i], exact[i])
                out[f"{name}.{tname}.torch_vs_fp32"] = rel_err(ref[i], exact[i])
    return out


def set_kernels(model: torch.nn.Module, kern: str) -> None:
    """Switch every module of a built Transformer to `kern` (the interpreter run: the model refuses liger without
    CUDA at build time, so it is built with torch and switched)."""
    for m in model.modules():
        if hasattr(m, "kernels"):
            m.kernels = kern


def _model_pair(device, small: bool, build_liger: bool):
    """(build(kern, dtype) -> a fresh Transformer from seed 0, run(model) -> (logits, grads)): QK-norm, GQA."""
    from megadistill.config import ModelConfig
    from megadistill.model.transformer import Transformer
    from megadistill.parallel.layers import LayerFactory

    shape = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=192, vocab_size=128) if small \
        else dict(n_layers=2, d_model=512, n_heads=8, n_kv_heads=2, head_dim=64, d_ff=1408, vocab_size=1024)

    def build(kern, dt):
        cfg = ModelConfig(qk_norm=True, kernels=kern if build_liger else "torch", **shape)
        cfg.validate()
        torch.manual_seed(0)
        model = Transformer(cfg, LayerFactory(device=device, dtype=dt))
        if not build_liger:
            set_kernels(model, kern)
        return model

    ids = torch.randint(0, shape["vocab_size"], (2, 16 if small else 256), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)

    def run(model):
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        logits.float().logsumexp(-1).mean().backward()
        return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}

    return build, run


def compiled_errors(device, backend: str, small: bool = True, build_liger: bool = True) -> Dict[str, float]:
    """kernels=liger with every block compiled (megadistill.train.compile.compile_blocks) vs eager torch, fp32."""
    from megadistill.train.compile import compile_blocks

    build, run = _model_pair(device, small, build_liger)
    model = build("liger", torch.float32)
    assert compile_blocks(model, backend) == 2
    lig_logits, lig_grads = run(model)
    lig2_logits, lig2_grads = run(model)  # a second call through the compiled graphs
    ref_logits, ref_grads = run(build("torch", torch.float32))
    return {"logits": rel_err(lig_logits, ref_logits), "logits_second_call": rel_err(lig2_logits, ref_logits),
            "grads_max": max(rel_err(lig_grads[n], ref_grads[n]) for n in ref_grads),
            "grads_max_second_call": max(rel_err(lig2_grads[n], ref_grads[n]) for n in ref_grads)}


def graphs_per_block(kern: str) -> Dict[str, int]:
    """torch._dynamo.explain of one Block (QK-norm, GQA) with `kern`: how many graphs and graph breaks it compiles to."""
    from megadistill.config import ModelConfig
    from megadistill.model.transformer import Block
    from megadistill.parallel.layers import LayerFactory

    cfg = ModelConfig(n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=192, vocab_size=128)
    cfg.validate()
    block = Block(cfg, cfg.d_ff, LayerFactory())
    set_kernels(block, kern)
    torch._dynamo.reset()
    e = torch._dynamo.explain(block)(torch.randn(2, 8, 64), *Rotary(16, 5e5)(8, "cpu", torch.float32), None)
    return {"graphs": e.graph_count, "graph_breaks": e.graph_break_count}


def model_errors(device, dtype, small: bool = True, build_liger: bool = True) -> Dict[str, float]:
    """A tiny Transformer (QK-norm, GQA) with kernels=liger vs torch from the same weights: logits and every grad."""
    build, run = _model_pair(device, small, build_liger)
    out = {}
    lig_logits, lig_grads = run(build("liger", dtype))
    ref_logits, ref_grads = run(build("torch", dtype))
    out["logits"] = rel_err(lig_logits, ref_logits)
    out["grads_max"] = max(rel_err(lig_grads[n], ref_grads[n]) for n in ref_grads)
    if dtype != torch.float32:
        ex_logits, ex_grads = run(build("torch", torch.float32))
        out["logits.liger_vs_fp32"], out["logits.torch_vs_fp32"] = rel_err(lig_logits, ex_logits), \
            rel_err(ref_logits, ex_logits)
        out["grads_max.liger_vs_fp32"] = max(rel_err(lig_grads[n], ex_grads[n]) for n in ex_grads)
        out["grads_max.torch_vs_fp32"] = max(rel_err(ref_grads[n], ex_grads[n]) for n in ex_grads)
    return out


def assert_within(errs: Dict[str, float], dtype, fp32_tol: float = FP32_TOL) -> None:
    """fp32: every liger-vs-torch error <= fp32_tol; bf16: liger's fp32 error <= 2 x torch's + BF16_SLACK."""
    bad = []
    for key, e in errs.items():
        if dtype == torch.float32:
            if not e <= fp32_tol:  # NaN fails too
                bad.append(f"{key}={e:.3g} > {fp32_tol}")
        elif key.endswith(".liger_vs_fp32"):
            floor = errs[key.replace(".liger_vs_fp32", ".torch_vs_fp32")]
            if not e <= 2 * floor + BF16_SLACK:
                bad.append(f"{key}={e:.3g} > 2 x torch's {floor:.3g} + {BF16_SLACK}")
    assert not bad, "; ".join(bad)
