"""Regional torch.compile (train.compile): each transformer Block of the student and of the frozen teacher is compiled
in place, the one place where compilation is applied (the model code stays eager and compile-agnostic).

Per block rather than whole-model: one small graph, compiled once and reused by every layer (parameters are graph
inputs, so the blocks share the compiled code), independent of the loss, the embedding and the ZeRO/DeepSpeed machinery
around the model. Compiling the Block's forward in place keeps the module and its parameter names (state dicts,
checkpoints and DeepSpeed see the same model) and leaves module hooks outside the graph; activation checkpointing
wraps the compiled block from outside (Transformer.hidden_states), and the TP collectives inside a block
(megadistill.parallel.mappings autograd Functions) are traced with it.

Under ZeRO-3 each Block is made one DeepSpeed leaf module (mark_zero3_leaves, before DeepSpeed wraps the model): its
parameters are gathered together by hooks on the Block alone, which run around the compiled forward, so no hook
breaks the block's graph. Without it DeepSpeed hooks every Linear and norm inside the block, each hook a graph break.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from megadistill.config import Config, ConfigError
from megadistill.model.graphs import with_graph_limit

log = logging.getLogger(__name__)


def enabled(cfg: Config, device: torch.device) -> bool:
    """train.compile resolved: true / false as given, auto = on for a CUDA device, off on CPU."""
    mode = str(cfg.train.compile).lower()
    if mode == "auto":
        return torch.device(device).type == "cuda"
    if mode in ("true", "false"):
        return mode == "true"
    raise ConfigError(f"train.compile={cfg.train.compile!r} is not one of ['true', 'false', 'auto']")


def _blocks(model: nn.Module) -> list:
    from megadistill.model.transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def prepare(cfg: Config, device: torch.device, model: nn.Module) -> int:
    """Before DeepSpeed wraps `model`: when train.compile will compile its blocks, make each one a ZeRO-3 leaf
    (mark_zero3_leaves), so ZeRO-3 gathers it whole, around its graph. Returns how many blocks were flagged."""
    return mark_zero3_leaves(model) if enabled(cfg, device) else 0


def mark_zero3_leaves(model: nn.Module) -> int:
    """Flag every transformer Block of `model` as a DeepSpeed ZeRO-3 leaf module; returns how many.

    Call it before DeepSpeed partitions the model (it reads the flag when it registers its hooks) and only when the
    blocks will be compiled: ZeRO-3 then gathers a block's parameters at once, in one coalesced all-gather on the
    Block's pre-forward (and pre-backward) hook, and releases them after it, instead of one Linear / norm at a time;
    so a block's gathered parameters are the unit of ZeRO-3's working memory (megadistill.train.memory counts it).
    The flag (DeepSpeed's `_z3_leaf` attribute) means nothing to ZeRO stages 0-2."""
    blocks = _blocks(model)
    for block in blocks:
        block._z3_leaf = True  # deepspeed.utils.set_z3_leaf_module, without importing DeepSpeed here
    return len(blocks)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every transformer Block's forward in place; returns how many were compiled.

    The forward is compiled, not Module.__call__: module hooks (ZeRO-3's gather / release on a leaf Block) run eager
    around the graph. Parameter names, state dicts and checkpoints are untouched (`forward` becomes an instance
    attribute, not a submodule or parameter).

    Static shapes (dynamic=False): dynamo keeps the graphs of every Block -- student and teacher, training and
    no-grad -- under one code object (Block.forward), and by default a second shape seen there recompiles with the
    differing sizes symbolic. A distillation step runs the teacher's blocks first (its forward is prefetched), so the
    student's training graph would be the dynamic one: symbolic widths in every fused kernel of the step being timed.
    Each shape gets its own static graph instead: a run has a few per kind of block (student training and eval,
    teacher forward), up to megadistill.model.graphs.GRAPH_LIMIT in all (dynamo's own limit, 8, would leave a
    distillation with sliding and full blocks eager from its ninth variant on)."""
    blocks = _blocks(model)
    for block in blocks:
        block.forward = with_graph_limit(torch.compile(block.forward, backend=backend, dynamic=False))
    return len(blocks)


def _zero3_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())  # DeepSpeed ZeRO-3 tags the params it partitions


def _hooks_inside_blocks(model: nn.Module) -> bool:
    """ZeRO-3 partitioned with per-submodule hooks inside its Blocks (they were not leaves when DeepSpeed hooked it)."""
    return _zero3_partitioned(model) and not all(getattr(b, "_z3_leaf", False) for b in _blocks(model))


def apply(cfg: Config, device: torch.device, student: nn.Module, teacher: Optional[nn.Module] = None) -> int:
    """Compile the student's and the teacher's blocks when train.compile says so; returns how many were compiled.

    A ZeRO-3-partitioned model (student at zero stage 3, or the teacher with distill.teacher_zero3) is compiled
    whole-block when its Blocks were flagged by prepare before DeepSpeed hooked it (the trainer does).
    Otherwise DeepSpeed hooks every submodule inside the blocks, hooks torch.compile may not trace: each one is a
    graph break, so the blocks fall apart into many small graphs. train.compile=auto leaves such a model eager;
    true compiles it anyway (correct, same loss curve: tested) and says so.
    """
    if not enabled(cfg, device):
        return 0
    auto = str(cfg.train.compile).lower() == "auto"
    n = 0
    for name, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue
        if _hooks_inside_blocks(model):
            if auto:
                log.info("compile: %s left eager (ZeRO-3 partitioned: its hooks break the block graphs); "
                         "train.compile=true compiles it anyway", name)
                continue
            log.warning("compile: %s is ZeRO-3 partitioned; DeepSpeed's parameter hooks split each block into "
                        "several graphs (correct, but less fused)", name)
        n += compile_blocks(model, cfg.train.compile_backend)
    log.info("compile: %d transformer blocks compiled (backend %s)", n, cfg.train.compile_backend)
    if n and cfg.model.attention == "flex" and cfg.train.compile_backend != "inductor":
        log.warning("compile: model.attention=flex inside blocks compiled by %s runs torch's unfused FlexAttention "
                    "reference ([b, h, s, s] scores per block); train.compile_backend=inductor fuses it",
                    cfg.train.compile_backend)
    if n and cfg.model.kernels == "liger":  # megadistill.model.kernels: Liger ops run eager, outside the graphs
        log.info("compile: model.kernels=liger: each Liger op (RMSNorm, SwiGLU, RoPE) is a graph break in the "
                 "compiled blocks (Inductor fuses these ops itself; model.kernels=torch gives whole-block graphs)")
    return n
