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


def _consolidated_of(run_dir: Path, step: int) -> Optional[Path]:
    """The run's consolidated weights (model/, written when it finished) if they are step `step`'s, else None."""
    model_dir = run_dir / checkpoint.MODEL_DIR
    meta_file = model_dir / "meta.json"
    if not (model_dir / checkpoint.WEIGHTS).is_file() or not meta_file.is_file():
        return None
    return model_dir if json.loads(meta_file.read_text()).get("step") == step else None


def _latest_student(run_dir: Path, overrides: List[str], verb: str):
    """The run's latest checkpoint as a student engine on this launch (any world size): (cfg, dist info, groups,
    engine, student, trainer state of rank 0); optimizer states are not loaded.

    The checkpoint's DeepSpeed shards load as written where this launch has the layout that wrote them: the same TP
    size, and for a ZeRO-3 run the same number of processes (its parameters are partitioned over them). Elsewhere the
    run's consolidated weights of that step (model/, written when the run finished) are split over this launch's TP
    size: the run's where it divides the world size, else 1 (or parallel.tp_size=N). Neither: a UserError naming the
    number of processes to launch."""
    written_cfg = run_config(run_dir)
    cfg = run_config(run_dir, overrides)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    ckpt = checkpoint.resume_point(run_dir, "true", clean=False)  # verified; a live run's partial write untouched
    if ckpt is None:
        raise UserError(f"{run_dir} has no checkpoint (checkpoints/latest is missing)")
    state_file = ckpt / "trainer_state_rank00000.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    world, w_world, w_tp = info.world_size, checkpoint.written_world_size(ckpt), written_cfg.parallel.tp_size
    w_zero3 = engine_mod.effective_stage(written_cfg, max(w_world // w_tp, 1)) == 3
    consolidated = _consolidated_of(run_dir, int(state.get("step", -1)))
    if world % cfg.parallel.tp_size and consolidated is not None and cfg.parallel.tp_size == w_tp:
        cfg.parallel.tp_size = 1  # the run's TP size does not fit this launch: its consolidated weights at TP=1
    tp = cfg.parallel.tp_size
    fits = world % tp == 0
    zero3 = fits and engine_mod.effective_stage(cfg, world // tp) == 3
    as_written = fits and tp == w_tp and zero3 == w_zero3 and (not zero3 or world == w_world)
    if not as_written and consolidated is None:
        need = w_world if w_zero3 else w_tp
        raise UserError(
            f"{run_dir}: its latest checkpoint ({ckpt.name}) was written by {w_world} processes at parallel.tp_size="
            f"{w_tp}{' under ZeRO-3 (its parameters partitioned over them)' if w_zero3 else ''}, which this "
            f"{world}-process {verb} at parallel.tp_size={tp} cannot load, and the run has no consolidated weights of "
            f"that step (model/ is written when a run finishes). Launch it on {need} processes: python -m "
            f"torch.distributed.run --nproc-per-node {need} -m megadistill.cli {verb} {run_dir} ...")
    cfg.validate(world)
    groups = ParallelGroups.build(tp)
    torch.manual_seed(cfg.train.seed)
    student = Transformer(cfg.model, groups.factory(device=info.device,
                                                    sequence_parallel=cfg.parallel.sequence_parallel))
    if not as_written:
        if info.rank == 0:
            log.info("%s: %s was written by %d processes at TP=%d; reading the run's consolidated weights (%s) at "
                     "TP=%d on %d", run_dir, ckpt.name, w_world, w_tp, consolidated, tp, world)
        checkpoint.load_sharded_weights(student, consolidated, groups)
    eng, _ = engine_mod.initialize(Objective(student, cfg, groups.tp_group), cfg, groups, total_steps(cfg))
    if as_written:
        checkpoint.load_engine(eng, ckpt, load_optimizer_states=False, load_lr_scheduler_states=False,
                               load_module_only=True)
    return cfg, info, groups, eng, student, state


def evaluate_run(run_dir: str, overrides: List[str] = (), eval_tokens: Optional[int] = None) -> Dict:
    """Evaluate the run's latest checkpoint on its held-out split (data.* overrides allowed); append a record.
    Any number of processes (see _latest_student)."""
    run_dir = Path(run_dir)
    cfg, info, groups, eng, student, state = _latest_student(run_dir, list(overrides), "eval")
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
    """Consolidate the latest checkpoint's weights (any TP / ZeRO layout) to out_dir as safetensors + config.yaml,
    on any number of processes (see _latest_student)."""
    run_dir = Path(run_dir)
    cfg, _, groups, eng, _, state = _latest_student(run_dir, [], "export")
    meta = {"run": cfg.train.run_name or run_dir.name, "tokens": int(state.get("tokens", 0)),
            "step": int(state.get("step", 0)), "params": params_of(cfg.model)[0]}
    last = records.read_records(run_dir / "eval.jsonl")[0] if (run_dir / "eval.jsonl").is_file() else []
    if last:
        meta["eval_loss"] = last[-1]["eval_loss"]
    export_weights(eng, cfg, groups, Path(out_dir), meta)
    return Path(out_dir)
