"""The demo study's design: a synthetic language, teacher / student shapes, token budgets -> one trainer config per run."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from megadistill import config
from megadistill.config import Config


@dataclass(frozen=True)
class Arch:
    name: str
    d_model: int
    n_layers: int
    n_heads: int


@dataclass(frozen=True)
class StudySpec:
    """Everything that decides the study; FULL and QUICK below are the two shipped designs."""
    teachers: Tuple[Arch, ...]
    students: Tuple[Arch, ...]
    teacher_tokens_per_param: float  # teachers are trained at a fixed M = D / N
    student_tokens: int  # each student run trains this many tokens, evaluating along the way
    n_evals: int  # evals per student run (each is one (N, D) point: constant LR after warmup, see below)
    vocab_size: int = 256
    order: int = 1  # Markov order of the synthetic language
    branching: int = 16  # successors per context
    zipf: float = 1.1
    seq_len: int = 64
    batch: int = 64  # sequences per step (single process, no accumulation)
    warmup_steps: int = 10
    lr: float = 1e-2
    mup_base_width: int = 32  # the smallest width here: hidden LR multipliers stay <= 1
    eval_tokens: int = 16384
    seed: int = 0


FULL = StudySpec(
    teachers=(Arch("T-d32", 32, 2, 2), Arch("T-d48", 48, 2, 3), Arch("T-d64", 64, 2, 4)),
    students=(Arch("S-d16", 16, 2, 1), Arch("S-d24", 24, 2, 2)),
    teacher_tokens_per_param=20.0, student_tokens=1_572_864, n_evals=8)

QUICK = StudySpec(
    teachers=(Arch("T-d24", 24, 2, 2), Arch("T-d32", 32, 2, 2)),
    students=(Arch("S-d16", 16, 2, 1),),
    teacher_tokens_per_param=4.0, student_tokens=65_536, n_evals=8, eval_tokens=4096, batch=32)


@dataclass
class Run:
    name: str
    kind: str  # teacher | supervised | distill
    arch: Arch
    cfg: Config
    teacher: Optional[str] = None  # teacher run name (distill)
    deps: List[str] = field(default_factory=list)


def _base(spec: StudySpec, arch: Arch, run_dir: Path) -> List[str]:
    return [
        f"model.n_layers={arch.n_layers}", f"model.d_model={arch.d_model}", f"model.n_heads={arch.n_heads}",
        f"model.head_dim={arch.d_model // arch.n_heads}", "model.ff_multiple=16",
        f"model.vocab_size={spec.vocab_size}", f"model.mup_base_width={spec.mup_base_width}",
        "data.source=synthetic", f"data.synthetic_order={spec.order}", f"data.synthetic_branching={spec.branching}",
        f"data.synthetic_zipf={spec.zipf}",
        f"train.seq_len={spec.seq_len}", f"train.micro_batch_size={spec.batch}",
        f"train.global_batch_size={spec.batch}", f"train.eval_tokens={spec.eval_tokens}", f"train.seed={spec.seed}",
        f"optim.lr={spec.lr}", f"optim.warmup_steps={spec.warmup_steps}",
        # constant LR after warmup: every intermediate eval is a fair (N, D) point of the same run
        "optim.schedule=constant",
        "zero.stage=0",  # one process: ZeRO would partition nothing and only add copies
        "train.progress=false", "train.log_interval=10", "train.resume=true", f"train.run_dir={run_dir}",
    ]


def plan_runs(spec: StudySpec, out: Path) -> List[Run]:
    """Teachers first, then supervised students, then each student distilled from each teacher."""
    from megadistill.model.sizes import params_of

    runs: List[Run] = []
    tokens_per_step = spec.seq_len * spec.batch
    for a in spec.teachers:
        probe = config.load([], _base(spec, a, out / a.name) + ["train.steps=1"])
        n = params_of(probe.model)[0]
        steps = max(2 * spec.warmup_steps, round(spec.teacher_tokens_per_param * n / tokens_per_step))
        cfg = config.load([], _base(spec, a, out / a.name) + [
            "train.mode=supervised", "data.split=teacher", f"train.steps={steps}",
            f"train.eval_interval={max(1, steps // spec.n_evals)}"])
        runs.append(Run(a.name, "teacher", a, cfg))
    steps = max(spec.n_evals, round(spec.student_tokens / tokens_per_step))
    every = max(1, steps // spec.n_evals)
    for s in spec.students:
        name = f"{s.name}-supervised"
        cfg = config.load([], _base(spec, s, out / name) + [
            "train.mode=supervised", "data.split=student", f"train.steps={steps}", f"train.eval_interval={every}"])
        runs.append(Run(name, "supervised", s, cfg))
    for s in spec.students:
        for t in spec.teachers:
            name = f"{s.name}-from-{t.name}"
            cfg = config.load([], _base(spec, s, out / name) + [
                "train.mode=distill", "data.split=student", f"train.steps={steps}", f"train.eval_interval={every}",
                f"distill.teacher={out / t.name}", "distill.kd_weight=1.0", "distill.temperature=1.0"])
            runs.append(Run(name, "distill", s, cfg, teacher=t.name, deps=[t.name]))
    return runs
