"""Compiled per-chunk kernel of the single-pass distillation loss (inductor: Triton on GPU, C++ on CPU), split around
the TP collectives.

The eager chunk (fused_loss._chunk) upcasts the logits to fp32 and makes ~15 passes over [c, V/tp] fp32 buffers. Here
one chunk is three steps, each reading the logits in their own dtype (bf16 upcast in registers):
  1. _stats (compiled): row max of z and of t/tau on this shard, and the shard's partial sums relative to those local
     maxima: sum e^(z-m), sum e^(t/tau-mt) (on the teacher's support), sum e^((z-m)/tau), and the forward
     (sum e_t (t/tau - s)) or reverse (sum e_s (s - t/tau)) KD dot product. No [c, V/tp] buffer is written.
  2. eager, outside any compiled region: one all-reduce (max) of the [2, c] maxima, the partial sums rescaled to the
     global maxima (online-softmax style: S = sum_r S_r e^(m_r - M)), one all-reduce (sum) of [<=4, c]: the same two
     collectives of [c] numbers as the eager chunk (the forward KD dot product stays rank-local, as there). Per-row loss terms and gradient coefficients ([c] vectors).
  3. _grad (compiled): G = dL/dz [c, V/tp] in one elementwise pass, written once in the output dtype (bf16 for a bf16
     head, so it feeds the dH / dW GEMMs without a cast).
The teacher's top-k / top-p support mask (teacher_support: sorting, gathers, and for top-p a 32-step bisection with
data-dependent row selection and an all-reduce per step) stays eager; the compiled steps read the mask.

Shapes: full chunks compile with dynamic=False (one graph per chunk size); the last partial chunk of a call goes
through a twin whose token dimension is dynamic, so any token count costs at most one more graph per variant and
nothing recompiles per chunk or per step. Variants (Python branches): with/without teacher, tau == 1 or not,
forward / reverse, with a support mask or not. compile_count() counts the graphs compiled.
"""
from __future__ import annotations

import collections
import math
import types
from typing import Optional, Tuple

import torch

from megadistill.errors import UserError
from megadistill.parallel.mappings import group_rank, group_size, reduce_from_tp_region
from megadistill.parallel.vocab_parallel import all_reduce_max, teacher_support

LOSS_KERNELS = ("auto", "compiled", "eager")
_COMPILES: collections.Counter = collections.Counter()


def use_compiled(kernel: str, device) -> bool:
    """distill.loss_kernel resolved: auto = compiled on CUDA, eager elsewhere (inductor's CPU compile takes tens of
    seconds and its C++ kernels gain little over eager there)."""
    k = str(kernel).lower()
    if k not in LOSS_KERNELS:
        raise UserError(f"distill.loss_kernel={kernel!r} is not one of {list(LOSS_KERNELS)} "
                        "(auto = compiled on CUDA, eager on CPU)")
    return torch.device(device).type == "cuda" if k == "auto" else k == "compiled"


def chunk_tokens_for(chunk_tokens: Optional[int], kernel: str, device) -> Optional[int]:
    """distill.chunk_tokens for one loss call: the configured count; unset, 1024 with the eager kernel and None (the
    loss sizes it by default_chunk_tokens) with the compiled one."""
    if chunk_tokens is not None:
        return int(chunk_tokens)
    return None if use_compiled(kernel, device) else 1024


def default_chunk_tokens(v_local: int, dtype: torch.dtype, device, compiled: bool, budget_mib: int = 384) -> int:
    """Token chunk when the caller gives none, for the compiled kernel on a GPU (the eager kernel keeps its defaults):
    as many tokens as keep its 3 live [c, V/tp] buffers (student and teacher logits, G, in the logits' dtype) within
    budget_mib, in [1024, 8192] and a multiple of 256. The default budget is what the eager kernel's 3 fp32 buffers
    take at its 1024 tokens and V/tp = 32768, so memory stays the same while bf16 chunks double (2048 tokens): larger
    GEMMs (the dW GEMM's inner dimension is c), half as many fp32 [V/tp, d] dW accumulations and launches."""
    if not compiled or torch.device(device).type != "cuda":
        return 1024
    per_token = 3 * v_local * torch.finfo(dtype).bits // 8
    c = budget_mib * 2 ** 20 // max(per_token, 1)
    return int(min(8192, max(1024, c // 256 * 256)))


def compile_count() -> int:
    """Graphs compiled so far by this module's kernels (all variants and shapes)."""
    return sum(_COMPILES.values())


def _counting_inductor(name: str):
    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        _COMPILES[name] += 1
        return compile_fx(gm, example_inputs)
    return backend


# ------------------------------------------------------------------------------------------- compiled math

def _stats_math(z: torch.Tensor, t: Optional[torch.Tensor], support: Optional[torch.Tensor], tau: float,
                kd: bool, scaled: bool, reverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(maxes [1|2, c], sums [1..4, c]) of this shard; sums are relative to the local maxima (see module doc)."""
    zf = z.float()  # [c, v/tp], upcast on the fly
    m1 = zf.amax(dim=-1)  # [c]
    sum_1 = torch.exp(zf - m1.unsqueeze(-1)).sum(dim=-1)
    if not kd:
        return m1.unsqueeze(0), sum_1.unsqueeze(0)
    tt = t.float() / tau  # t/tau
    tm = tt if support is None else tt.masked_fill(~support, -math.inf)
    mt = tm.amax(dim=-1)  # -inf where this shard holds none of the support
    mt0 = torch.where(mt > -math.inf, mt, 0.0)
    e_t = torch.exp(tm - mt0.unsqueeze(-1))  # 0 off the support
    parts = [sum_1, e_t.sum(dim=-1)]
    if scaled:
        e_s = torch.exp((zf - m1.unsqueeze(-1)) / tau)
        parts.append(e_s.sum(dim=-1))
    else:
        e_s = torch.exp(zf - m1.unsqueeze(-1))
    s = zf * (1.0 / tau)
    if reverse:
        parts.append((e_s * (s - tt)).sum(dim=-1))  # sum_a e_s (s - t/tau)
    else:
        parts.append((e_t * (tt - s)).sum(dim=-1))  # sum_a e_t (t/tau - s); tt is finite, e_t 0 off the support
    return torch.stack([m1, mt]), torch.stack(parts)


def _grad_math(z: torch.Tensor, t: Optional[torch.Tensor], support: Optional[torch.Tensor], idx: torch.Tensor,
               mx: torch.Tensor, coef: torch.Tensor, tau: float, kd: bool, scaled: bool, reverse: bool,
               out_dtype: torch.dtype) -> torch.Tensor:
    """G [c, v/tp] = coef_1 e^(z-M1) + coef_s e^((z-M1)/tau) + coef_t e^(t/tau-MT) | coef_r e_s (s - t/tau - E_q)
    + onehot(idx) coef_y, in out_dtype; mx = global maxima [1|2, c], coef [k, c] per-row coefficients."""
    zf = z.float()
    m1 = mx[0].unsqueeze(-1)
    e1 = torch.exp(zf - m1)
    g = e1 * coef[0].unsqueeze(-1)
    if kd:
        e_s = torch.exp((zf - m1) / tau) if scaled else e1
        tt = t.float() / tau
        if reverse:  # coef[1] = coef_r, coef[2] = E_q[s - t/tau]
            g = g + e_s * (zf * (1.0 / tau) - tt - coef[2].unsqueeze(-1)) * coef[1].unsqueeze(-1)
        else:  # coef[1] = coef_s (0 at tau = 1, folded into coef_1), coef[2] = coef_t
            if scaled:
                g = g + e_s * coef[1].unsqueeze(-1)
            e_t = torch.exp(tt - mx[1].unsqueeze(-1))
            if support is not None:
                e_t = torch.where(support, e_t, 0.0)
            g = g + e_t * coef[2].unsqueeze(-1)
    cols = torch.arange(z.shape[-1], device=z.device)
    g = g + torch.where(cols.unsqueeze(0) == idx.unsqueeze(-1), coef[-1].unsqueeze(-1), 0.0)  # - (1-lam) row_w 1_y
    return g.to(out_dtype)


def _stats_entry(*args):
    return _stats_math(*args)


def _grad_entry(*args):
    return _grad_math(*args)


_KERNELS = {}


def _kernel(name: str, dynamic: bool, spec: tuple):
    """The compiled kernel for one (step, static | dynamic, spec). Dynamo keeps its graphs per code object (and with
    fullgraph=True raises past torch._dynamo.config.recompile_limit of them), so every key gets its own copy of the
    entry's code object and holds one graph: spec = variant (teacher, tau != 1, reverse, support mask), the dtypes
    and tensor kinds (inference tensors, e.g. the trainer's teacher logits, carry other dispatch keys) of the inputs,
    the output dtype and, for the static twin, the chunk size. The dynamic twin (a call's last partial chunk) marks
    only the token dimension dynamic (_mark_tokens): one graph for every remainder (plus one if a remainder of 1
    specialises); the vocab shard and the small leading dimensions stay static."""
    key = (name, dynamic, spec)
    if key not in _KERNELS:
        entry = _stats_entry if name == "stats" else _grad_entry
        tag = f"{name}_{'dynamic' if dynamic else 'static'}_{len(_KERNELS)}"
        fn = types.FunctionType(entry.__code__.replace(co_name=f"_{tag}"), entry.__globals__, f"_{tag}")
        _KERNELS[key] = torch.compile(fn, dynamic=None if dynamic else False, fullgraph=True,
                                      backend=_counting_inductor(tag))
    return _KERNELS[key]


def _mark_tokens(dim: int, *xs: Optional[torch.Tensor]) -> None:
    """Mark the token dimension of the dynamic twin's inputs dynamic (maybe_: a remainder of 1 specialises)."""
    for x in xs:
        if x is not None:
            torch._dynamo.maybe_mark_dynamic(x, dim)


# ------------------------------------------------------------------------------------------------ one chunk

@torch.no_grad()
def chunk_compiled(z: torch.Tensor, t: Optional[torch.Tensor], y: torch.Tensor, row_w: torch.Tensor, o,
                   need_grad: bool, full: bool, out_dtype: torch.dtype) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """fused_loss._chunk's contract (G [c, v/tp] or None, sums [5] fp64) from logits in any float dtype, which are
    read, never overwritten. full: a full-size chunk (static graph) or the call's last partial chunk (dynamic)."""
    group, tau, lam = o.group, o.temperature, o.kd_weight
    dyn = not full
    kd, scaled, reverse = t is not None, t is not None and tau != 1.0, bool(o.reverse) and t is not None
    v_local = z.shape[-1]
    start = group_rank(group) * v_local
    here = (y >= start) & (y < start + v_local)  # this rank holds the target column
    idx = (y - start).clamp(0, v_local - 1)
    z_y = torch.where(here, z.gather(-1, idx.unsqueeze(-1)).squeeze(-1).float(), 0.0)  # [c] rank-local partial
    support = None
    if kd and (o.top_k is not None or (o.top_p is not None and o.top_p < 1.0)):
        tt = t.float() if tau == 1.0 else t.float() / tau  # the eager chunk's t/tau (never in place: t is the caller's)
        support = teacher_support(tt, group, o.top_k, o.top_p, o.top_p_candidates)
        del tt
    z, t = z.detach(), None if t is None else t.detach()  # the kernels never see autograd state (no guard on it)
    spec = ((kd, scaled, reverse, support is not None), z.dtype, z.is_inference(), out_dtype,
            None if t is None else (t.dtype, t.is_inference()), None if dyn else z.shape[0])
    if dyn:
        _mark_tokens(0, z, t, support)
    maxes, part = _kernel("stats", dyn, spec)(z, t, support, tau, kd, scaled, reverse)
    if group_size(group) > 1:  # rescale the shard's partial sums to the global maxima, then sum them over the group
        mx = all_reduce_max(maxes, group)
        d1 = maxes[0] - mx[0]  # <= 0
        rs = [torch.exp(d1)]  # for sum e^(z-m)
        if kd:
            r_t = torch.exp(maxes[1] - mx[1])  # for the e_t sums; 0 where this shard holds none of the support
            r_s = torch.exp(d1 / tau) if scaled else rs[0]  # for the e_s sums
            rs += [r_t] + ([r_s] if scaled else []) + [r_s if reverse else r_t]  # the dot product: e_s or e_t
        part = part * torch.stack(rs)
        if kd and not reverse:  # the forward dot product stays rank-local (all-reduced once by the caller's _totals)
            red = torch.cat([reduce_from_tp_region(part[:-1], group), part[-1:]])
        else:
            red = reduce_from_tp_region(part, group)
    else:
        mx, red = maxes, part
    sum_1 = red[0]
    lse_1 = mx[0] + torch.log(sum_1)
    sums = torch.zeros(5, dtype=torch.float64, device=z.device)
    sums[0] = (row_w * lse_1).sum()
    sums[1] = (row_w * z_y).sum()
    sums[2] = (row_w * lse_1 ** 2).sum()
    coef_1 = row_w * ((1.0 - lam) + 2.0 * o.z_loss * lse_1) / sum_1
    coef_y = -(1.0 - lam) * row_w * here
    if kd:
        sum_t = red[1]
        sum_s = red[2] if scaled else sum_1
        lse_s, lse_t = mx[0] / tau + torch.log(sum_s), mx[1] + torch.log(sum_t)
        w_s = row_w * lam * tau / sum_s
        if reverse:
            e_q = red[-1] / sum_s  # E_q[s - t/tau], replicated
            sums[3] = tau ** 2 * (row_w * (e_q + lse_t - lse_s)).sum()
            coef = [coef_1, w_s, e_q, coef_y]
        else:
            sums[3] = tau ** 2 * (row_w * (lse_s - lse_t)).sum()
            sums[4] = tau ** 2 * (row_w * red[-1] / sum_t).sum()  # rank-local part
            if not scaled:
                coef_1 = coef_1 + w_s
            coef = [coef_1, w_s if scaled else torch.zeros_like(w_s), -row_w * lam * tau / sum_t, coef_y]
    else:
        coef = [coef_1, coef_y]
    if not need_grad:
        return None, sums
    coef = torch.stack(coef)  # [k, c]
    if dyn:
        _mark_tokens(0, idx)  # z, t, support: marked above
        _mark_tokens(1, mx, coef)
    g = _kernel("grad", dyn, spec)(z, t, support, idx, mx, coef, tau, kd, scaled, reverse, out_dtype)
    return g, sums
