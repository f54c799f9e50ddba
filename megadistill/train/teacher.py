"""The co-resident frozen teacher: same TP layout as the student, loaded from a finished run, no grads, no optimizer."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from megadistill import config as config_mod
from megadistill.config import Config, ModelConfig
from megadistill.errors import UserError
from megadistill.model.sizes import params_of
from megadistill.model.transformer import Transformer
from megadistill.parallel.groups import ParallelGroups
from megadistill.parallel.layers import LayerFactory
from megadistill.train import checkpoint

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    module: nn.Module  # the frozen model (ZeRO-3 hooks installed on it when partitioned); call it like the model
    engine: Optional[object]  # the ZeRO-3 inference engine holding the partitions, or None when replicated
    model_cfg: ModelConfig
    run: str  # the teacher run's name
    params: int  # non-embedding N
    tokens: int  # tokens the teacher was trained on
    eval_loss: Optional[float]  # the teacher's own last recorded eval loss (None if unknown)
    weights_dir: Path


def teacher_model_config(weights_dir: Path) -> Config:
    return config_mod.from_dict(OmegaConf.to_container(OmegaConf.load(weights_dir / "config.yaml")))


def _materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """Allocate a meta-device model's parameters (uninitialised) on `device`, keeping their TP / µP tags.

    The teacher is built on the meta device, so its random initialisation (full fp32 draws on every rank, minutes for
    a 12.6B model on a CPU, 50 GB of host memory per rank) never happens: every weight is overwritten by the load.
    """
    if any(True for _ in model.buffers()):
        raise RuntimeError("the model has buffers, which the weight files do not hold: they would stay uninitialised")
    tags = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model = model.to_empty(device=device)  # new Parameter objects: their attributes must be put back
    for name, p in model.named_parameters():
        p.__dict__.update(tags[name])
    return model


def load_teacher(cfg: Config, groups: ParallelGroups, device: torch.device) -> Teacher:
    """Build the teacher with the student's TP layout, load its consolidated weights, freeze it."""
    weights_dir = checkpoint.find_weights(cfg.distill.teacher)
    tcfg = teacher_model_config(weights_dir)
    tm = tcfg.model
    if tm.vocab_size != cfg.model.vocab_size:
        raise UserError(f"teacher vocab_size={tm.vocab_size} (from {weights_dir}/config.yaml) != "
                        f"model.vocab_size={cfg.model.vocab_size}: teacher and student must share the tokenizer")
    if tm.n_heads % groups.tp_size or tm.d_ff % groups.tp_size:
        raise UserError(f"parallel.tp_size={groups.tp_size} does not divide the teacher's n_heads={tm.n_heads} "
                        f"or d_ff={tm.d_ff}")
    tm.attention = cfg.model.attention  # the backend is a property of this run's hardware, not of the weights
    tm.activation_checkpointing = "off"  # no backward through the teacher
    dtype = torch.bfloat16 if cfg.distill.teacher_dtype == "bf16" else torch.float32
    model = _materialize(Transformer(tm, LayerFactory(groups.tp_group, device="meta", dtype=dtype)), device)
    checkpoint.load_sharded_weights(model, weights_dir, groups)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    meta_file = weights_dir / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    n, _ = params_of(tm)
    engine = None
    if cfg.distill.teacher_zero3 and groups.dp_size > 1:
        from megadistill.train.engine import initialize_frozen
        engine = initialize_frozen(model, cfg, groups)
        engine.eval()
    log.info("teacher %s loaded from %s (N=%.3g, zero3=%s)", meta.get("run", weights_dir.name), weights_dir, n,
             cfg.distill.teacher_zero3)
    return Teacher(module=model, engine=engine, model_cfg=tm, run=meta.get("run", weights_dir.parent.name), params=n,
                   tokens=int(meta.get("tokens", 0)), eval_loss=meta.get("eval_loss"), weights_dir=weights_dir)
