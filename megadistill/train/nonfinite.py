"""Non-finite loss or gradient (train.nonfinite=stop|skip): never a silent NaN run.

A step whose gradients are not all finite is not applied: DeepSpeed's ZeRO optimizers (stages 1-3) and its bf16 / fp16
wrapper without ZeRO drop it themselves (their overflow check); where DeepSpeed steps our torch optimizer directly
(fp32, effective stage 0) a pre-step hook on it drops it (every rank agrees through one all-reduce). The trainer then
stops with an error naming the step, the micro-batch and the last good checkpoint, or (skip) counts it and goes on, up
to train.nonfinite_max_skips in a row.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from megadistill.errors import UserError

log = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """Training produced a non-finite loss or gradient and train.nonfinite=stop (or too many skips in a row)."""


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _PreStepHook:
    """Before the torch optimizer steps: if any gradient on any rank is not finite, drop them all (grad = None: AdamW
    leaves each parameter and its moments untouched). Only installed without ZeRO, where every rank steps once."""

    def __init__(self):
        self.tripped = False

    def __call__(self, optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        bad = torch.zeros(1, device=_comm_device())
        if grads:
            norms = torch._foreach_norm(grads)  # one fused pass; inf or NaN anywhere makes that norm non-finite
            bad += (~torch.stack([n.float() for n in norms]).isfinite()).any().float().to(bad.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            self.tripped = True
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None


class NonFiniteGuard:
    """Per run: installed on the engine by the trainer, asked after every step (all ranks reach the same answer)."""

    def __init__(self, engine, mode: str, max_skips: int, zero_stage: int):
        self.engine, self.mode, self.max_skips = engine, mode, max_skips
        self.skipped = 0  # skipped steps in this process
        self.in_a_row = 0
        self.hook = None
        # the hook only where DeepSpeed steps our torch optimizer itself: its bf16 / fp16 wrappers (stage 0 in half
        # precision) check overflow and skip the step themselves, reported by engine.was_step_applied()
        if zero_stage == 0 and engine.optimizer is engine.basic_optimizer:
            self.hook = _PreStepHook()
            engine.basic_optimizer.register_step_pre_hook(self.hook)

    def after_step(self, step: int, micro_losses: List[float], loss: float, grad_norm: Optional[float],
                   run_dir: Path) -> bool:
        """True if this step was not applied (skip mode); raises NonFiniteError in stop mode. micro_losses: this rank's
        per-micro-batch losses; loss, grad_norm: the step's global values (same on every rank)."""
        dropped = self.hook.tripped if self.hook is not None else not self.engine.was_step_applied()
        if self.hook is not None:
            self.hook.tripped = False
        if not dropped and math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            self.in_a_row = 0
            return False
        if not dropped:  # a non-finite loss whose gradients were finite (cannot happen through autograd; be safe)
            raise NonFiniteError(self._message(step, micro_losses, loss, grad_norm, run_dir, applied=True))
        self.skipped += 1
        self.in_a_row += 1
        if self.mode == "skip" and (not self.max_skips or self.in_a_row <= self.max_skips):
            if not dist.is_initialized() or dist.get_rank() == 0:
                log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s): step skipped, no update "
                            "(%d skipped so far; train.nonfinite=skip)", step, loss, grad_norm, self.skipped)
            return True
        raise NonFiniteError(self._message(step, micro_losses, loss, grad_norm, run_dir, applied=False))

    def _message(self, step, micro_losses, loss, grad_norm, run_dir, applied: bool) -> str:
        rank = dist.get_rank() if dist.is_initialized() else 0
        gas = len(micro_losses)
        first = next((i for i, v in enumerate(micro_losses) if not math.isfinite(v)), gas)
        # the first non-finite micro-batch over all ranks (every rank raises the same message)
        t = torch.tensor([first * 1_000_000 + rank], dtype=torch.float64, device=_comm_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        first, where = divmod(int(t.item()), 1_000_000)
        micro = (f"micro-batch {first + 1} of {gas} (rank {where})" if first < gas else
                 f"the gradients (the losses of all {gas} micro-batches were finite)")
        pointer = Path(run_dir) / "checkpoints" / "latest"
        good = (f"{pointer.parent / pointer.read_text().strip()}" if pointer.is_file() else
                "none (no checkpoint was written yet)")
        why = ("" if self.mode == "stop" else
               f" after {self.in_a_row} skipped steps in a row (train.nonfinite_max_skips={self.max_skips})")
        state = ("the update was applied: the weights in memory are not trustworthy" if applied else
                 "the step was not applied")
        return (f"non-finite training at step {step}{why}: loss={loss}, grad_norm={grad_norm}, first in {micro}; "
                f"{state}. Last good checkpoint: {good}. Resume from it with train.resume=true after lowering "
                "optim.lr (or raising optim.warmup_steps), or set train.nonfinite=skip to skip such steps (counted "
                "in train.jsonl as skipped_steps)")
