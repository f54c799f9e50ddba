"""Work on an existing run dir outside training: evaluate a checkpoint (appending a record), export consolidated weights."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

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
from megadistill.parallel.init import DistInfo, init_distributed
from megadistill.train import checkpoint, engine as engine_mod
from megadistill.train.consolidate import STUDENT, checkpoint_weights, student_part, tp_shard, zero3_partition
from megadistill.train.evaluate import eval_record, evaluate
from megadistill.train.teacher import materialize

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


class _Plan(NamedTuple):
    """Where a launch reads a run's checkpoint from."""
    cfg: Config  # the run's config with this launch's overrides (parallel.tp_size: the TP size it builds at)
    written: Config  # the run's config as it trained
    info: DistInfo  # this process's
    ckpt: Path
    state: Dict  # rank 0's trainer state in the checkpoint (step, tokens)
    as_written: bool  # this launch has the layout that wrote the checkpoint: each rank reads its own shards
    zero3: bool  # ... under ZeRO-3 (each rank's own partitions, into a frozen ZeRO-3 engine)
    weights: Optional[Path]  # the run's consolidated weights of that step (model/, written when it finished), or None


def _checkpoint_of(run_dir: Path, step: Optional[int]) -> Path:
    """The verified checkpoint dir of step `step` (None: the one `latest` names). Every rank calls it."""
    if step is None:
        ckpt = checkpoint.resume_point(run_dir, "true", clean=False)  # a live run's partial write untouched
        if ckpt is None:
            raise UserError(f"{run_dir} has no checkpoint (checkpoints/latest is missing)")
        return ckpt
    root = run_dir / "checkpoints"
    ckpt = root / f"step_{step:08d}"
    kept = checkpoint.complete_checkpoints(root)
    if ckpt not in kept:
        raise UserError(f"{run_dir} has no checkpoint of step {step}; it keeps steps "
                        f"{[int(p.name[5:]) for p in kept]} (train.checkpoint_interval sets how often a run writes "
                        "one, train.keep_checkpoints how many of the newest it keeps)")
    problem = checkpoint.verify(ckpt)
    if problem:
        raise checkpoint.CheckpointError(problem)
    return ckpt


def _plan(run_dir: Path, overrides: List[str], verb: str, step: Optional[int] = None) -> _Plan:
    """Where this launch reads checkpoint `step` (None: the latest) from. Each rank reads its own shards as written
    where this launch has the layout that wrote them: the same TP size, and for a ZeRO-3 run the same number of
    processes (its parameters are partitioned over them). Elsewhere the run's full weights are split over this
    launch's TP size -- the run's where it divides the world size, else 1 (or parallel.tp_size=N) -- read from its
    consolidated model/ of that step (written when the run finished) or, for a run that has not finished,
    consolidated from the checkpoint's shards (train/consolidate.py)."""
    written_cfg = run_config(run_dir)
    cfg = run_config(run_dir, overrides)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    ckpt = _checkpoint_of(run_dir, step)
    state_file = ckpt / "trainer_state_rank00000.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    world, w_world, w_tp = info.world_size, checkpoint.written_world_size(ckpt), written_cfg.parallel.tp_size
    w_zero3 = engine_mod.effective_stage(written_cfg, max(w_world // w_tp, 1)) == 3
    if world % cfg.parallel.tp_size and cfg.parallel.tp_size == w_tp:
        cfg.parallel.tp_size = 1  # the run's TP size does not fit this launch: its full weights at TP=1
    tp = cfg.parallel.tp_size
    fits = world % tp == 0
    zero3 = fits and engine_mod.effective_stage(cfg, world // tp) == 3
    as_written = fits and tp == w_tp and zero3 == w_zero3 and (not zero3 or world == w_world)
    weights = _consolidated_of(run_dir, int(state.get("step", -1)))
    if not as_written and info.rank == 0:
        log.info("%s: %s was written by %d processes at TP=%d; %s %s at TP=%d on %d process(es)", run_dir, ckpt.name,
                 w_world, w_tp, "reading the run's consolidated weights" if weights else "consolidating its shards for",
                 verb, tp, world)
    return _Plan(cfg, written_cfg, info, ckpt, state, as_written, zero3 and as_written, weights)


SCRATCH = ".{tag}.consolidated.{pid}"  # an eval's consolidated weights, in the run dir while it reads them


def _consolidate_for_launch(run_dir: Path, plan: _Plan) -> Path:
    """Rank 0 consolidates the checkpoint's shards into a hidden dir of the run (shared by all nodes, like the run
    dir); every rank gets its path. The caller removes it (_remove_scratch)."""
    path = error = None
    if plan.info.rank == 0:
        stale = sorted(p.name for p in run_dir.glob(SCRATCH.format(tag="step_*", pid="*")))
        if stale:
            log.warning("%s holds %s: consolidated weights of an eval still running, or of one killed before it "
                        "removed them (remove those)", run_dir, ", ".join(stale))
        path = run_dir / SCRATCH.format(tag=plan.ckpt.name, pid=os.getpid())
        try:
            checkpoint.write_weights(checkpoint_weights(plan.ckpt, plan.written), path,
                                     config_mod.to_yaml(plan.written))
        except UserError as e:  # every rank raises it (the others would wait for the path until they time out)
            shutil.rmtree(path, ignore_errors=True)
            error = str(e)
    path, error = checkpoint.gather_objects((str(path), error))[0]
    if error:
        raise checkpoint.CheckpointError(error)
    return Path(path)


def _remove_scratch(path: Path, rank: int) -> None:
    if dist.is_initialized():
        dist.barrier()  # every rank has read it
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def _student(run_dir: Path, plan: _Plan):
    """The run's checkpoint as a student on this launch, read as `plan` says: (cfg, dist info, groups, engine,
    student, trainer state of rank 0). The student is allocated in the run's precision and holds its weights only,
    no optimizer state (a bf16 training engine's on one GPU would add 8-12 bytes per parameter): this rank's TP
    shard as written or split from the full weights (engine None), or for a ZeRO-3 checkpoint read as written its
    own partitions, in a frozen ZeRO-3 engine that partitions it as it trained."""
    cfg, info = plan.cfg, plan.info
    cfg.validate(info.world_size)
    groups = ParallelGroups.build(cfg.parallel.tp_size)
    sp = cfg.parallel.sequence_parallel
    bf16 = cfg.train.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32  # as a bf16 engine casts it
    # built on the meta device, allocated in the run's precision, filled by the load
    student = materialize(Transformer(cfg.model, groups.factory(device="meta", dtype=dtype, sequence_parallel=sp)),
                          info.device).requires_grad_(False)
    if plan.zero3:  # partitioned over the DP group as it trained, each rank's partitions from its own files
        eng = engine_mod.initialize_frozen(student, cfg, groups, bf16=bf16)
        own = zero3_partition(plan.ckpt, groups.dp_rank, groups.tp_rank)
        with torch.no_grad():
            for name, p in student.named_parameters():
                p.ds_tensor.copy_(own[STUDENT + name])
        return cfg, info, groups, eng, student, plan.state
    if plan.as_written:  # this rank's TP shard as DeepSpeed wrote it (ZeRO 0-2: whole in the module states)
        student.load_state_dict(student_part(tp_shard(plan.ckpt, groups.tp_rank)))
    elif plan.weights is None and info.world_size == 1:  # consolidated in memory: no scratch copy on disk
        student.load_state_dict(checkpoint_weights(plan.ckpt, plan.written))
    else:
        weights = plan.weights or _consolidate_for_launch(run_dir, plan)
        try:
            checkpoint.load_sharded_weights(student, weights, groups)
        finally:
            if plan.weights is None:
                _remove_scratch(weights, info.rank)
    return cfg, info, groups, None, student, plan.state


def evaluate_run(run_dir: str, overrides: List[str] = (), eval_tokens: Optional[int] = None,
                 step: Optional[int] = None) -> Dict:
    """Evaluate the run's checkpoint of step `step` (None: its latest) on its held-out split (data.* overrides
    allowed); append a record. Any number of processes (see _plan)."""
    run_dir = Path(run_dir)
    cfg, info, groups, eng, student, state = _student(run_dir, _plan(run_dir, list(overrides), "eval", step))
    t = cfg.train
    batches = build_eval_batches(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=t.seq_len,
                                 n_tokens=eval_tokens or t.eval_tokens, batch_size=t.micro_batch_size)
    ev = evaluate(student, batches, groups, cfg, eng.device if eng is not None else info.device)
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


def export_run(run_dir: str, out_dir: str, step: Optional[int] = None) -> Path:
    """Consolidate the weights of the run's checkpoint of step `step` (None: its latest; any TP / ZeRO layout) to
    out_dir as safetensors + config.yaml + meta.json, on any number of processes (see _plan)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    plan = _plan(run_dir, [], "export", step)
    cfg, state = plan.cfg, plan.state
    meta = {"run": cfg.train.run_name or run_dir.name, "tokens": int(state.get("tokens", 0)),
            "step": int(state.get("step", 0)), "params": params_of(cfg.model)[0]}
    recs = records.read_records(run_dir / "eval.jsonl")[0] if (run_dir / "eval.jsonl").is_file() else []
    # these weights' loss on the run's own held-out data: an earlier eval, or one with data.* overrides, is not it
    data = config_mod.to_dict(plan.written)["data"]
    at_step = [r for r in recs if r.get("step") == meta["step"] and r.get("config", {}).get("data") == data]
    if at_step:
        meta["eval_loss"] = at_step[-1]["eval_loss"]
    if plan.info.rank == 0:  # no engine: the step's consolidated model/ copied, or the checkpoint consolidated now
        if plan.weights is not None:
            checkpoint.copy_weights(plan.weights, out_dir, config_mod.to_yaml(plan.written))
        else:
            checkpoint.write_weights(checkpoint_weights(plan.ckpt, plan.written), out_dir,
                                     config_mod.to_yaml(plan.written))
        checkpoint.atomic_write_text(out_dir / "meta.json", json.dumps(meta) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return out_dir
