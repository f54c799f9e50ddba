"""Regional torch.compile (train.compile): each transformer Block of the student and of the frozen teacher is compiled
in place, the one place where compilation is applied (the model code stays eager and compile-agnostic).

Per block rather than whole-model: one small graph, compiled once and reused by every layer (parameters are graph
inputs, so the blocks share the compiled code), independent of the loss, the embedding and the ZeRO/DeepSpeed machinery
around the model. Module.compile keeps the module and its parameter names (state dicts, checkpoints and DeepSpeed see
the same model); activation checkpointing wraps the compiled block from outside (Transformer.hidden_states), and the
TP collectives inside a block (megadistill.parallel.mappings autograd Functions) are traced with it.
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


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every transformer Block of `model` in place (Module.compile); returns how many were compiled.

    Static shapes (dynamic=False): dynamo keeps the graphs of every Block -- student and teacher, training and
    no-grad -- under one code object (Block.forward), and by default a second shape seen there recompiles with the
    differing sizes symbolic. A distillation step runs the teacher's blocks first (its forward is prefetched), so the
    student's training graph would be the dynamic one: symbolic widths in every fused kernel of the step being timed.
    Each shape gets its own static graph instead: a run has a few per kind of block (student training and eval,
    teacher forward), up to megadistill.model.graphs.GRAPH_LIMIT in all (dynamo's own limit, 8, would leave a
    distillation with sliding and full blocks eager from its ninth variant on)."""
    from megadistill.model.transformer import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
        block._compiled_call_impl = with_graph_limit(block._compiled_call_impl)  # what Module.__call__ runs
    return len(blocks)


def _zero3_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())  # DeepSpeed ZeRO-3 tags the params it partitions


def apply(cfg: Config, device: torch.device, student: nn.Module, teacher: Optional[nn.Module] = None) -> int:
    """Compile the student's and the teacher's blocks when train.compile says so; returns how many were compiled.

    A ZeRO-3-partitioned model (student at zero stage 3, or the teacher with distill.teacher_zero3) carries DeepSpeed
    hooks on every submodule that torch.compile may not trace (torch.compiler.disable): each one is a graph break,
    so its blocks fall apart into many small graphs. train.compile=auto leaves such a model eager; true compiles it
    anyway (correct, same loss curve: tested) and says so.
    """
    if not enabled(cfg, device):
        return 0
    auto = str(cfg.train.compile).lower() == "auto"
    n = 0
    for name, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue
        if _zero3_partitioned(model):
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
