"""Vocab-parallel cross-entropy, KL distillation (full / top-k / top-p / reverse) and z-loss on vocab-sharded logits."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from megadistill.errors import UserError
from megadistill.parallel.mappings import gather_from_tp_region, group_rank, group_size, reduce_from_tp_region

IGNORE_INDEX = -100
DEFAULT_TOP_P_CANDIDATES = 256  # per-rank teacher candidates of the exact top-p search (see _top_p_support)


# ----------------------------------------------------------------------------------------------- collectives
# Rank r of the TP group holds vocab columns [r V/tp, (r+1) V/tp). Every collective here moves per-token numbers
# ([tokens] or [tokens, k]), never a [tokens, V/tp] slab. group=None (or a group of one) is the dense case.
# Sums of per-rank partials use reduce_from_tp_region (all-reduce forward, identity backward: the reduced value is
# replicated and consumed identically on every rank, so each rank's partial gets the replicated gradient); per-rank
# top-k candidates are concatenated with gather_from_tp_region (its backward keeps this rank's slice).

@torch.no_grad()
def _all_reduce_detached(x: torch.Tensor, group, op) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=op, group=group)
    return x


def all_reduce_max(x: torch.Tensor, group) -> torch.Tensor:
    """forward: all-reduce (max); backward: none.

    Only used on detached values: the stabilising shift of a log-sum-exp (which cancels, so carries no gradient)
    and teacher-side thresholds (the teacher gets no gradient).
    """
    return _all_reduce_detached(x, group, dist.ReduceOp.MAX)


def all_reduce_min(x: torch.Tensor, group) -> torch.Tensor:
    """forward: all-reduce (min); backward: none (detached teacher-side search bounds only)."""
    return _all_reduce_detached(x, group, dist.ReduceOp.MIN)


# ----------------------------------------------------------------------------------- checks and shared pieces

def check_options(temperature: float, top_k: Optional[int], top_p: Optional[float], reverse: bool) -> None:
    if not temperature > 0:
        raise UserError(f"distill.temperature={temperature!r} must be > 0 (the paper uses 1; range 0.5..10)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"distill.top_k={top_k!r} must be a positive integer or null (no truncation)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"distill.top_p={top_p!r} must lie in (0, 1] or be null (no truncation)")
    if reverse and (top_k is not None or (top_p is not None and top_p < 1.0)):
        raise UserError("distill.reverse=true cannot be combined with distill.top_k/top_p: reverse KL(q_S || p_T) "
                        "is infinite wherever the truncated teacher has zero mass; drop the truncation or reverse")


def check_targets(targets: torch.Tensor, vocab: int) -> None:
    """Targets in [0, vocab) or IGNORE_INDEX. On a GPU the check is asynchronous (torch._assert_async: no host sync in
    the micro-batch loop; a bad target stops the process with this message at the next sync): the trainer checks
    each batch's labels on the host before they are copied (megadistill.train.teacher_prefetch), with the named
    error and the offending value."""
    bad = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= vocab)
    if targets.is_cuda:
        torch._assert_async(~bad.any(), f"targets must lie in [0, {vocab}) or equal {IGNORE_INDEX} (ignored)")
        return
    if bool(bad.any()):
        raise UserError(f"targets must lie in [0, {vocab}) or equal {IGNORE_INDEX} (ignored); "
                        f"found {targets[bad][0].item()}: check the tokenizer's vocab against model.vocab_size")


def softmax_stats(x: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, e, S) for x [n, v/tp]: global row max m [n] (detached), e = exp(x - m) [n, v/tp], S = sum_V e [n].

    log-sum-exp over the full vocab = m + log S; softmax on this shard = e / S. Collectives: max and sum of [n].
    """
    m = all_reduce_max(x.detach().amax(dim=-1), group)  # [n]
    e = torch.exp(x - m.unsqueeze(-1))  # [n, v/tp]
    return m, e, reduce_from_tp_region(e.sum(dim=-1), group)


def logsumexp(x: torch.Tensor, group) -> torch.Tensor:
    m, _, s = softmax_stats(x, group)
    return m + torch.log(s)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """Losses are computed in fp32 (bf16 / fp16 logits upcast), or in fp64 when an input is fp64 (kept, not cut)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# ------------------------------------------------------------------------------- teacher truncation (no grad)

@torch.no_grad()
def _top_k_support(t: torch.Tensor, k: int, group) -> Optional[torch.Tensor]:
    """Mask [n, v/tp] of the teacher's global top-k, or None when k >= V (nothing truncated).

    Each rank's share of the global top-k lies inside its local top-min(k, V/tp), so gathering those candidates
    ([n, tp min(k, V/tp)] numbers) gives the global k-th largest value exactly. Tokens tied with the k-th value are
    all kept: the set then does not depend on the TP layout (torch.topk breaks ties arbitrarily).
    """
    v_local = t.shape[-1]
    if k >= v_local * group_size(group):
        return None
    cand = gather_from_tp_region(t.topk(min(k, v_local), dim=-1).values, group)  # [n, tp k']
    kth = cand.topk(k, dim=-1).values[:, -1:]  # [n, 1]
    return t >= kth


def _float_key(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 key of fp32 values (a < b  <=>  key(a) < key(b)); bisection on keys is exact."""
    b = (x.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)  # + 0.0 folds -0.0 into +0.0
    return torch.where(b >= 0, b, -(b & 0x7FFFFFFF) - 1)


def _key_float(key: torch.Tensor) -> torch.Tensor:
    b = torch.where(key >= 0, key, -(key + 1) - 2 ** 31)
    return b.to(torch.int32).view(torch.float32)


@torch.no_grad()
def _top_p_support(t: torch.Tensor, support: Optional[torch.Tensor], top_p: float, group,
                   n_cand: int) -> torch.Tensor:
    """Mask [n, v/tp] of the teacher's top-p nucleus (of the distribution already restricted to `support`).

    Definition: token a is kept iff the mass of tokens strictly more likely than a is < top_p, i.e. the smallest
    set of most likely tokens whose mass reaches top_p (ties at the boundary all kept). It is {a: t_a >= u} with
    u the smallest fp32 number whose mass above, G(u) = sum_{t_b > u} p_b, is < top_p. u is found by an exact
    bisection on the fp32 bit pattern (keys span < 2^32, so 32 halvings close every interval); each step is one
    all-reduce of the per-token mass G(mid), [n] numbers, so the traffic is O(tokens) whatever the nucleus and V:
    - each rank keeps its top-n_cand logits locally (never communicated). With c = max over ranks of each rank's
      smallest candidate, every token with logit > c is a candidate on its rank, so G(u) for u >= c is a sum over
      the candidates: for rows with G(c) >= top_p (u > c: the common case, nuclei of trained teachers are small)
      each step costs O(n_cand) per token;
    - rows with G(c) < top_p (a flat teacher, nucleus wider than the candidates) bisect in [min, c] over the full
      local shard.
    Collectives: max + sum of [n] (normaliser), one max of [2, n] (c and -min), then 33 sums of [n]. All ranks
    hold identical reduced values, so they take the same branch per row.
    """
    n, v_local = t.shape
    if support is not None:
        t = t.masked_fill(~support, -math.inf)
    m, _, s = softmax_stats(t, group)
    lse = m + torch.log(s)  # [n] log-normaliser of the (top-k) teacher
    k = min(n_cand, v_local)
    cand = t.topk(k, dim=-1).values  # [n, k] local candidates, descending
    p_cand = torch.exp(cand - lse.unsqueeze(-1))
    c_local = cand[:, -1] if k < v_local else torch.full_like(lse, -math.inf)
    finite_min = torch.where(t > -math.inf, t, math.inf).amin(dim=-1)
    c, neg_min = all_reduce_max(torch.stack([c_local, -finite_min]), group)  # every logit > c is a candidate
    lo_all = _float_key(-neg_min) - 1  # G(lo_all) = all the mass >= top_p
    c_key = torch.maximum(_float_key(c), lo_all)
    hi = _float_key(m)  # G(max) = 0 < top_p
    g_c = reduce_from_tp_region(torch.where(cand > _key_float(c_key).unsqueeze(-1), p_cand, 0.0).sum(dim=-1), group)
    in_cand = g_c >= top_p  # u > c: the candidates decide
    lo = torch.where(in_cand, c_key, lo_all)
    hi = torch.where(in_cand, hi, c_key)
    # the rows of each branch (identical on every rank), flat ones first: one host read (their count) per call
    order = torch.argsort(in_cand.to(torch.uint8), stable=True)
    n_flat = int(n - in_cand.sum())
    flat_rows, cand_rows = order[:n_flat], order[n_flat:]
    t_flat = t[flat_rows]
    p_flat = torch.exp(t_flat - lse[flat_rows].unsqueeze(-1))  # [r, v/tp]
    cand, p_cand = cand[cand_rows], p_cand[cand_rows]
    g = torch.empty_like(lse)
    for _ in range(32):
        active = hi - lo > 1
        mid = (lo + hi) // 2
        u = _key_float(mid).unsqueeze(-1)
        g[cand_rows] = torch.where(cand > u[cand_rows], p_cand, 0.0).sum(dim=-1)
        g[flat_rows] = torch.where(t_flat > u[flat_rows], p_flat, 0.0).sum(dim=-1)
        below = reduce_from_tp_region(g, group) < top_p
        hi = torch.where(active & below, mid, hi)
        lo = torch.where(active & ~below, mid, lo)
    return (t >= _key_float(hi).unsqueeze(-1)) & (t > -math.inf)


@torch.no_grad()
def teacher_support(t: torch.Tensor, group, top_k: Optional[int], top_p: Optional[float],
                    n_cand: int = DEFAULT_TOP_P_CANDIDATES) -> Optional[torch.Tensor]:
    """Support mask [n, v/tp] of the truncated tempered teacher t (top-k, then top-p of the renormalised rest)."""
    support = _top_k_support(t, top_k, group) if top_k is not None else None
    if top_p is not None and top_p < 1.0:
        support = _top_p_support(t, support, top_p, group, n_cand)
    return support


# ------------------------------------------------------------------------------------------------- the losses

def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token -log softmax(z)_y, shape [...]; logits [..., V/tp] (local shard), targets [...] global ids.

    Megatron's staged form: global max, all-reduce of sum exp, target logit from the one rank that holds it
    (all-reduce of a masked gather). Targets == -100 give loss 0 and no gradient.
    """
    v_local = logits.shape[-1]
    z, y = _flat(logits).to(_compute_dtype(logits)), targets.reshape(-1)
    check_targets(y, v_local * group_size(group))
    lse = logsumexp(z, group)  # [n]
    start = group_rank(group) * v_local
    here = (y >= start) & (y < start + v_local)
    z_y = z.gather(-1, (y - start).clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)  # [n]
    z_y = reduce_from_tp_region(torch.where(here, z_y, 0.0), group)
    loss = torch.where(y != IGNORE_INDEX, lse - z_y, 0.0)
    return loss.reshape(targets.shape)


def vocab_parallel_z_loss(logits: torch.Tensor, group=None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token (log sum_V exp z)^2, shape [...] (PaLM's z-loss; the paper weights it by 1e-4)."""
    z = _flat(logits).to(_compute_dtype(logits))
    loss = logsumexp(z, group) ** 2
    if mask is not None:
        loss = torch.where(mask.reshape(-1), loss, 0.0)
    return loss.reshape(logits.shape[:-1])


def vocab_parallel_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, group=None,
                          temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                          reverse: bool = False, mask: Optional[torch.Tensor] = None,
                          top_p_candidates: int = DEFAULT_TOP_P_CANDIDATES) -> torch.Tensor:
    """Per-token tau^2 KL(p_T || q_S) of the tempered distributions (reverse=True: tau^2 KL(q_S || p_T)), shape [...].

    We return the KL itself (>= 0, exactly 0 when student == teacher), which is PAPER.md's
    L_KD = -tau^2 sum p_T log q_S minus the teacher-entropy constant: same gradient, but a number comparable
    across teachers. top_k / top_p truncate the teacher and renormalise it (top-k first); the teacher gets no
    gradient; mask [...] (False = ignored token) gives loss 0 and no gradient there.
    """
    check_options(temperature, top_k, top_p, reverse)
    if student_logits.shape != teacher_logits.shape:
        raise UserError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                        f"{tuple(teacher_logits.shape)} must have the same (local-shard) shape")
    dtype = _compute_dtype(student_logits, teacher_logits)
    s = _flat(student_logits).to(dtype)
    t = _flat(teacher_logits).detach().to(dtype)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    m_s, e_s, sum_s = softmax_stats(s, group)
    lse_s = m_s + torch.log(sum_s)  # [n], replicated
    with torch.no_grad():
        support = teacher_support(t, group, top_k, top_p, top_p_candidates)
        t_in = t if support is None else t.masked_fill(~support, -math.inf)
        lse_t = logsumexp(t_in, group)  # [n] over the kept teacher tokens
        if not reverse:
            p = torch.exp(t_in - lse_t.unsqueeze(-1))  # [n, v/tp], 0 off the support (t is finite there)
            p_t = (p * t).sum(dim=-1)
        del t_in
    if not reverse:
        # sum_a p_a (log p_a - log q_a) = sum_a p_a (t_a - s_a) - lse_t + lse_s, using sum_a p_a = 1; the two
        # dot products are formed separately so no [n, v/tp] difference is kept for backward
        kl = reduce_from_tp_region(p_t - (p * s).sum(dim=-1), group) - lse_t + lse_s
    else:
        # sum_a q_a (s_a - t_a) + lse_t - lse_s with q = e_s / sum_s; the local partial is reduced before it meets
        # the replicated sum_s, so the identity-backward reduce stays exact
        kl = reduce_from_tp_region((e_s * (s - t)).sum(dim=-1), group) / sum_s + lse_t - lse_s
    kl = kl * temperature ** 2
    if mask is not None:
        kl = torch.where(mask.reshape(-1), kl, 0.0)
    return kl.reshape(student_logits.shape[:-1])


def distill_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], targets: torch.Tensor,
                 group=None, kd_weight: float = 1.0, temperature: float = 1.0, z_loss: float = 1e-4,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, reverse: bool = False,
                 top_p_candidates: int = DEFAULT_TOP_P_CANDIDATES) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Full student objective L = (1 - lambda) NTP + lambda KD + lambda_Z Z, mean over tokens with target != -100.

    Composed from the per-token losses above with autograd: the reference that the single-pass forms in fused_loss
    (logits_distill_loss, the trainer's default, and fused_linear_distill_loss) are tested against (same value,
    stats and gradient). stats holds detached per-term means over valid tokens: ntp, z, kd (kd only when a teacher
    is used), and tokens.
    """
    check_options(temperature, top_k, top_p, reverse)
    use_kd = kd_weight != 0.0
    if use_kd and teacher_logits is None:
        raise UserError(f"distill.kd_weight={kd_weight} needs teacher logits; pass them or set kd_weight=0")
    valid = targets != IGNORE_INDEX
    n_valid = valid.sum().clamp(min=1).float()
    with torch.set_grad_enabled(torch.is_grad_enabled() and kd_weight != 1.0):  # weight 0: a statistic only
        ntp = vocab_parallel_cross_entropy(student_logits, targets, group)
    with torch.set_grad_enabled(torch.is_grad_enabled() and z_loss != 0.0):
        z = vocab_parallel_z_loss(student_logits, group, mask=valid)
    loss = ((1.0 - kd_weight) * ntp.sum() + z_loss * z.sum()) / n_valid
    stats = {"ntp": ntp.detach().sum() / n_valid, "z": z.detach().sum() / n_valid, "tokens": valid.sum()}
    if use_kd:
        kd = vocab_parallel_kl_div(student_logits, teacher_logits, group, temperature, top_k, top_p, reverse,
                                   mask=valid, top_p_candidates=top_p_candidates)
        loss = loss + kd_weight * kd.sum() / n_valid
        stats["kd"] = kd.detach().sum() / n_valid
    return loss, stats
