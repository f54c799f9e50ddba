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
    mixture-of-experts student adds moe_aux_loss x its routers' load-balancing loss.
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
        self.moe, self.aux_weight = bool(cfg.model.moe_experts), float(cfg.train.moe_aux_loss)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: Optional[torch.Tensor] = None,
                teacher_logits: Optional[torch.Tensor] = None, teacher_hidden: Optional[torch.Tensor] = None,
                teacher_weight: Optional[torch.Tensor] = None, teacher_ids: Optional[torch.Tensor] = None,
                teacher_logprobs: Optional[torch.Tensor] = None, teacher_tail: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return self._balanced(*self._loss(input_ids, labels, doc_ids, teacher_logits, teacher_hidden, teacher_weight,
                                          teacher_ids, teacher_logprobs, teacher_tail))

    def _balanced(self, loss: torch.Tensor, stats: Dict[str, torch.Tensor]):
        """+ train.moe_aux_loss x the mixture's load-balancing loss (a mixture-of-experts student; stat moe_aux,
        logged at weight 0 too): add_balance_loss."""
        aux = self.student.moe_aux_loss() if self.moe else None  # read (and released) even at weight 0: logged
        if aux is None:
            return loss, stats
        stats = dict(stats, moe_aux=aux.detach())
        return add_balance_loss(loss, aux, self.aux_weight, group_size(self.tp_group)), stats

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


def add_balance_loss(loss: torch.Tensor, aux: torch.Tensor, weight: float, tp_size: int) -> torch.Tensor:
    """loss + weight x aux (a mixture's load-balancing loss, whole on every TP rank) in value; its gradient flows
    through weight x aux / tp_size, since the router's and its input's gradients are summed over the TP ranks."""
    if not weight:
        return loss
    term = weight * aux
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
