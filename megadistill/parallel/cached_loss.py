"""Top-k teacher caches on vocab-sharded logits: extracting (ids, log-probs, tail mass) and the cached KD loss."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from megadistill.errors import UserError
from megadistill.parallel.mappings import gather_from_tp_region, group_rank, group_size, reduce_from_tp_region
from megadistill.parallel.vocab_parallel import (IGNORE_INDEX, all_reduce_max, vocab_parallel_cross_entropy,
                                                 vocab_parallel_z_loss)

# Collectives (group = TP group, rank r holds vocab columns [r V/tp, (r+1) V/tp)): per-token numbers only, [n] or
# [n, k] / [n, tp k]; never a [n, V/tp] slab.


def _local_mask(ids: torch.Tensor, v_local: int, start: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(here [n, k], local column [n, k], member mask [n, v/tp]) of global ids [n, k] on the shard starting at start."""
    here = (ids >= start) & (ids < start + v_local)
    col = (ids - start).clamp(0, v_local - 1)
    member = torch.zeros(ids.shape[0], v_local, dtype=torch.int32, device=ids.device)
    member.scatter_add_(-1, col, here.to(torch.int32))  # add, not set: a clamped foreign id must not clear a column
    return here, col, member > 0


@torch.no_grad()
def top_k_logprobs(logits: torch.Tensor, k: int, group=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher top-k of vocab-sharded logits [n, V/tp]: (ids [n, k] global int64, log-probs [n, k] fp32 descending,
    log of the remaining mass [n] fp32; -inf when k == V).

    Local top-min(k, V/tp), then the k*tp candidates (values and ids, all-gather of [n, tp k']) are merged: a rank's
    share of the global top-k lies inside its local top-k'. The tail is summed where the tokens live (one all-reduce
    of [n]), not as 1 - sum(top-k), which would cancel catastrophically for a peaked teacher.
    Collectives: max [n], sum [n], all-gather [n, tp k'] x 2, sum [n].
    """
    z = logits.reshape(-1, logits.shape[-1]).float()
    n, v_local = z.shape
    vocab = v_local * group_size(group)
    if not 1 <= k <= vocab:
        raise UserError(f"--top-k {k} must lie in [1, vocab size {vocab}]")
    start = group_rank(group) * v_local
    kl = min(k, v_local)
    val, idx = z.topk(kl, dim=-1)  # [n, k'] local
    val, idx = gather_from_tp_region(val, group), gather_from_tp_region(idx + start, group)  # [n, tp k']
    top, pos = val.topk(k, dim=-1)  # [n, k] global, descending
    ids = idx.gather(-1, pos)
    m = all_reduce_max(z.amax(dim=-1), group)  # [n]
    e = torch.exp(z - m.unsqueeze(-1))
    lse = m + torch.log(reduce_from_tp_region(e.sum(dim=-1), group))
    _, _, member = _local_mask(ids, v_local, start)
    tail = m + torch.log(reduce_from_tp_region(e.masked_fill(member, 0.0).sum(dim=-1), group))  # log 0 = -inf
    return ids, top - lse.unsqueeze(-1), tail - lse


def cached_kl_div(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor,
                  group=None, top_k: Optional[int] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token KD loss against a cached top-k teacher, shape [...]; student logits [..., V/tp] (local shard), ids /
    logprobs [..., k] (global ids, teacher log-probs at tau = 1), tail [...] (log of the teacher mass off the k).

    top_k=None: KL of the (k + 1)-bucket coarse-grainings, teacher (p_1..p_k, P_tail) vs student (q_1..q_k,
    Q_tail = 1 - sum q_i): sum_i p_i log(p_i / q_i) + P_tail log(P_tail / Q_tail). It is the full KL(p_T || q_S) when
    k = V (P_tail = 0) and a lower bound of it otherwise: the tail is accounted for, not dropped.
    top_k=k' <= k: the online distill.top_k loss: the teacher truncated to its top-k' and renormalised.
    Gradient w.r.t. the student logits only. Collectives: max [n], sums [n] x 2, sum [n, k].
    """
    s = student_logits.reshape(-1, student_logits.shape[-1]).float()
    n, v_local = s.shape
    ids = ids.reshape(n, -1).long()
    lp = logprobs.reshape(n, -1).float()
    tail = tail.reshape(n).float()
    if top_k is not None:
        if top_k > lp.shape[-1]:
            raise UserError(f"distill.top_k={top_k} exceeds the cache's k={lp.shape[-1]}: write the cache with "
                            f"--top-k {top_k} or more, or lower distill.top_k")
        ids, lp = ids[:, :top_k], lp[:, :top_k]
        lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)  # renormalised truncated teacher
    start = group_rank(group) * v_local
    here, col, member = _local_mask(ids, v_local, start)
    m = all_reduce_max(s.detach().amax(dim=-1), group)
    e = torch.exp(s - m.unsqueeze(-1))  # [n, v/tp]
    sums = reduce_from_tp_region(torch.stack([e.sum(dim=-1), e.masked_fill(member, 0.0).sum(dim=-1)]), group)
    log_s_all = torch.log(sums[0])
    s_k = reduce_from_tp_region(torch.where(here, s.gather(-1, col), 0.0), group)  # [n, k] student logits at ids
    log_q = s_k - m.unsqueeze(-1) - log_s_all.unsqueeze(-1)
    p = lp.exp()
    kl = (p * (lp - log_q)).sum(dim=-1)
    if top_k is None:
        p_tail = tail.exp()
        log_q_tail = torch.log(sums[1]) - log_s_all
        kl = kl + torch.where(p_tail > 0, p_tail * (tail - log_q_tail), 0.0)
    if mask is not None:
        kl = torch.where(mask.reshape(-1), kl, 0.0)
    return kl.reshape(student_logits.shape[:-1])


def cached_distill_loss(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor,
                        targets: torch.Tensor, group=None, kd_weight: float = 1.0, z_loss: float = 1e-4,
                        top_k: Optional[int] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """L = (1 - lambda) NTP + lambda KD_cached + lambda_Z Z, mean over tokens with target != -100 (as distill_loss)."""
    valid = targets != IGNORE_INDEX
    n_valid = valid.sum().clamp(min=1).float()
    ntp = vocab_parallel_cross_entropy(student_logits, targets, group)
    z = vocab_parallel_z_loss(student_logits, group, mask=valid)
    kd = cached_kl_div(student_logits, ids, logprobs, tail, group, top_k=top_k, mask=valid)
    loss = ((1.0 - kd_weight) * ntp.sum() + kd_weight * kd.sum() + z_loss * z.sum()) / n_valid
    stats = {"ntp": ntp.detach().sum() / n_valid, "z": z.detach().sum() / n_valid, "kd": kd.detach().sum() / n_valid,
             "tokens": valid.sum()}
    return loss, stats


def check_cached_options(temperature: float, top_p: Optional[float], reverse: bool) -> None:
    if temperature != 1.0:
        raise UserError(f"distill.temperature={temperature} with a cached teacher: the cache holds tau = 1 log-probs, "
                        "whose tail cannot be re-tempered; use temperature 1 or the online teacher")
    if top_p is not None and top_p < 1.0:
        raise UserError(f"distill.top_p={top_p} with a cached teacher is not supported (the nucleus may reach past "
                        "the cached top-k); use distill.top_k or the online teacher")
    if reverse:
        raise UserError("distill.reverse=true needs the full teacher distribution; a cached top-k teacher cannot "
                        "give it: use the online teacher")

