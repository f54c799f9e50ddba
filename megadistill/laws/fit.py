"""Huber fits of the laws in log space: score the whole start grid at once, screen the best and a random share of
starts with batched Levenberg-Marquardt, polish the best few with L-BFGS-B (analytic gradients), bootstrap CIs."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np

from megadistill.errors import UserError
from megadistill.laws.forms import LawData, get_form
from megadistill.laws.search import (Problem, Runner, _bootstrap_task, _polish_task, _refine_task, _screen_task,
                                     default_workers, distinct_best, evaluate_grid, screen_candidates,
                                     single_threaded_blas, split_chunks)

log = logging.getLogger(__name__)

N_TOP, N_RANDOM = 256, 256  # grid starts screened by batched LM: the best-scoring ones and a uniform sample
N_REFINE = 8  # distinct screened minima polished by L-BFGS-B


@dataclass
class FitResult:
    """A fitted law as stored in fit.json: natural coefficients, objective, residual summary, optional intervals."""
    law: str
    coefficients: Dict[str, float]
    objective: float  # sum over points of Huber_delta(log prediction - log loss)
    n_points: int
    huber_delta: float
    fixed: Dict[str, float] = field(default_factory=dict)
    grid: str = "paper"
    n_starts: int = 0
    n_refined: int = 0
    residuals: Dict[str, float] = field(default_factory=dict)
    intervals: Optional[Dict[str, List[float]]] = None  # 90% bootstrap intervals (5th, 95th percentile)
    n_bootstrap: int = 0
    supervised: Optional[Dict[str, float]] = None  # the student's supervised law (distillation fits)
    warnings: List[str] = field(default_factory=list)  # coefficients these points cannot identify (see identifiability)
    seconds: float = 0.0
    version: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "FitResult":
        try:
            d = json.loads(Path(path).read_text())
            names = set(cls.__dataclass_fields__)
            res = cls(**{k: v for k, v in d.items() if k in names})
        except FileNotFoundError:
            raise UserError(f"{path}: no such fit file") from None
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: not a fit.json written by `megadistill fit` ({e})") from None
        get_form(res.law).to_internal(res.coefficients)  # names every missing coefficient
        if res.law == "distillation" and not res.supervised:
            raise UserError(f"{path}: distillation fit lacks the 'supervised' coefficients of the student law")
        return res


# -- the fit ---------------------------------------------------------------------------------------------

# Along each axis a power law with its offset has one more unknown than its free coefficients: A / N^alpha needs
# values at (1 + free of A, alpha) distinct N (one N: any alpha fits, A absorbs it), B / D^beta likewise in D; the
# distillation law's teacher terms need at least 2 distinct teacher losses L_T. A necessary condition, not sufficient.
_AXES = {"supervised": (("N", "log_n", ("log_A", "alpha")), ("D", "log_d", ("log_B", "beta"))),
         "distillation": (("N_S", "log_n", ("log_A", "alpha")), ("D_S", "log_d", ("log_B", "beta")),
                          ("L_T", "log_lt", ("c0", "c1", "f1", "log_d1")))}


def identifiability(law: str, data: LawData, fixed: Mapping[str, float] = ()) -> List[str]:
    """One sentence per coefficient group these points cannot identify, with the number of distinct values needed."""
    form = get_form(law)
    out = []
    for axis, attr, group in _AXES.get(law, ()):
        free = [p for p in group if p not in fixed]
        values = getattr(data, attr)
        if not free or values is None:
            continue
        need = 1 + len(free) if axis != "L_T" else 2
        have = len(np.unique(np.round(values, 6)))
        if have < need:
            names = ", ".join(form.natural_name(p) for p in free)
            out.append(f"the {law} law's {names} need points at >= {need} distinct {axis} values to be identified; "
                       f"these {len(data)} points have {have}: the fitted {names} are not determined by the data "
                       f"(add runs at {need - have} more {axis} values, or fix them with --fix)")
    return out


def fit_law(law: str, data: LawData, huber_delta: float = 1e-4, grid="paper", fix: Optional[Mapping[str, float]] = None,
            n_refine: int = N_REFINE, bootstrap: int = 0, workers: Optional[int] = None, seed: int = 0,
            starts: Optional[np.ndarray] = None, supervised: Optional[Mapping[str, float]] = None,
            n_top: int = N_TOP, n_random: int = N_RANDOM) -> FitResult:
    """Fit one law to prepared data. `fix` maps natural names to natural values (e.g. {"gamma": 1}).

    Grid mode: every start of `grid` (name or {param: values}) is scored at once; the n_top best and n_random
    others are screened with batched LM (successive halving); the n_refine best distinct results are polished
    with L-BFGS-B. `starts` [S, P] (internal units) instead runs a plain L-BFGS-B loop over exactly those starts.
    """
    with single_threaded_blas():
        return _fit_law(law, data, huber_delta, grid, fix, n_refine, bootstrap, workers, seed, starts, supervised,
                        n_top, n_random)


def _fit_law(law, data, huber_delta, grid, fix, n_refine, bootstrap, workers, seed, starts, supervised,
             n_top, n_random) -> FitResult:
    t0 = time.perf_counter()
    form = get_form(law)
    fixed = dict(form.fix_value(k, v) for k, v in (fix or {}).items())
    n_free = len(form.params) - len(fixed)
    if len(data) < n_free:
        raise UserError(f"the {law} fit has {n_free} free coefficients and needs at least {n_free} points; "
                        f"got {len(data)}")
    unidentified = identifiability(law, data, fixed)
    for w in unidentified:
        log.warning(w)
    problem = Problem(form, data, huber_delta, fixed)
    workers = default_workers() if workers is None else max(1, int(workers))
    if starts is None:
        axes = form.grid_axes(grid)
        axes.update({p: np.array([v]) for p, v in fixed.items()})
        outer, inner = form.grid_split(axes)
        with Runner(problem, outer, inner, workers) as runner:
            obj = evaluate_grid(problem, outer, inner, runner)
            t_grid = time.perf_counter()
            n_starts = int(obj.size)
            pick = screen_candidates(obj, n_top, n_random, np.random.default_rng(seed))
            if pick.size == 0:
                raise UserError(f"no start of the {law} grid gives a finite objective on these points; check the "
                                f"table (losses, params, tokens > 0) or give a --grid file")
            oi, ii = np.unravel_index(pick, obj.shape)
            cands = form.assemble(outer[oi], inner[ii])
            screened = runner.map(_screen_task, split_chunks(cands, 2 * workers))
            th = np.concatenate([t for t, _ in screened])
            f = np.concatenate([v for _, v in screened])
            t_screen = time.perf_counter()
            results = runner.map(_polish_task, distinct_best(th, f, n_refine))
        log.debug("%s fit: %d grid starts %.2fs, %d screened %.2fs, %d polished %.2fs", law, n_starts, t_grid - t0,
                  len(cands), t_screen - t_grid, len(results), time.perf_counter() - t_screen)
    else:
        starts = np.atleast_2d(np.asarray(starts, dtype=np.float64)).copy()
        for p, v in fixed.items():
            starts[:, form.params.index(p)] = v
        n_starts = len(starts)
        with Runner(problem, workers=workers) as runner:
            results = runner.map(_refine_task, list(starts))
    results = [r for r in results if np.isfinite(r[1])]
    if not results:
        raise UserError(f"every {law} fit diverged (non-finite objective); check the table for outliers")
    theta, best = min(results, key=lambda r: r[1])
    nat = form.to_natural(theta)
    res = FitResult(law=law, coefficients=nat, objective=best, n_points=len(data), huber_delta=float(huber_delta),
                    fixed={form.natural_name(p): nat[form.natural_name(p)] for p in fixed},
                    grid=grid if isinstance(grid, str) else "custom", n_starts=n_starts, n_refined=len(results),
                    residuals=residual_summary(form.log_pred(theta, data), data.log_y),
                    supervised=dict(supervised) if supervised else None, warnings=unidentified)
    if bootstrap:
        res.intervals = bootstrap_intervals(problem, theta, bootstrap, workers, seed)
        res.n_bootstrap = int(bootstrap)
    res.seconds = time.perf_counter() - t0
    return res


def bootstrap_intervals(problem: Problem, theta: np.ndarray, n: int, workers: int, seed: int = 0,
                        level: float = 0.90) -> Dict[str, List[float]]:
    """Percentile intervals of the free coefficients from n resamples of the points with replacement
    (multinomial point weights), each refitted by batched LM from the full-data optimum."""
    rng = np.random.default_rng(seed + 1)
    npts = len(problem.data)
    weights = rng.multinomial(npts, np.full(npts, 1.0 / npts), size=n).astype(np.float64)  # [n, points]
    chunks = [weights[i:i + 256] for i in range(0, n, 256)]
    with Runner(problem, workers=workers) as runner:
        thetas = np.concatenate(runner.map(_bootstrap_task, [theta] * len(chunks), chunks))
    form, lo_q = problem.form, 100 * (1 - level) / 2
    nat = np.array([list(form.to_natural(t).values()) for t in thetas])  # [n, P]
    lo, hi = np.percentile(nat, lo_q, axis=0), np.percentile(nat, 100 - lo_q, axis=0)
    return {form.natural_name(p): [float(a), float(b)] for p, a, b in zip(form.params, lo, hi)
            if p not in problem.fixed}


def residual_summary(log_pred: np.ndarray, log_y: np.ndarray) -> Dict[str, float]:
    """Relative errors |L_pred / L - 1| (mean, median, max) and the RMS of the log residuals."""
    rel = np.abs(np.exp(log_pred - log_y) - 1.0)
    return {"mean_rel_error": float(rel.mean()), "median_rel_error": float(np.median(rel)),
            "max_rel_error": float(rel.max()), "rms_log_residual": float(np.sqrt(np.mean((log_pred - log_y) ** 2)))}


def random_grid_starts(law: str, grid="paper", k: int = 500, seed: int = 0,
                       fix: Optional[Mapping[str, float]] = None) -> np.ndarray:
    """k distinct starts [k, P] drawn uniformly from the grid (the exhaustive-loop baseline of tools/bench_fit.py)."""
    form = get_form(law)
    axes = form.grid_axes(grid)
    fixed = dict(form.fix_value(kk, v) for kk, v in (fix or {}).items())
    axes.update({p: np.array([v]) for p, v in fixed.items()})
    sizes = [len(axes[p]) for p in form.params]
    total = int(np.prod(sizes))
    rng = np.random.default_rng(seed)
    flat = rng.choice(total, size=min(k, total), replace=False)
    idx = np.unravel_index(flat, sizes)
    return np.stack([axes[p][i] for p, i in zip(form.params, idx)], axis=1)
