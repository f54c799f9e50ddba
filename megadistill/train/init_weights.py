"""train.init_from: start the student from existing weights (a run / model dir, or a Hugging Face folder hf:PATH)."""
from __future__ import annotations

import logging

from torch import nn

from megadistill.config import HF_SHAPE_KEYS, Config, ConfigError
from megadistill.hf.weights import load_into
from megadistill.parallel.groups import ParallelGroups
from megadistill.train.teacher import weights_source

log = logging.getLogger(__name__)


def load_student_init(student: nn.Module, cfg: Config, groups: ParallelGroups) -> None:
    """Overwrite the freshly built student's weights (this rank's TP shard) with train.init_from's."""
    ref = cfg.train.init_from
    src, weights, hf, _ = weights_source(ref)
    diff = [f"model.{k}={getattr(cfg.model, k)!r} vs {getattr(src, k)!r}" for k in HF_SHAPE_KEYS
            if getattr(cfg.model, k) != getattr(src, k)]
    if diff:
        hint = f"set model.size={ref!r} to take its shape" if hf else "set those model.* keys to the source's"
        raise ConfigError(f"train.init_from={ref!r} has another architecture than the student "
                          f"({'; '.join(diff)}): {hint}")
    load_into(student, weights, groups.tp_rank, groups.tp_size, hf_names=hf)
    log.info("student initialised from %s", ref)
