"""Held-out evaluation: cross-entropy (and teacher loss / teacher-student KL) over a fixed eval set, DP-sharded."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from megadistill import config as config_mod
from megadistill.config import Config
from megadistill.data.packing import pad_batch
from megadistill.laws import records
from megadistill.model.sizes import params_of
from megadistill.train.metrics import forward_flops
from megadistill.parallel.groups import ParallelGroups
from megadistill.parallel.fused_loss import logits_distill_loss
from megadistill.parallel.loss_kernel import chunk_tokens_for


@torch.no_grad()
def evaluate(student: nn.Module, batches: List[Dict[str, torch.Tensor]], groups: ParallelGroups, cfg: Config,
             device: torch.device, teacher: Optional[nn.Module] = None, with_teacher_loss: bool = False) -> Dict:
    """Token-weighted mean losses over the eval set; batch i is evaluated by DP rank i % dp_size, then summed.

    Returns {"eval_loss", "eval_tokens"} plus, with a teacher, "teacher_student_kl" (forward KL at tau=1, nats/token)
    and, when with_teacher_loss, "teacher_eval_loss".
    """
    was_training = student.training
    student.eval()
    # [ce, tokens, kl, teacher ce], summed on the compute device in fp64 (what Python floats did on the host) and read
    # back once at the end: no host sync per eval batch
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    # Every DP rank runs the same number of forwards: under ZeRO-3 each forward all-gathers parameters across the DP
    # group, so a rank with one batch fewer would leave the others waiting. Padding forwards reuse batch 0, uncounted.
    # A partial batch (the last one, when eval_tokens is not a multiple of micro-batch x seq_len) is filled up to
    # batch 0's rows with ignored labels: one input shape for the whole eval, so a compiled model compiles no graph
    # for it (past torch._dynamo's recompile limit it would run eager).
    rows = batches[0]["input_ids"].shape[0] if batches else 0
    per_rank = -(-len(batches) // groups.dp_size)
    kernel = cfg.distill.loss_kernel
    chunk = chunk_tokens_for(cfg.distill.chunk_tokens, kernel, device)
    for j in range(per_rank):
        i = j * groups.dp_size + groups.dp_rank
        counted = i < len(batches)
        batch = pad_batch(batches[i] if counted else batches[0], rows)
        ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        doc_ids = batch["doc_ids"] if cfg.data.document_mask else None  # on the host: attention.build_mask
        logits = student(ids, doc_ids)  # [b, s, v/tp]
        t_logits = None
        if teacher is not None:
            with torch.inference_mode():  # the frozen teacher: no autograd bookkeeping at all
                t_logits = teacher(ids, doc_ids)
        # the single-pass loss (no gradient): per chunk of tokens, never several fp32 [tokens, V/tp] temporaries,
        # so an eval fits wherever the training step does. Means over valid tokens, turned back into sums.
        if t_logits is not None and with_teacher_loss:  # first: the call below overwrites t_logits
            _, st = logits_distill_loss(t_logits, None, labels, groups.tp_group, kd_weight=0.0, z_loss=0.0,
                                        chunk_tokens=chunk, inplace=False, loss_kernel=kernel)
            sums[3] += st["ntp"].double() * (st["tokens"].double() * counted)
        _, st = logits_distill_loss(logits, t_logits, labels, groups.tp_group, kd_weight=0.0 if t_logits is None
                                    else 1.0, z_loss=0.0, chunk_tokens=chunk, inplace=True,
                                    loss_kernel=kernel)
        n = st["tokens"].double() * counted
        sums[0] += st["ntp"].double() * n
        sums[1] += n
        if t_logits is not None:
            sums[2] += st["kd"].double() * n  # forward KL at tau = 1, no truncation
        del logits, t_logits
    if groups.dp_size > 1:  # on the compute device: an NCCL group cannot reduce a CPU tensor
        dist.all_reduce(sums, group=groups.dp_group)
    sums = sums.cpu()
    student.train(was_training)
    n = max(sums[1].item(), 1.0)
    out = {"eval_loss": sums[0].item() / n, "eval_tokens": int(sums[1].item())}
    if teacher is not None:
        out["teacher_student_kl"] = sums[2].item() / n
        if with_teacher_loss:
            out["teacher_eval_loss"] = sums[3].item() / n
    return out


def eval_record(cfg: Config, run: str, step: int, tokens: int, ev: Dict, teacher: Optional[Dict] = None,
                teacher_forward_flops: float = 0.0) -> Dict:
    """A schema-v1 eval record of `ev` (from evaluate); flops are this run's compute, the teacher's forward included."""
    n, n_total = params_of(cfg.model)
    f_student = forward_flops(cfg.model, cfg.train.seq_len)
    rec = records.make_record(
        run=run, mode=cfg.train.mode, step=step, tokens=tokens, params=n, params_total=n_total,
        flops=(3.0 * f_student + teacher_forward_flops) * tokens, eval_loss=ev["eval_loss"],
        eval_tokens=ev["eval_tokens"], split="student_val", teacher=teacher, config=config_mod.to_dict(cfg),
        time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    rec["flops_teacher_inference"] = teacher_forward_flops * tokens
    if "teacher_student_kl" in ev:
        rec["teacher_student_kl"] = ev["teacher_student_kl"]
    return rec
