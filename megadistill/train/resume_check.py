"""A resumed run must compute what the checkpointed run computed: keys that change the maths may not differ."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from megadistill import config as config_mod
from megadistill.config import Config, ConfigError

log = logging.getLogger(__name__)

# Keys that may differ on resume: where and how often the run reports, checkpoints and stops, which kernels and
# launcher it uses, and layouts of frozen or recomputed state. Everything else (model shape, data, seed, optimizer,
# schedule length, precision, loss, parallel layout of the trained state) changes the result or cannot be loaded.
MAY_CHANGE = frozenset({
    "model.size",  # a label: the shape keys it fills are compared
    "model.attention", "model.kernels", "model.activation_checkpointing", "model.checkpoint_every_k",
    "parallel.backend", "parallel.timeout_s",
    "zero.overlap_comm", "zero.bucket_size",
    "distill.fused", "distill.chunk_tokens", "distill.teacher_zero3",  # same loss, other evaluation order / layout
    "distill.loss_kernel",  # same loss, compiled or eager kernel
    "distill.allow_data_overlap",
    "data.streaming",
    "train.run_dir", "train.run_name", "train.resume", "train.init_from",  # init_from: the checkpoint's weights win
    "train.log_interval", "train.eval_interval", "train.eval_tokens", "train.checkpoint_interval",
    "train.keep_checkpoints", "train.save", "train.tensorboard", "train.progress", "train.stop_after_steps",
    "train.compile", "train.compile_backend", "train.nonfinite", "train.nonfinite_max_skips",
    "train.tf32",  # fp32 matmul kernels (TF32 or IEEE) on CUDA, like the compile / loss-kernel choices
})


def _flat(d: Dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: Config, cfg: Config) -> List[Tuple[str, object, object]]:
    """(key, checkpoint's value, this run's value) for every math-changing key that differs. train.grad_accum_dtype
    and train.grad_reduce_dtype are compared as resolved (auto is fp32 or bf16, megadistill.train.engine)."""
    from megadistill.train.engine import grad_accum_dtype, grad_reduce_dtype
    a, b = _flat(config_mod.to_dict(saved)), _flat(config_mod.to_dict(cfg))
    for key, resolve in (("train.grad_accum_dtype", grad_accum_dtype), ("train.grad_reduce_dtype", grad_reduce_dtype)):
        a[key], b[key] = resolve(saved), resolve(cfg)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in MAY_CHANGE and a.get(k) != b.get(k)]


def _saved_config(ckpt: Path, run_dir: Path) -> Optional[Config]:
    """The config the checkpoint was written under (its own copy; an older checkpoint: the run dir's, not yet
    replaced by this run's when this is called)."""
    from megadistill.train.checkpoint import CONFIG
    for path in (Path(ckpt) / CONFIG, Path(run_dir) / CONFIG):
        if path.is_file():
            try:
                return _read_saved(path)
            except Exception as e:  # a config of an older version: unknown or retyped keys
                log.warning("cannot compare this run's config with %s (%s): resuming unchecked", path, e)
                return None
    log.warning("%s has no %s: resuming without checking the config", ckpt, CONFIG)
    return None


def _read_saved(path: Path) -> Config:
    """A config.yaml megadistill wrote, as it computed (raises on one it cannot read)."""
    raw = OmegaConf.to_container(OmegaConf.load(path))
    saved = config_mod.from_dict(raw)
    saved.train.resume = str(saved.train.resume).lower()
    if "grad_accum_dtype" not in (raw.get("train") or {}) and saved.train.precision == "bf16":
        saved.train.grad_accum_dtype = "bf16"  # written before the key: bf16 runs accumulated in bf16
    return saved


def check_resumed_config(cfg: Config, ckpt: Optional[Path], run_dir: Path) -> None:
    """Raise a ConfigError listing the math-changing keys in which cfg differs from checkpoint `ckpt`'s run (no-op
    when there is nothing to resume)."""
    if ckpt is None:
        return
    saved = _saved_config(ckpt, run_dir)
    if saved is None:
        return
    diffs = config_differences(saved, cfg)
    if diffs:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in diffs)
        raise ConfigError(f"train.resume: this config differs from the one {ckpt} was written with in "
                          f"{len(diffs)} key(s) that change what is computed: {listed}. Resume with the checkpoint's "
                          f"values (its config is {Path(ckpt) / 'config.yaml'}), or start a new run in another "
                          "train.run_dir")


def warn_if_finished_differently(cfg: Config, run_dir: Path) -> None:
    """A finished run is skipped, not retrained (sweep reruns are no-ops): warn, naming the keys, when this config
    would compute something else than what the run dir holds (an edited sweep, a raised train.steps)."""
    from megadistill.train.checkpoint import CONFIG
    try:
        diffs = config_differences(_read_saved(Path(run_dir) / CONFIG), cfg)
    except Exception as e:  # missing, or written by an older version: nothing to compare, the skip stands
        log.debug("%s: config not compared (%s)", run_dir, e)
        return
    if diffs:
        listed = "; ".join(f"{k}: trained with {a!r}, now {b!r}" for k, a, b in diffs)
        log.warning("%s is finished, so it is skipped, not retrained, but this config differs from the one it was "
                    "trained with in %d key(s) that change what is computed: %s. To train this config, choose another "
                    "train.run_dir", run_dir, len(diffs), listed)
