"""The training objective as a module: student forward + vocab-parallel NTP / KD / z-loss (unfused or chunked fused)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from megadistill.config import Config
from megadistill.parallel.cached_loss import cached_distill_loss
from megadistill.parallel.mappings import copy_to_tp_region, group_size
from megadistill.parallel.fused_loss import fused_linear_distill_loss, logits_distill_loss
from megadistill.parallel.loss_kernel import chunk_tokens_for


class Objective(nn.Module):
    """Wraps the student so DeepSpeed sees one module whose forward returns the scalar loss and detached term means.

    L = (1 - kd_weight) NTP + kd_weight KD + z_loss Z  (distill);  L = NTP + z_loss Z  (supervised); a
    mixture-of-experts student adds moe_aux_loss x its routers' load-balancing loss + moe_router_z_loss x their
    z-loss.
    Each term is a mean over valid (label != -100) tokens of this rank's micro-batch; DeepSpeed averages over DP ranks
    and accumulation steps, which equals the global token mean because packed micro-batches have equal token counts.
    """

    def __init__(self, student: nn.Module, cfg: Config, tp_group=None):
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.tp_group = tp_group
        self.distill = cfg.train.mode == "distill"
        self.fused = cfg.distill.fused
        self.router_weights = (float(cfg.train.moe_aux_loss), float(cfg.train.moe_router_z_loss))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: Optional[torch.Tensor] = None,
                teacher_logits: Optional[torch.Tensor] = None, teacher_hidden: Optional[torch.Tensor] = None,
                teacher_weight: Optional[torch.Tensor] = None, teacher_ids: Optional[torch.Tensor] = None,
                teacher_logprobs: Optional[torch.Tensor] = None, teacher_tail: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return self._routed(*self._loss(input_ids, labels, doc_ids, teacher_logits, teacher_hidden, teacher_weight,
                                        teacher_ids, teacher_logprobs, teacher_tail))

    def _routed(self, loss: torch.Tensor, stats: Dict[str, torch.Tensor]):
        """+ train.moe_aux_loss x the mixture's load-balancing loss + train.moe_router_z_loss x its router z-loss (a
        mixture-of-experts student; stats moe_aux and moe_z, logged at weight 0 too): add_router_losses."""
        losses = self.student.moe_router_losses()  # read (and released) even at weight 0; None: dense
        if losses is None:
            return loss, stats
        stats = dict(stats, moe_aux=losses[0].detach(), moe_z=losses[1].detach())
        return add_router_losses(loss, losses, self.router_weights, group_size(self.tp_group)), stats

    def _loss(self, input_ids, labels, doc_ids, teacher_logits, teacher_hidden, teacher_weight, teacher_ids,
              teacher_logprobs, teacher_tail) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        d, z_w = self.cfg.distill, self.cfg.train.z_loss
        kd_w = d.kd_weight if self.distill else 0.0
        if teacher_ids is not None:  # a cached top-k teacher (distill.teacher=cache:DIR); autograd over the logits
            return cached_distill_loss(self.student(input_ids, doc_ids), teacher_ids, teacher_logprobs, teacher_tail,
                                       labels, group=self.tp_group, kd_weight=kd_w, z_loss=z_w, top_k=d.top_k)
        chunk = chunk_tokens_for(d.chunk_tokens, d.loss_kernel, input_ids.device)
        if self.fused:
            h = self.student.hidden_states(input_ids, doc_ids)  # [b, s, d]
            h = copy_to_tp_region(h, self.tp_group)  # the head is column-parallel over the vocab
            th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
            loss, stats = fused_linear_distill_loss(
                h.reshape(-1, h.shape[-1]), self.student.output_weight, th, teacher_weight, labels.reshape(-1),
                group=self.tp_group, kd_weight=kd_w, temperature=d.temperature, z_loss=z_w, top_k=d.top_k,
                top_p=d.top_p, reverse=d.reverse, chunk_tokens=chunk, loss_kernel=d.loss_kernel)
            return loss, stats
        logits = self.student(input_ids, doc_ids)  # [b, s, v/tp]
        # one sweep forms the loss and d loss / d logits, written over the logits (and the teacher's as scratch):
        # neither is used after this call
        return logits_distill_loss(logits, teacher_logits, labels, group=self.tp_group, kd_weight=kd_w,
                                   temperature=d.temperature, z_loss=z_w, top_k=d.top_k, top_p=d.top_p,
                                   reverse=d.reverse, chunk_tokens=chunk, inplace=True, loss_kernel=d.loss_kernel)


def add_router_losses(loss: torch.Tensor, losses: torch.Tensor, weights: Tuple[float, float],
                      tp_size: int) -> torch.Tensor:
    """loss + weights . losses (a mixture's router losses, [2]: load balance and z-loss, whole on every TP rank) in
    value; the gradient flows through that term / tp_size, since the router's and its input's gradients are summed
    over the TP ranks."""
    if not any(weights):
        return loss
    term = sum(w * v for w, v in zip(weights, losses) if w)
    share = term / tp_size
    return loss + share + (term - share).detach()


def teacher_outputs(teacher: nn.Module, cfg: Config, input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor]):
    """Teacher forward for one micro-batch: kwargs for Objective.forward (logits, or hidden + head weight when fused).

    The forward runs under torch.inference_mode (no autograd graph, no version counters), in the teacher's own dtype:
    its outputs are inference tensors, read by the losses (which never save them for backward nor overwrite them in
    place outside inference mode). The head weight is the teacher's parameter itself (ZeRO-3 gathers it in place)."""
    if cfg.distill.fused:
        with torch.inference_mode():
            hidden = teacher.hidden_states(input_ids, doc_ids)
        return {"teacher_hidden": hidden, "teacher_weight": teacher.output_weight}
    with torch.inference_mode():
        return {"teacher_logits": teacher(input_ids, doc_ids)}
