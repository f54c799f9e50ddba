"""Single-pass student objective: NTP/KD/z-loss values and their gradients in one chunked sweep over the logits.

Two entry points share the per-chunk kernel (_chunk):
- fused_linear_distill_loss: from hidden states and head weights; never holds more than chunk x V/tp logits.
- logits_distill_loss: from materialised logits (the trainer's default path); the gradient w.r.t. the logits is
  formed in the forward, optionally in the logits' own storage, so no autograd graph over [tokens, V/tp] is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megadistill.errors import UserError
from megadistill.parallel.loss_kernel import chunk_compiled, default_chunk_tokens, use_compiled
from megadistill.parallel.mappings import group_rank, group_size, reduce_from_tp_region
from megadistill.parallel.vocab_parallel import (DEFAULT_TOP_P_CANDIDATES, IGNORE_INDEX, all_reduce_max,
                                                 check_options, check_targets, teacher_support)


@dataclass(frozen=True)
class _Opts:
    group: object
    kd_weight: float  # lambda
    temperature: float  # tau
    z_loss: float  # lambda_Z
    top_k: Optional[int]
    top_p: Optional[float]
    reverse: bool
    chunk_tokens: int
    top_p_candidates: int
    compiled: bool = False  # loss_kernel.chunk_compiled instead of _chunk


def _chunk(z: torch.Tensor, t: Optional[torch.Tensor], y: torch.Tensor, row_w: torch.Tensor, o: _Opts,
           need_grad: bool) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Loss sums and d(mean loss)/dz for one token chunk; z [c, v/tp] student and t [c, v/tp] teacher logits (fp32,
    owned: both are overwritten in place to keep at most ~3 [c, v/tp] buffers alive).

    row_w [c] = valid / n_valid. Returns G [c, v/tp] (or None) and sums [5] = (ntp replicated part, ntp rank-local
    part, z, kd replicated part, kd rank-local part); rank-local parts are all-reduced once after the last chunk.
    Per token, with s = z / tau, q = softmax(s), p = truncated softmax(t / tau), sm = softmax(z):
      NTP = lse(z) - z_y                    dNTP/dz = sm - onehot(y)
      Z = lse(z)^2                          dZ/dz   = 2 lse(z) sm
      KD = tau^2 sum p (t/tau - s) + tau^2 (lse(s) - lse_p)            dKD/dz = tau (q - p)
      KD_rev = tau^2 (sum q (s - t/tau) + lse_p - lse(s))              dKD_rev/dz = tau q ((s - t/tau) - E_q[s - t/tau])
    """
    group, tau, lam = o.group, o.temperature, o.kd_weight
    v_local = z.shape[-1]
    start = group_rank(group) * v_local
    here = (y >= start) & (y < start + v_local)  # this rank holds the target column
    idx = (y - start).clamp(0, v_local - 1).unsqueeze(-1)
    z_y = torch.where(here, z.gather(-1, idx).squeeze(-1), 0.0)  # [c] rank-local partial of z_y
    kd = t is not None
    if kd:
        if tau != 1.0:
            t.div_(tau)
        support = teacher_support(t, group, o.top_k, o.top_p, o.top_p_candidates)
        m1, mt = all_reduce_max(torch.stack([z.amax(dim=-1), t.amax(dim=-1)]), group)  # max of s is m1 / tau
        e_t = torch.sub(t, mt.unsqueeze(-1)).exp_()  # [c, v/tp] unnormalised teacher probabilities
        if support is not None:
            e_t.masked_fill_(~support, 0.0)
        sum_t = e_t.sum(dim=-1)
        t.sub_(z, alpha=1.0 / tau)  # t/tau - s, in place
        if o.reverse:
            del e_t
            t.neg_()  # d = s - t/tau
            e_s = torch.sub(z, m1.unsqueeze(-1)).div_(tau).exp_() if tau != 1.0 else None
        else:
            kd_part = t.mul_(e_t).sum(dim=-1)  # sum_a e_t (t/tau - s): rank-local, unnormalised
            del t  # frees the buffer before e_s (tau != 1) is allocated
            e_s = torch.sub(z, m1.unsqueeze(-1)).div_(tau).exp_() if tau != 1.0 else None
    else:
        m1 = all_reduce_max(z.amax(dim=-1), group)
    e1 = z.sub_(m1.unsqueeze(-1)).exp_()  # [c, v/tp] exp(z - m1), in place
    if kd and e_s is None:
        e_s = e1  # tau == 1: q == sm
    parts = [e1.sum(dim=-1)]
    if kd:
        parts += [sum_t] + ([] if e_s is e1 else [e_s.sum(dim=-1)])
        if o.reverse:
            parts.append((e_s * t).sum(dim=-1))  # sum_a e_s (s - t/tau), rank-local
    red = reduce_from_tp_region(torch.stack(parts), group)  # one all-reduce of [1..4, c]
    sum_1 = red[0]
    lse_1 = m1 + torch.log(sum_1)
    sums = torch.zeros(5, dtype=torch.float64, device=z.device)
    sums[0] = (row_w * lse_1).sum()
    sums[1] = (row_w * z_y).sum()
    sums[2] = (row_w * lse_1 ** 2).sum()
    if kd:
        sum_t = red[1]
        sum_s = sum_1 if e_s is e1 else red[2]
        lse_s, lse_t = m1 / tau + torch.log(sum_s), mt + torch.log(sum_t)
        if o.reverse:
            e_q = red[-1] / sum_s  # E_q[s - t/tau], replicated
            sums[3] = tau ** 2 * (row_w * (e_q + lse_t - lse_s)).sum()
        else:
            sums[3] = tau ** 2 * (row_w * (lse_s - lse_t)).sum()
            sums[4] = tau ** 2 * (row_w * kd_part / sum_t).sum()
    if not need_grad:
        return None, sums
    # G = row_w [ (1-lam)(sm - onehot) + 2 lam_Z lse_1 sm + lam dKD/dz ], built in place in e1
    if kd and o.reverse:  # before e1 (== e_s at tau = 1) is rescaled below
        kd_g = t.sub_(e_q.unsqueeze(-1)).mul_(e_s).mul_((row_w * lam * tau / sum_s).unsqueeze(-1))
    coef_1 = row_w * ((1.0 - lam) + 2.0 * o.z_loss * lse_1) / sum_1
    if kd and not o.reverse and e_s is e1:
        coef_1 = coef_1 + row_w * lam * tau / sum_s
    g = e1.mul_(coef_1.unsqueeze(-1))
    if kd and not o.reverse:
        if e_s is not e1:
            g.addcmul_(e_s, (row_w * lam * tau / sum_s).unsqueeze(-1))
        g.addcmul_(e_t, (-row_w * lam * tau / sum_t).unsqueeze(-1))
    elif kd:
        g.add_(kd_g)
    g.scatter_add_(-1, idx, -((1.0 - lam) * row_w * here).unsqueeze(-1))
    return g, sums


def _options(group, kd_weight, temperature, z_loss, top_k, top_p, reverse, chunk_tokens, top_p_candidates,
             loss_kernel: str, v_local: int, dtype: torch.dtype, device, eager_chunk: int) -> _Opts:
    check_options(temperature, top_k, top_p, reverse)
    compiled = use_compiled(loss_kernel, device)
    if chunk_tokens is None:  # the eager kernel's historical default, or sized from memory for the compiled one on GPU
        chunk_tokens = eager_chunk if not compiled else default_chunk_tokens(v_local, dtype, device, compiled)
    if chunk_tokens < 1:
        raise UserError(f"distill.chunk_tokens={chunk_tokens} must be >= 1")
    return _Opts(group, float(kd_weight), float(temperature), float(z_loss), top_k, top_p, bool(reverse),
                 int(chunk_tokens), int(top_p_candidates), compiled)


def _row_weights(y: torch.Tensor) -> torch.Tensor:
    valid = y != IGNORE_INDEX
    return valid.float() / valid.sum().clamp(min=1).float()  # [T] valid / n_valid


def _totals(sums: torch.Tensor, o: _Opts) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats [ntp, kd, z]) from the chunk sums of _chunk, after one all-reduce of the 2 rank-local sums."""
    local = reduce_from_tp_region(sums[[1, 4]], o.group)
    ntp, kd_mean, zl = sums[0] - local[0], sums[3] + local[1], sums[2]
    lam = o.kd_weight
    loss = ((1.0 - lam) * ntp + lam * kd_mean + o.z_loss * zl).float()
    return loss, torch.stack([ntp, kd_mean, zl]).float()


def _stats(st: torch.Tensor, y: torch.Tensor, use_kd: bool) -> Dict[str, torch.Tensor]:
    stats = {"ntp": st[0], "z": st[2], "tokens": (y != IGNORE_INDEX).sum()}
    if use_kd:
        stats["kd"] = st[1]
    return stats


class _FusedLinearDistill(torch.autograd.Function):
    """Loss forward that also computes, chunk by chunk, the gradients w.r.t. student hidden states and head weight.

    backward scales the stored gradients by grad_output; no collectives in backward (the hidden-state gradient is
    this rank's partial sum G_r W_r, completed by the caller's copy_to_tp_region backward all-reduce).
    """

    @staticmethod
    def forward(ctx, h, w, h_t, w_t, y, o: _Opts):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_tok = h.shape[0]
        row_w = _row_weights(y)
        kd = h_t is not None
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        sums = torch.zeros(5, dtype=torch.float64, device=h.device)
        for a in range(0, n_tok, o.chunk_tokens):
            b = min(a + o.chunk_tokens, n_tok)
            if o.compiled:
                # logits in the head's dtype (a bf16 GEMM accumulates in fp32), read by the kernel without an fp32
                # copy; G comes back in the head's dtype, ready for the two GEMMs below
                g, s = chunk_compiled(h[a:b] @ w.t(), h_t[a:b] @ w_t.t() if kd else None, y[a:b], row_w[a:b], o,
                                      need_h or need_w, b - a == o.chunk_tokens, w.dtype)
            else:
                # logits [c, v/tp] passed unnamed so that _chunk holds their only references and can free them early
                g, s = _chunk((h[a:b] @ w.t()).float(), (h_t[a:b] @ w_t.t()).float() if kd else None,
                              y[a:b], row_w[a:b], o, need_h or need_w)
            sums += s
            if g is None:
                continue
            g_mm = g.to(w.dtype)
            if need_h:
                if grad_h.dtype == w.dtype:
                    torch.mm(g_mm, w, out=grad_h[a:b])  # [c, d] rank-local partial of dL/dh, no temporary
                else:
                    grad_h[a:b] = g_mm @ w
            if need_w:
                if w.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h[a:b])  # [v/tp, d]
                else:  # low-precision product, accumulated in fp32 (add_ casts on the fly, no fp32 copy)
                    grad_w.add_(g_mm.t() @ h[a:b])
            del g, g_mm
        loss, stats = _totals(sums, o)
        ctx.save_for_backward(grad_h, grad_w.to(w.dtype) if need_w else None)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None


def fused_linear_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                              teacher_hidden: Optional[torch.Tensor], teacher_weight: Optional[torch.Tensor],
                              targets: torch.Tensor, group=None, kd_weight: float = 1.0, temperature: float = 1.0,
                              z_loss: float = 1e-4, top_k: Optional[int] = None, top_p: Optional[float] = None,
                              reverse: bool = False, chunk_tokens: Optional[int] = None,
                              top_p_candidates: int = DEFAULT_TOP_P_CANDIDATES, loss_kernel: str = "auto"
                              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """L = (1 - lambda) NTP + lambda KD + lambda_Z Z, mean over tokens with target != -100, never holding more than
    chunk_tokens x V/tp logits.

    student_hidden [..., d], student_weight [V/tp, d] (this rank's head shard), teacher_hidden [..., d_T] and
    teacher_weight [V/tp, d_T] (no gradient; None with kd_weight=0 gives the supervised objective NTP + Z),
    targets [...]. With TP > 1 the caller feeds student_hidden through copy_to_tp_region (identity forward,
    all-reduce backward): the gradient returned here for it is this rank's partial sum. Same value, gradient and
    stats as vocab_parallel.distill_loss on the materialised logits: stats = detached means ntp, z, kd (when a
    teacher is used) and the number of valid tokens. loss_kernel: auto (compiled on CUDA, eager on CPU) | compiled
    (loss_kernel.chunk_compiled) | eager (_chunk); chunk_tokens=None: 1024 eager, sized from memory when compiled.
    """
    o = _options(group, kd_weight, temperature, z_loss, top_k, top_p, reverse, chunk_tokens, top_p_candidates,
                 loss_kernel, student_weight.shape[0], student_weight.dtype, student_weight.device, 1024)
    use_kd = kd_weight != 0.0
    if use_kd and (teacher_hidden is None or teacher_weight is None):
        raise UserError(f"distill.kd_weight={kd_weight} needs teacher hidden states and head weight; "
                        "pass them or set kd_weight=0 for the supervised objective")
    d = student_hidden.shape[-1]
    h = student_hidden.reshape(-1, d)
    y = targets.reshape(-1)
    if student_weight.dim() != 2 or student_weight.shape[1] != d or y.numel() != h.shape[0]:
        raise UserError(f"fused loss shapes disagree: hidden {tuple(student_hidden.shape)}, head weight "
                        f"{tuple(student_weight.shape)} (want [V/tp, {d}]), targets {tuple(targets.shape)}")
    h_t = w_t = None
    if use_kd:
        d_t = teacher_hidden.shape[-1]
        h_t = teacher_hidden.detach().reshape(-1, d_t)
        w_t = teacher_weight.detach()
        if h_t.shape[0] != h.shape[0] or tuple(w_t.shape) != (student_weight.shape[0], d_t):
            raise UserError(f"teacher hidden {tuple(teacher_hidden.shape)} / head {tuple(teacher_weight.shape)} "
                            f"do not match the student's tokens {h.shape[0]} and vocab shard {student_weight.shape[0]}")
    check_targets(y, student_weight.shape[0] * group_size(group))
    loss, st = _FusedLinearDistill.apply(h, student_weight, h_t, w_t, y, o)
    return loss, _stats(st, y, use_kd)


class _LogitsDistill(torch.autograd.Function):
    """Objective forward on materialised vocab-shard logits that also forms d(loss)/d(logits), chunk by chunk.

    With inplace, the student logits' storage receives that gradient (ctx.mark_dirty) and the teacher logits serve as
    scratch, so the only [tokens, V/tp] buffer kept for backward is the logits' own. backward scales the stored
    gradient by grad_output; no collectives in backward.
    """

    @staticmethod
    def forward(ctx, z, t, y, o: _Opts, need_grad: bool, inplace: bool):
        v_local = z.shape[-1]
        zf = z.view(-1, v_local)  # z is contiguous (checked by the caller)
        tf = None if t is None else t.reshape(-1, v_local)
        row_w = _row_weights(y)
        sums = torch.zeros(5, dtype=torch.float64, device=z.device)
        grad = zf if inplace else torch.empty_like(zf) if need_grad else None

        def owned(x: torch.Tensor, may_overwrite: bool) -> torch.Tensor:
            # _chunk overwrites its inputs, in fp32: the rows themselves when allowed, else an fp32 copy (also for an
            # inference tensor, e.g. the teacher's logits, which cannot be written in place outside inference mode)
            if x.dtype != torch.float32:
                return x.float()
            if may_overwrite and x.is_inference() and not torch.is_inference_mode_enabled():
                may_overwrite = False
            return x if may_overwrite else x.clone()

        for a in range(0, zf.shape[0], o.chunk_tokens):
            b = min(a + o.chunk_tokens, zf.shape[0])
            if o.compiled:  # reads the rows in their dtype; G is a fresh [c, v/tp] buffer in the logits' dtype
                g, s = chunk_compiled(zf[a:b], None if tf is None else tf[a:b], y[a:b], row_w[a:b], o, need_grad,
                                      b - a == o.chunk_tokens, z.dtype)
            else:
                g, s = _chunk(owned(zf[a:b], inplace), None if tf is None else owned(tf[a:b], inplace), y[a:b],
                              row_w[a:b], o, need_grad)
            sums += s
            if g is not None and g.data_ptr() != grad[a:b].data_ptr():
                grad[a:b].copy_(g)  # a bf16 chunk, the compiled kernel's output, or the not-in-place buffer
            del g  # before the next chunk's fp32 copy is made
        loss, stats = _totals(sums, o)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # else backward receives a zero [tokens, V/tp] tensor for the returned z
        ctx.shape = z.shape
        if inplace:
            ctx.mark_dirty(z)
        ctx.save_for_backward(None if not need_grad else z if inplace else grad)  # (the dirty input, not a view)
        return loss, stats, z if inplace else None

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_z):
        (g,) = ctx.saved_tensors
        if g is None or grad_loss is None:
            return None, None, None, None, None, None
        if getattr(ctx, "consumed", False):
            raise RuntimeError("logits_distill_loss: backward ran twice (retain_graph); its stored gradient is "
                               "scaled in place and can be used once")
        ctx.consumed = True
        # scaled in place: a fresh [tokens, V/tp] product costs an allocation and a pass; on CPU the usual
        # grad_output of exactly 1 skips even the pass (on a GPU that check would be a device sync)
        if not (g.device.type == "cpu" and float(grad_loss) == 1.0):
            g.mul_(grad_loss.to(g.dtype))
        return g.view(ctx.shape), None, None, None, None, None


def logits_distill_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], targets: torch.Tensor,
                        group=None, kd_weight: float = 1.0, temperature: float = 1.0, z_loss: float = 1e-4,
                        top_k: Optional[int] = None, top_p: Optional[float] = None, reverse: bool = False,
                        chunk_tokens: Optional[int] = None, inplace: bool = False,
                        top_p_candidates: int = DEFAULT_TOP_P_CANDIDATES, loss_kernel: str = "auto"
                        ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """vocab_parallel.distill_loss (same value, stats and gradient) in one sweep: per chunk of chunk_tokens rows, the
    softmax statistics, the loss sums and d(loss)/d(logits) are formed together, so the logits are read a few times
    instead of once per autograd node, and backward is one scaling.

    student_logits [..., V/tp] (this rank's vocab shard), teacher_logits the same shape or None (kd_weight=0),
    targets [...]. inplace=True (the trainer's choice) lets the loss overwrite student_logits with their gradient and
    teacher_logits with scratch: neither may be used afterwards. fp32 logits are then never copied; bf16 logits are
    converted one chunk at a time. loss_kernel as in fused_linear_distill_loss (chunk_tokens=None: 256 eager); the
    compiled kernel reads the logits in their dtype and never overwrites the teacher's.
    """
    o = _options(group, kd_weight, temperature, z_loss, top_k, top_p, reverse, chunk_tokens, top_p_candidates,
                 loss_kernel, student_logits.shape[-1], student_logits.dtype, student_logits.device, 256)
    use_kd = kd_weight != 0.0
    if use_kd and teacher_logits is None:
        raise UserError(f"distill.kd_weight={kd_weight} needs teacher logits; pass them or set kd_weight=0")
    if use_kd and teacher_logits.shape != student_logits.shape:
        raise UserError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                        f"{tuple(teacher_logits.shape)} must have the same (local-shard) shape")
    y = targets.reshape(-1)
    v_local = student_logits.shape[-1]
    if y.numel() * v_local != student_logits.numel():
        raise UserError(f"targets {tuple(targets.shape)} do not match the logits {tuple(student_logits.shape)}")
    check_targets(y, v_local * group_size(group))
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    z = student_logits.contiguous()  # non-contiguous logits are copied once (and the copy may then be overwritten)
    inplace = bool(inplace) and not (z.is_leaf and need_grad)  # a leaf that requires grad cannot be overwritten
    t = teacher_logits.detach() if use_kd else None
    loss, st, _ = _LogitsDistill.apply(z, t, y, o, need_grad, inplace)
    return loss, _stats(st, y, use_kd)
