"""train.init_from: start the student from existing weights (a run / model dir, or a Hugging Face folder hf:PATH)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Tuple

from torch import nn

from megadistill.config import HF_SHAPE_KEYS, Config, ConfigError, ModelConfig
from megadistill.parallel.groups import ParallelGroups

log = logging.getLogger(__name__)


def init_source(ref: str) -> Tuple[ModelConfig, Path, bool]:
    """(its model config, its weights dir, whether HF names) of an init / teacher reference."""
    from megadistill.hf.config import hf_path, read_config, to_model_config
    from megadistill.train import checkpoint
    from megadistill.train.teacher import teacher_model_config

    folder = hf_path(ref)
    if folder is not None:
        return to_model_config(read_config(folder), where=f"{folder}/config.json"), folder, True
    weights = checkpoint.find_weights(ref)
    return teacher_model_config(weights).model, weights, False


def load_student_init(student: nn.Module, cfg: Config, groups: ParallelGroups) -> None:
    """Overwrite the freshly built student's weights (this rank's TP shard) with train.init_from's."""
    from megadistill.hf.weights import load_into

    ref = cfg.train.init_from
    src, weights, hf = init_source(ref)
    diff = [f"model.{k}={getattr(cfg.model, k)!r} vs {getattr(src, k)!r}" for k in HF_SHAPE_KEYS
            if getattr(cfg.model, k) != getattr(src, k)]
    if diff:
        hint = f"set model.size={ref!r} to take its shape" if hf else "set those model.* keys to the source's"
        raise ConfigError(f"train.init_from={ref!r} has another architecture than the student "
                          f"({'; '.join(diff)}): {hint}")
    load_into(student, weights, groups.tp_rank, groups.tp_size, hf_names=hf)
    log.info("student initialised from %s", ref)
