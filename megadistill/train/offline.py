"""Work on an existing run dir outside training: evaluate a checkpoint (appending a record), export consolidated weights."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from megadistill import config as config_mod
from megadistill.config import Config
from megadistill.data import build_eval_batches
from megadistill.errors import UserError
from megadistill.laws import records
from megadistill.model.sizes import params_of
from megadistill.model.transformer import Transformer
from megadistill.parallel.groups import ParallelGroups
from megadistill.parallel.init import init_distributed
from megadistill.train import checkpoint, engine as engine_mod
from megadistill.train.evaluate import eval_record, evaluate
from megadistill.train.objective import Objective
from megadistill.train.trainer import export_weights, total_steps

log = logging.getLogger(__name__)


def run_config(run_dir: Path, overrides: List[str] = ()) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a megadistill run dir (no config.yaml)")
    base = OmegaConf.to_container(OmegaConf.load(path))
    cfg = config_mod.from_dict(base)
    if overrides:
        cfg = config_mod.from_dict(OmegaConf.to_container(OmegaConf.merge(
            OmegaConf.create(config_mod.to_dict(cfg)), OmegaConf.from_dotlist(list(overrides)))))
    return cfg


def _engine_from_checkpoint(cfg: Config, groups: ParallelGroups, device, run_dir: Path):
    """A student engine with the latest checkpoint's weights (optimizer states not loaded)."""
    ckpt = checkpoint.resume_point(run_dir, "true", clean=False)  # verified; a live run's partial write untouched
    if ckpt is None:
        raise UserError(f"{run_dir} has no checkpoint (checkpoints/latest is missing)")
    torch.manual_seed(cfg.train.seed)
    student = Transformer(cfg.model, groups.factory(device=device, sequence_parallel=cfg.parallel.sequence_parallel))
    eng, _ = engine_mod.initialize(Objective(student, cfg, groups.tp_group), cfg, groups, total_steps(cfg))
    checkpoint.load_engine(eng, ckpt, load_optimizer_states=False, load_lr_scheduler_states=False,
                           load_module_only=True)
    state_file = ckpt / "trainer_state_rank00000.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    return eng, student, state


def evaluate_run(run_dir: str, overrides: List[str] = (), eval_tokens: Optional[int] = None) -> Dict:
    """Evaluate the run's latest checkpoint on its held-out split (data.* overrides allowed); append a record."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    cfg.validate(info.world_size)
    groups = ParallelGroups.build(cfg.parallel.tp_size)
    eng, student, state = _engine_from_checkpoint(cfg, groups, info.device, run_dir)
    t = cfg.train
    batches = build_eval_batches(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=t.seq_len,
                                 n_tokens=eval_tokens or t.eval_tokens, batch_size=t.micro_batch_size)
    ev = evaluate(student, batches, groups, cfg, eng.device)
    if info.rank == 0:
        # a distill run keeps its teacher: the block and the teacher-forward FLOPs per token of its own last record
        prior = records.read_records(run_dir / "eval.jsonl")[0] if (run_dir / "eval.jsonl").is_file() else []
        last = prior[-1] if prior else {}
        teacher = last.get("teacher") if cfg.train.mode == "distill" else None
        f_teacher = last.get("flops_teacher_inference", 0.0) / last["tokens"] if teacher and last.get("tokens") else 0.0
        rec = eval_record(cfg, t.run_name or run_dir.name, int(state.get("step", 0)), int(state.get("tokens", 0)), ev,
                          teacher, f_teacher)
        rec["source"] = "megadistill eval"
        records.append_record(run_dir, rec)
    if dist.is_initialized():
        dist.barrier()
    return ev


def export_run(run_dir: str, out_dir: str) -> Path:
    """Consolidate the latest checkpoint's weights (any TP / ZeRO layout) to out_dir as safetensors + config.yaml."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    cfg.validate(info.world_size)
    groups = ParallelGroups.build(cfg.parallel.tp_size)
    eng, _, state = _engine_from_checkpoint(cfg, groups, info.device, run_dir)
    meta = {"run": cfg.train.run_name or run_dir.name, "tokens": int(state.get("tokens", 0)),
            "step": int(state.get("step", 0)), "params": params_of(cfg.model)[0]}
    last = records.read_records(run_dir / "eval.jsonl")[0] if (run_dir / "eval.jsonl").is_file() else []
    if last:
        meta["eval_loss"] = last[-1]["eval_loss"]
    export_weights(eng, cfg, groups, Path(out_dir), meta)
    return Path(out_dir)
