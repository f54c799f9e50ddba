"""DeepSpeed engine set-up: our config -> DeepSpeed config dict, µP AdamW param groups, cosine schedule, ZeRO wrap."""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator, List, Optional

import torch

from megadistill.config import Config, grad_dtypes
from megadistill.model import mup
from megadistill.parallel.groups import ParallelGroups

log = logging.getLogger(__name__)


def effective_stage(cfg: Config, dp_size: int) -> int:
    """The ZeRO stage the engine runs (zero_stage_at below, from zero.stage, the DP size, train.precision, offload)."""
    z = cfg.zero
    offloaded = z.offload_optimizer != "none" or z.offload_param != "none"
    return zero_stage_at(z.stage, dp_size, cfg.train.precision, offloaded)


def zero_stage_at(stage: int, dp_size: int, precision: str, offloaded: bool = False) -> int:
    """ZeRO partitions over the DP group: with one DP rank (and no offload) it partitions nothing. An fp32 run then
    runs stage 0, the plain torch optimizer (ZeRO's flat-buffer copies made a CPU step 2.5x slower at stage 1). A
    bf16 run runs stage min(stage, 1): DeepSpeed's bf16 path without ZeRO is its per-parameter unfused optimizer
    (per parameter: an fp32 gradient copy, an overflow check read back to the host, the unscale and the copy back),
    ZeRO-1's is flat (one fp32 master buffer, one overflow check per step); zero.stage=0 keeps the unfused one."""
    if dp_size == 1 and not offloaded:
        return min(stage, 1) if precision == "bf16" else 0
    return stage


def grad_accum_dtype(cfg: Config) -> str:
    """The dtype gradients are accumulated over micro-batches and reduced over the DP group in (train.grad_accum_dtype
    resolved): fp32 for fp32 runs; for bf16 runs fp32 unless asked for bf16 or at zero.stage=0 (auto), where
    DeepSpeed's bf16 optimizer accumulates in bf16 only.

    Why fp32: with bf16 accumulation each micro-batch's gradient is added to a bf16 sum, one rounding (relative
    2^-9) per add: measured on a tiny model against the exact sum of the micro-batch gradients, 0.26% relative error
    at 4 micro-batches, 0.43% at 16, where fp32 accumulation and reduction leave ~3e-9 (tests/test_grad_accum.py)."""
    return _grad_dtypes(cfg)[0]


def grad_reduce_dtype(cfg: Config) -> str:
    """The dtype of the gradients' DP reductions (train.grad_reduce_dtype resolved): the accumulation dtype unless
    bf16 is asked for. bf16 with fp32 accumulation halves the bytes on the wire; each reduction rounds once (ZeRO-1:
    the fp32 sum at the boundary; ZeRO-2/3: every micro-batch's gradient), so the error does not grow with the
    number of micro-batches (measured 0.1-0.2%, tests/test_grad_accum.py)."""
    return _grad_dtypes(cfg)[1]


def _grad_dtypes(cfg: Config):
    t = cfg.train
    return grad_dtypes(t.precision, cfg.zero.stage, t.grad_accum_dtype, t.grad_reduce_dtype)


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    """The DeepSpeed config dict, generated from ours (never a hand-kept JSON)."""
    t, z = cfg.train, cfg.zero
    gas = t.global_batch_size // (t.micro_batch_size * dp_size)
    stage = effective_stage(cfg, dp_size)
    zero = {
        "stage": stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": z.bucket_size,
        "allgather_bucket_size": z.bucket_size,
    }
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=z.bucket_size, stage3_param_persistence_threshold=0)
    if z.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if z.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        # our optimizer is torch AdamW with µP groups; ZeRO wraps it (also when offloading to CPU)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16" and grad_accum_dtype(cfg) == "fp32":
        # Megatron's accumulate_allreduce_grads_in_fp32: fp32 gradient buffers (ZeRO-1: DeepSpeed's BF16_Optimizer,
        # which keeps the full fp32 gradient; ZeRO-2/3: fp32 partitions) and, unless train.grad_reduce_dtype=bf16,
        # reductions in fp32 (DeepSpeed's default, the model dtype, rounds the fp32 sum to bf16 on the way)
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = grad_reduce_dtype(cfg)
        # BF16_Optimizer: add each parameter's bf16 gradient to the fp32 one as soon as autograd has it and free it,
        # instead of keeping every bf16 gradient until the step (2 bytes per parameter); read by no other optimizer
        ds["bf16"]["immediate_grad_update"] = True
    return ds


def lr_lambda(cfg: Config, total_steps: int):
    """Multiplier of the peak LR at optimizer step s: linear warmup, then cosine to final_lr_ratio (or constant)."""
    o = cfg.optim
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return o.final_lr_ratio + (1 - o.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over µP groups; decoupled weight decay: p <- p - wd * (lr_t / lr_peak) * p, independent of the group LR."""
    o = cfg.optim
    groups: List[dict] = []
    for g in mup.param_groups(model, cfg.model):
        params = [p for p in g["params"] if p.requires_grad]
        if not params:
            continue
        lr = o.lr * g["lr_mult"]
        # torch AdamW multiplies weight_decay by the group lr; divide it out so decay tracks only the schedule
        wd = (o.weight_decay / lr) if g["decay"] else 0.0
        groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": g["name"]})
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             **adamw_implementation(params, cfg.zero.offload_optimizer))


def adamw_implementation(params, offload_optimizer: str = "none") -> dict:
    """torch AdamW's kernel choice: fused (one kernel over all tensors) when every parameter lives on a CUDA device and
    the optimizer states stay there; foreach (multi-tensor) otherwise, e.g. on CPU, where the golden curves were made.
    Fused reads and writes each parameter, gradient and moment once per step: a 975M-parameter step moves ~16 GB
    instead of foreach's several passes."""
    cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    return {"fused": True} if cuda and offload_optimizer == "none" else {"foreach": True}


def initialize(model: torch.nn.Module, cfg: Config, groups: ParallelGroups, total_steps: int):
    """Wrap the student in a DeepSpeed engine (ZeRO over the DP group via the mpu adapter). Returns (engine, scheduler)."""
    import deepspeed

    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    with _memory_printout_at_debug():
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, groups.dp_size), mpu=groups.mpu(), dist_init_required=False)
    if effective_stage(cfg, groups.dp_size) == 3:
        register_shared_weights(model)
    if cfg.train.precision == "bf16":
        log.info("ZeRO stage %d, %s; gradients accumulated over %d micro-batch(es) in %s, reduced in %s "
                 "(train.grad_accum_dtype=%s, train.grad_reduce_dtype=%s)", effective_stage(cfg, groups.dp_size),
                 type(engine.optimizer).__name__, engine.gradient_accumulation_steps(), grad_accum_dtype(cfg),
                 grad_reduce_dtype(cfg), cfg.train.grad_accum_dtype, cfg.train.grad_reduce_dtype)
    return engine, scheduler


@contextlib.contextmanager
def _memory_printout_at_debug() -> Iterator[None]:
    """DeepSpeed's BF16_Optimizer prints a memory report (`see_memory_usage(..., force=True)`: 30 lines on stdout) as
    it builds each parameter group, at every bf16 start; within this block it prints only when this module logs at
    DEBUG (`megadistill -v`)."""
    from deepspeed.runtime import bf16_optimizer

    printout = bf16_optimizer.see_memory_usage

    def at_debug(message, force=False):
        if log.isEnabledFor(logging.DEBUG):
            printout(message, force=force)

    bf16_optimizer.see_memory_usage = at_debug
    try:
        yield
    finally:
        bf16_optimizer.see_memory_usage = printout


def register_shared_weights(model: torch.nn.Module) -> int:
    """ZeRO-3 gathers a module's own parameters around its forward and backward; a ColumnsEntry computes with its
    columns' weights (one TP-region entry for Q / K / V, one for gate / up), so they are registered as its external
    parameters (gathered for it too, also inside compiled blocks, where DeepSpeed does not discover them on access),
    and so are their biases (Qwen2's Q / K / V), which it adds.
    Returns how many were registered."""
    import deepspeed

    from megadistill.parallel.layers import ColumnsEntry

    n = 0
    for m in model.modules():
        if isinstance(m, ColumnsEntry) and m.group is not None:  # dense: it calls the columns themselves
            for w in m.shared_parameters():
                deepspeed.zero.register_external_parameter(m, w)
                n += 1
    return n


def initialize_frozen(model: torch.nn.Module, cfg: Config, groups: ParallelGroups, bf16: Optional[bool] = None):
    """Partition a frozen model's weights over the DP group with ZeRO-3; no optimizer state is created. bf16: its
    weights' dtype (default: the teacher's, distill.teacher_dtype)."""
    import deepspeed

    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "train_batch_size": cfg.train.micro_batch_size * groups.dp_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": cfg.distill.teacher_dtype == "bf16" if bf16 is None else bf16},
        "steps_per_print": 10**12,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds, mpu=groups.mpu(), dist_init_required=False)
    register_shared_weights(model)
    return engine
