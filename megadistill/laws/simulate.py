"""Synthetic loss tables drawn from known laws (PAPER.md Table 6 by default), for fit recovery tests and benchmarks."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from megadistill.laws.flops import training_flops
from megadistill.laws.forms import PAPER_DISTILLATION, PAPER_SUPERVISED, distillation_loss, supervised_loss

# N (non-embedding, incl. norms) of the paper's Table 13 sizes from 143M to 12.6B.
PAPER_SIZES = {"143M": 0.1434e9, "198M": 0.1983e9, "266M": 0.2657e9, "340M": 0.3398e9, "546M": 0.546e9,
               "975M": 0.9755e9, "1.82B": 1.821e9, "2.72B": 2.718e9, "4.82B": 4.823e9, "7.75B": 7.747e9,
               "12.6B": 12.61e9}
STUDENT_RATIOS = (20, 40, 80, 160, 320)


def _noisy(rng: np.random.Generator, loss: np.ndarray, noise: float) -> np.ndarray:
    """Multiplicative Gaussian noise: L (1 + noise eps), eps ~ N(0, 1)."""
    return loss * (1.0 + noise * rng.standard_normal(np.shape(loss)))


def simulate(teacher_params: Sequence[float] = tuple(PAPER_SIZES.values()),
             student_params: Sequence[float] = tuple(PAPER_SIZES.values()),
             student_ratios: Sequence[float] = STUDENT_RATIOS, teacher_ratio: float = 20.0,
             supervised_ratios: Optional[Sequence[float]] = None, noise: float = 0.003, seed: int = 0,
             supervised: Mapping[str, float] = PAPER_SUPERVISED,
             distillation: Mapping[str, float] = PAPER_DISTILLATION) -> List[Dict]:
    """Rows (aggregate-table columns) of a simulated study.

    Teachers: every size in teacher_params at D_T = teacher_ratio N_T (supervised rows, teacher split).
    Supervised baselines: every student size at D = M N for M in supervised_ratios (default student_ratios).
    Students: every (student size, M, teacher) at D_S = M N_S, loss from the distillation law with the teacher's
    true loss; every observed loss (teachers' included) carries `noise` multiplicative noise.
    """
    rng = np.random.default_rng(seed)
    rows: List[Dict] = []
    teachers = []
    for n_t in teacher_params:
        d_t = teacher_ratio * n_t
        true_lt = supervised_loss(n_t, d_t, supervised)
        obs_lt = float(_noisy(rng, true_lt, noise))
        name = f"teacher-{n_t:.4g}"
        teachers.append((name, n_t, d_t, true_lt, obs_lt))
        rows.append(_row(name, "supervised", n_t, d_t, obs_lt))
    for n_s in student_params:
        for m in (supervised_ratios if supervised_ratios is not None else student_ratios):
            d = m * n_s
            rows.append(_row(f"sup-{n_s:.4g}-M{m:g}", "supervised", n_s, d,
                             float(_noisy(rng, supervised_loss(n_s, d, supervised), noise))))
    for n_s in student_params:
        for m in student_ratios:
            d_s = m * n_s
            for name, n_t, d_t, true_lt, obs_lt in teachers:
                l_s = distillation_loss(n_s, d_s, true_lt, distillation, supervised)
                rows.append(_row(f"kd-{n_s:.4g}-M{m:g}-{name}", "distill", n_s, d_s, float(_noisy(rng, l_s, noise)),
                                 (name, n_t, d_t, obs_lt)))
    return rows


def _row(run, mode, n, d, loss, teacher=None) -> Dict:
    t_run, t_n, t_d, t_loss = teacher if teacher else (None, None, None, None)
    flops = training_flops(n, d, t_n or 0.0, 0.0, delta_lgt=1.0 if teacher else 0.0)
    return {"run": run, "mode": mode, "step": None, "params": float(n), "tokens": float(d), "flops": float(flops),
            "eval_loss": float(loss), "teacher_run": t_run, "teacher_params": t_n, "teacher_tokens": t_d,
            "teacher_loss": t_loss}


def student_sizes(k: int, lo: float = 0.1434e9, hi: float = 12.61e9) -> List[float]:
    """k student sizes log-spaced between lo and hi (e.g. k = 14 gives 700 student points with 10 teachers)."""
    return [float(v) for v in np.geomspace(lo, hi, k)]


def extrapolation_split(rows: Sequence[Dict], max_student_params: float):
    """(train, held-out) rows: train keeps every teacher run and all runs of students with N <= the cut; held-out
    is the distillation runs of the larger students (weak-to-strong extrapolation, as the paper checks)."""
    train, test = [], []
    for r in rows:
        if str(r["run"]).startswith("teacher-") or float(r["params"]) <= max_student_params:
            train.append(r)
        elif r["mode"] == "distill":
            test.append(r)
    return train, test
