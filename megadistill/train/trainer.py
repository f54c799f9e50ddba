"""The training loop (supervised | distill): DeepSpeed engine, co-resident teacher, evals, checkpoints, resume."""
from __future__ import annotations

import base64
import contextlib
import gc
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from megadistill import config as config_mod
from megadistill.config import Config
from megadistill.data import build_eval_batches, build_train_loader
from megadistill.errors import UserError
from megadistill.laws import records
from megadistill.model.attention import check_backend
from megadistill.model.sizes import params_of
from megadistill.model.transformer import Transformer
from megadistill.parallel.groups import ParallelGroups
from megadistill.parallel.init import init_distributed
from megadistill.train import checkpoint, engine as engine_mod, teacher_cache
from megadistill.train.evaluate import eval_record, evaluate
from megadistill.train.metrics import MetricsLog, forward_flops, peak_flops
from megadistill.train import compile as compile_mod
from megadistill.train.objective import Objective, teacher_outputs
from megadistill.train.init_weights import load_student_init
from megadistill.train.nonfinite import NonFiniteGuard
from megadistill.train.resume_check import check_resumed_config, warn_if_finished_differently
from megadistill.train.teacher import Teacher, load_teacher, teacher_source
from megadistill.train.teacher_checks import check_teacher
from megadistill.train.teacher_prefetch import TeacherFeed

log = logging.getLogger(__name__)

DONE = "DONE"  # marker file in a finished run dir


@dataclass
class RunResult:
    run_dir: Path
    status: str  # finished | preempted | stopped | skipped
    step: int
    tokens: int
    eval: Optional[Dict]


class _StopFlag:
    """Set by SIGUSR1 / SIGTERM (SLURM's warning before the time limit, or preemption); checked at step boundaries."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be installed, training still works
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("signal %d received: checkpointing at the next step boundary", signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def total_steps(cfg: Config) -> int:
    t = cfg.train
    if t.steps:
        return t.steps
    tokens_per_step = t.global_batch_size * t.seq_len
    tokens = t.tokens or int(t.tokens_per_param * params_of(cfg.model)[0])
    return max(1, round(tokens / tokens_per_step))


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng_state(s: str) -> None:
    import numpy as np
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy()))


def _any(flag: bool, device) -> bool:
    """True on every rank if it is True on any rank (so all ranks stop at the same step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _dp_mean(values: Dict[str, float], groups: ParallelGroups, device) -> Dict[str, float]:
    """Average logged scalars over the DP group, so train.jsonl shows the global-batch loss whatever the layout."""
    if groups.dp_size == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=groups.dp_group)
    return {k: v / groups.dp_size for k, v in zip(keys, t.tolist())}


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / DONE).is_file()


@dataclass
class Live:
    """A built run: everything one training step needs, on this rank."""

    cfg: Config
    info: object  # parallel.init.DistInfo
    groups: ParallelGroups
    student: Transformer
    objective: Objective
    engine: object  # the DeepSpeed engine around `objective`
    scheduler: object
    teacher: Optional[Teacher]
    loader: object
    device: torch.device
    nonfinite: Optional[NonFiniteGuard] = None  # drops / reports steps with a non-finite loss or gradient
    micro_losses: list = field(default_factory=list)  # this rank's loss of each micro-batch of the last step
    feed: Optional[TeacherFeed] = None  # micro-batches on the device with their teacher outputs (prefetched)


def build(cfg: Config, info) -> Live:
    """Model, engine, teacher and data loader of cfg on this rank (every rank calls it; no resume, no run dir)."""
    t = cfg.train
    cached = t.mode == "distill" and teacher_cache.is_cache(cfg.distill.teacher)
    # a co-resident teacher's vocab / tokenizer / layout errors come first, before any compute
    check_teacher(cfg)  # exists, finished (else a warning), never trained on the student's documents
    source = teacher_source(cfg) if t.mode == "distill" and not cached else None
    # a prefetched live teacher gets TP collectives of its own (teacher_prefetch.py: they overlap the student's)
    groups = ParallelGroups.build(cfg.parallel.tp_size,
                                  teacher_tp_group=source is not None and cfg.distill.teacher_prefetch)
    cache_teacher = teacher_cache.open_cache(cfg, groups) if cached else None  # checked before any compute
    torch.manual_seed(t.seed)  # identical on every rank: TP shards are slices of one full initialisation
    student = Transformer(cfg.model, groups.factory(device=info.device,
                                                    sequence_parallel=cfg.parallel.sequence_parallel))
    if t.init_from:
        load_student_init(student, cfg, groups)
    objective = Objective(student, cfg, groups.tp_group)
    compile_mod.prepare(cfg, info.device, student)  # before ZeRO-3 hooks it: compiled blocks are gathered whole
    eng, scheduler = engine_mod.initialize(objective, cfg, groups, total_steps(cfg))
    teacher: Optional[Teacher] = (cache_teacher if cached else
                                  load_teacher(cfg, groups, eng.device, source) if source else None)
    if teacher is not None and cfg.distill.fused and engine_mod.effective_stage(cfg, groups.dp_size) == 3:
        import deepspeed
        deepspeed.zero.register_external_parameter(objective, student.output_weight)
    compile_mod.apply(cfg, eng.device, student, teacher.module if teacher is not None else None)
    loader = build_train_loader(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=t.seq_len,
                                micro_batch_size=t.micro_batch_size, dp_rank=groups.dp_rank,
                                dp_size=groups.dp_size, seed=t.seed)
    if cached:
        loader = teacher_cache.CachedTeacherLoader(loader, cache_teacher.cache)
    guard = NonFiniteGuard(eng, t.nonfinite, t.nonfinite_max_skips, engine_mod.effective_stage(cfg, groups.dp_size))
    feed = TeacherFeed(loader, cfg, eng.device, teacher, prefetch=teacher is not None and cfg.distill.teacher_prefetch)
    return Live(cfg, info, groups, student, objective, eng, scheduler, teacher, loader, eng.device, guard, feed=feed)


def train_step(live: Live, prefetch_next_step: bool = True) -> Dict[str, float]:
    """One optimizer step (gradient-accumulation micro-batches included); the loss terms averaged over the global
    batch (DP mean), identical on every rank.

    No host sync inside the micro-batch loop: each micro-batch's loss and terms stay device tensors, read back in one
    transfer after the last one. With distill.teacher_prefetch the teacher output of micro-batch i+1 is issued right
    after the student forward of micro-batch i, before its backward; after the last micro-batch that is the next
    step's first one (prefetch_next_step=False, on a run's last step, leaves it)."""
    cfg, eng, teacher, feed = live.cfg, live.engine, live.teacher, live.feed
    gas = eng.gradient_accumulation_steps()
    losses, terms = [], []
    for i in range(gas):
        mb = feed.next()
        mb.wait()  # the student's stream waits for the copies and the teacher forward (side stream) here only
        ctx = contextlib.nullcontext()
        if teacher is not None and teacher.engine is not None and cfg.distill.fused:
            import deepspeed
            ctx = deepspeed.zero.GatheredParameters([teacher.module.output_weight])
        with ctx:  # gathers the ZeRO-3 teacher head in place: extra["teacher_weight"] is that parameter
            loss, stats = eng(mb.ids, mb.labels, mb.doc_ids, **mb.extra)
        del mb  # the teacher logits were consumed by the loss (scratch)
        if feed.prefetch and (i + 1 < gas or prefetch_next_step):
            feed.issue()  # teacher(i + 1) depends on neither this backward nor the optimizer step
        eng.backward(loss)
        eng.step()
        losses.append(loss.detach())
        terms.append({k: v for k, v in stats.items() if k != "tokens"})  # tokens: a count, not a mean
    # one device -> host transfer for the step: [gas, 1 + n_terms] in fp64 (exact for fp32 / bf16 values)
    keys = list(terms[0])
    rows = torch.stack([torch.stack([l.to(torch.float64)] + [torch.as_tensor(st[k], device=l.device)
                                                             .to(torch.float64) for k in keys])
                        for l, st in zip(losses, terms)]).tolist()
    live.micro_losses = [r[0] for r in rows]
    sums: Dict[str, float] = {}
    for r in rows:  # the same float64 sums, in the same order, as one loss.item() per micro-batch gave
        sums["loss"] = sums.get("loss", 0.0) + r[0] / gas
        for k, v in zip(keys, r[1:]):
            sums[k] = sums.get(k, 0.0) + v / gas
    return _dp_mean(sums, live.groups, live.device)


def release(live: Live) -> None:
    """Free a built run's engines (DeepSpeed disables Python's cyclic GC while an engine lives; destroy() hands it
    back), so the model, optimizer and device memory are freed before the next run of this process."""
    if live.teacher is not None and live.teacher.engine is not None:
        live.teacher.engine.destroy()
        _forget_zero3_module(live.teacher.module)
    if live.feed is not None:
        live.feed.close()
    live.engine.destroy()
    _forget_zero3_module(live.objective)
    live.engine = live.objective = live.student = live.teacher = live.scheduler = live.loader = live.nonfinite = None
    live.feed = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _forget_zero3_module(module: torch.nn.Module) -> None:
    """Drop what DeepSpeed's ZeRO-3 keeps of a destroyed engine in module-level state (DeepSpeed 0.19):

    - the engine's root module in deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK (appended when the hooks
      are installed, never removed, not even by destroy());
    - an unbounded functools.lru_cache on PartitionedParameterCoordinator.__params_to_release, keyed on the
      coordinator and the modules.
    Either keeps the engine, its optimizer and every partition alive for the life of the process (through the
    modules' hooks). Clearing the cache only costs other live engines a recomputation.
    """
    try:
        from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator
    except ImportError:
        return
    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack[:] = [m for m in stack if m is not module]
    coordinator = getattr(partitioned_param_coordinator, "PartitionedParameterCoordinator", None)
    fn = vars(coordinator).get("_PartitionedParameterCoordinator__params_to_release") if coordinator else None
    for _ in range(4):  # through decorators (instrument_w_nvtx keeps the lru wrapper in its closure)
        if fn is None or hasattr(fn, "cache_clear"):
            break
        inner = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if callable(c.cell_contents)]
        fn = inner[0] if inner else getattr(fn, "__wrapped__", None)
    if fn is not None and hasattr(fn, "cache_clear"):
        fn.cache_clear()


def train(cfg: Config, progress: Optional[Callable[[int, int], None]] = None,
          inspect: Optional[Callable[[Dict], None]] = None) -> RunResult:
    """Run (or resume) one training run described by cfg; every rank of the job calls it.

    progress(step, total) is called on rank 0 after each step (the demo's study-wide bar uses it).
    inspect({"engine", "student", "teacher", "groups"}) is called on every rank before teardown (tests, tooling).
    """
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    cfg.validate(info.world_size)
    t = cfg.train
    dtypes = {"train.precision": t.precision}
    if t.mode == "distill" and not str(cfg.distill.teacher).startswith("cache:"):  # a live teacher runs it too
        dtypes["distill.teacher_dtype"] = cfg.distill.teacher_dtype
    check_backend(cfg.model.attention, info.device.type, dtypes)
    if info.device.type == "cuda":  # process-wide: this run's fp32 matmuls (student and teacher), TF32 or IEEE
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(t.tf32)
    run_dir = Path(t.run_dir)
    run_name = t.run_name or run_dir.name
    if is_finished(run_dir):
        if info.rank == 0:
            log.info("%s is finished (%s exists): skipping", run_dir, DONE)
            warn_if_finished_differently(cfg, run_dir)
        return RunResult(run_dir, "skipped", 0, 0, None)
    if (run_dir / "checkpoints" / "latest").exists() and t.resume == "false":
        raise UserError(f"{run_dir} already holds checkpoints; pass train.resume=true to continue it, "
                        "or choose another train.run_dir")
    # verified (partial writes removed), and its config checked against this one, before config.yaml is replaced
    resume_from = checkpoint.resume_point(run_dir, t.resume) if t.resume != "false" else None
    check_resumed_config(cfg, resume_from, run_dir)
    if resume_from is not None:
        checkpoint.check_world_size(resume_from, info.world_size)
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(run_dir / "config.yaml", config_mod.to_yaml(cfg))
    live = build(cfg, info)
    groups, eng, scheduler, teacher, loader, device = (live.groups, live.engine, live.scheduler, live.teacher,
                                                       live.loader, live.device)
    student = live.student
    steps_total = total_steps(cfg)
    eval_batches = build_eval_batches(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=t.seq_len,
                                      n_tokens=t.eval_tokens, batch_size=t.micro_batch_size)
    n_params, n_total = params_of(cfg.model)
    f_student = forward_flops(cfg.model, t.seq_len)
    # a cached teacher's forward was paid once by the cache, for every student sharing it (teacher block: cache_flops)
    f_teacher = forward_flops(teacher.model_cfg, t.seq_len) if teacher and teacher.module is not None else 0.0
    tokens_per_step = t.global_batch_size * t.seq_len
    step, tokens, teacher_eval_loss = 0, 0, None
    if isinstance(teacher, teacher_cache.CachedTeacher):
        teacher_eval_loss = teacher.eval_loss  # measured on this eval split by the cache writer

    state = checkpoint.load(eng, resume_from) if resume_from is not None else None
    if state is not None:
        step, tokens = state["step"], state["tokens"]
        teacher_eval_loss = state.get("teacher_eval_loss")
        live.nonfinite.skipped = state.get("skipped_steps", 0)
        live.feed.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        if info.rank == 0:
            log.info("resumed %s at step %d (%d tokens)", run_dir, step, tokens)

    metrics = MetricsLog(run_dir, enabled=info.rank == 0, tensorboard=t.tensorboard)
    peak = peak_flops(t.precision, t.tf32)
    bar = None
    if info.rank == 0 and t.progress and progress is None:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps_total, initial=step, desc=run_name, unit="step", dynamic_ncols=True)

    def rank_state() -> Dict:
        return {"step": step, "tokens": tokens, "loader": live.feed.state_dict(), "rng": _rng_state(),
                "teacher_eval_loss": teacher_eval_loss, "run": run_name, "skipped_steps": live.nonfinite.skipped}

    def run_eval() -> Dict:
        nonlocal teacher_eval_loss
        tm = teacher.module if teacher else None
        ev = evaluate(student, eval_batches, groups, cfg, device, teacher=tm,
                      with_teacher_loss=teacher is not None and teacher_eval_loss is None)
        teacher_eval_loss = ev.pop("teacher_eval_loss", teacher_eval_loss)
        if info.rank == 0:
            teacher_info = None
            if teacher is not None:
                teacher_info = {"run": teacher.run, "params": teacher.params, "tokens": teacher.tokens,
                                "eval_loss": teacher_eval_loss, "own_eval_loss": teacher.eval_loss}
                if isinstance(teacher, teacher_cache.CachedTeacher):
                    teacher_info.update(teacher.record_block())
            rec = eval_record(cfg, run_name, step, tokens, ev, teacher_info, f_teacher)
            records.append_record(run_dir, rec)
        return ev

    status, last_eval, last_ckpt_step = "finished", None, step
    steps_this_process = 0
    eng.train()
    with _StopFlag() as stop:
        while step < steps_total:
            t0 = time.perf_counter()
            sums = train_step(live, prefetch_next_step=step + 1 < steps_total)  # none past the run's last step
            step += 1
            steps_this_process += 1
            tokens += tokens_per_step
            gn = eng.get_global_grad_norm()
            gn = None if gn is None else float(gn)
            live.nonfinite.after_step(step, live.micro_losses, sums["loss"], gn, run_dir)  # stop mode: raises
            dt = time.perf_counter() - t0
            if info.rank == 0 and (step % t.log_interval == 0 or step == steps_total):
                tok_s = tokens_per_step / dt
                model_flops = (3 * f_student + f_teacher) * tok_s
                metrics.write({"step": step, "tokens": tokens, **sums, "lr": scheduler.get_last_lr()[0],
                               "grad_norm": gn, "tokens_per_s": tok_s, "step_time_s": dt,
                               "mfu": model_flops / (peak * info.world_size) if peak else None,
                               **({"skipped_steps": live.nonfinite.skipped} if live.nonfinite.skipped else {})})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss']:.3f}")
            if progress is not None and info.rank == 0:
                progress(step, steps_total)
            if t.eval_interval and step % t.eval_interval == 0 and step < steps_total:
                last_eval = run_eval()
            stop_now = _any(stop.requested or (t.stop_after_steps and steps_this_process >= t.stop_after_steps),
                            device)
            want_ckpt = (t.checkpoint_interval and step % t.checkpoint_interval == 0) or (stop_now and step < steps_total)
            if t.save and want_ckpt:
                checkpoint.save(eng, run_dir, step, rank_state(), t.keep_checkpoints)
                last_ckpt_step = step
            if stop_now and step < steps_total:
                status = "preempted" if stop.requested else "stopped"
                break
    if bar is not None:
        bar.close()
    if status == "finished":
        last_eval = run_eval()
    if status == "finished" and t.save:
        if last_ckpt_step != step:
            checkpoint.save(eng, run_dir, step, rank_state(), t.keep_checkpoints)
        export_weights(eng, cfg, groups, run_dir / checkpoint.MODEL_DIR,
                       meta={"run": run_name, "tokens": tokens, "params": n_params, "step": step,
                             "eval_loss": last_eval["eval_loss"]})
    if status == "finished":
        if info.rank == 0:
            checkpoint.atomic_write_text(run_dir / DONE, json.dumps({"step": step, "tokens": tokens}) + "\n")
    metrics.close()
    if inspect is not None:
        inspect({"engine": eng, "student": student, "teacher": teacher, "groups": groups})
    if dist.is_initialized():
        dist.barrier()
    result = RunResult(run_dir, status, step, tokens, last_eval)
    eng = scheduler = student = teacher = loader = None  # drop this frame's references before release collects
    release(live)
    return result


def export_weights(eng, cfg: Config, groups: ParallelGroups, out_dir: Path, meta: Dict) -> None:
    """Consolidate the student's weights (gathering TP shards and ZeRO-3 partitions) into out_dir on rank 0."""
    zero3 = engine_mod.effective_stage(cfg, groups.dp_size) == 3
    state = checkpoint.consolidated_state(eng.module.student, groups, zero3=zero3)
    if not dist.is_initialized() or dist.get_rank() == 0:
        checkpoint.write_weights(state, out_dir, config_mod.to_yaml(cfg))
        checkpoint.atomic_write_text(out_dir / "meta.json", json.dumps(meta) + "\n")
    if dist.is_initialized():
        dist.barrier()
