"""Multi-start search machinery of the fits: the Huber problem, the factorised grid scorer, and a 2-process pool."""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
from scipy.optimize import minimize

from megadistill.laws.forms import LawData, LawForm
from megadistill.laws.lm import huber, lm_batch, lm_screen, lm_state

GRID_BLOCK = 1 << 20  # elements (starts x points) per numpy block of the grid scorer: ~8 MB per temporary
LBFGS_OPTIONS = {"maxiter": 3000, "maxfun": 6000, "ftol": 1e-13, "gtol": 1e-9, "maxcor": 20}


def default_workers() -> int:
    """Both cores of the box (at most 2 by default; MEGADISTILL_FIT_WORKERS overrides)."""
    env = os.environ.get("MEGADISTILL_FIT_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1))


_BLAS_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                 ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
                 ("openblas_set_num_threads", "openblas_get_num_threads"))


def _openblas_handles() -> List[Tuple[object, object]]:
    """(set, get) thread-count functions of every OpenBLAS loaded in this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ln.split()[-1].startswith("/")})
    except OSError:
        return []
    out = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _BLAS_SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                out.append((getattr(lib, set_name), getattr(lib, get_name)))
                break
    return out


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Pin the loaded OpenBLAS libraries to one thread while fitting, restoring the counts after.

    L-BFGS-B's tiny BLAS calls (SciPy's own OpenBLAS) spin up worker threads; on a busy 2-core box they contend
    with the fit's own processes and made a 1-second polish take 30 s. The fits parallelise over processes instead.
    """
    handles = _openblas_handles()
    saved = [int(get()) for _, get in handles]
    for set_fn, _ in handles:
        set_fn(1)
    try:
        yield
    finally:
        for (set_fn, _), n in zip(handles, saved):
            set_fn(max(1, n))


class Problem:
    """One fit: law form, data, Huber delta, and which coefficients are free (the rest fixed)."""

    def __init__(self, form: LawForm, data: LawData, delta: float, fixed: Mapping[str, float]):
        self.form, self.data, self.delta = form, data, float(delta)
        self.fixed = dict(fixed)
        self.free = np.array([i for i, p in enumerate(form.params) if p not in self.fixed], dtype=int)
        # L-BFGS-B's ftol compares |f| against 1; scaling by 1 / (n delta^2) makes f ~ mean |r| / delta = O(1+)
        # so the stopping rule is relative, whatever delta and n are. The minimiser is unchanged.
        self.scale = 1.0 / (len(data) * self.delta ** 2)
        self.bounds = [form.bounds[form.params[i]] for i in self.free]

    def full(self, x: np.ndarray) -> np.ndarray:
        theta = np.array([self.fixed.get(p, 0.0) for p in self.form.params])
        theta[self.free] = x
        return theta

    def value_grad(self, x: np.ndarray, weights: Optional[np.ndarray] = None) -> Tuple[float, np.ndarray]:
        pred, jac = self.form.log_pred_jac(self.full(x), self.data)
        r = pred - self.data.log_y
        h, psi = huber(r, self.delta), np.clip(r, -self.delta, self.delta)  # psi = dHuber/dr
        if weights is not None:
            h, psi = h * weights, psi * weights
        f = float(h.sum()) * self.scale
        if not np.isfinite(f):
            return 1e300, np.zeros(len(x))
        return f, (jac[:, self.free].T @ psi) * self.scale

    def objective(self, theta: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
        """Sum over points of Huber_delta(log prediction - log loss) (optionally weighted)."""
        h = huber(self.form.log_pred(theta, self.data) - self.data.log_y, self.delta)
        return float((h if weights is None else h * weights).sum())

    def refine(self, theta0: np.ndarray, weights: Optional[np.ndarray] = None) -> Tuple[np.ndarray, float]:
        """L-BFGS-B (analytic gradient) from one start; returns (coefficient vector, unscaled objective)."""
        x0 = np.clip(theta0[self.free], [b[0] for b in self.bounds], [b[1] for b in self.bounds])
        res = minimize(self.value_grad, x0, args=(weights,), jac=True, method="L-BFGS-B",
                       bounds=self.bounds, options=LBFGS_OPTIONS)
        theta = self.full(res.x)
        return theta, self.objective(theta, weights)

    def polish(self, theta0: np.ndarray, rounds: int = 4) -> Tuple[np.ndarray, float]:
        """L-BFGS-B on Jacobi-scaled coefficients, rescaled and restarted while it still improves.

        x = s * z with s_i = 1 / sqrt((J^T W J)_ii) (Gauss-Newton curvature, IRLS Huber weights) at the round's
        start: plain L-BFGS-B stalls along weakly curved directions (e.g. c1 of the capacity-gap break, O(1e3))
        where the gradient is tiny in raw units; scaled, it keeps descending.
        """
        theta, best = self.refine(theta0)
        lo = np.array([b[0] for b in self.bounds])
        hi = np.array([b[1] for b in self.bounds])
        for _ in range(rounds):
            _, _, gn = lm_state(self, theta[None], None)
            d = np.diagonal(gn[0])
            s = 1.0 / np.sqrt(np.maximum(d, d.max() * 1e-16 + 1e-300))
            s = s / s.min()

            def fun(z):
                f, g = self.value_grad(z * s)
                return f, g * s

            res = minimize(fun, theta[self.free] / s, jac=True, method="L-BFGS-B",
                           bounds=list(zip(lo / s, hi / s)), options=LBFGS_OPTIONS)
            cand = self.full(np.clip(res.x * s, lo, hi))
            f = self.objective(cand)
            if not f < best * (1 - 1e-12):
                break
            theta, best = cand, f
        return theta, best

    def grid_block(self, outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
        """Objective of every (outer row, inner row) pair: [nO, Po] x [nI, Pi] -> [nO, nI].

        The per-point feature of the outer coefficients (e.g. gamma LSE(a - alpha log N, b - beta log D)) is computed
        once per outer row and broadcast against every inner combination, so the 216,000-start distillation grid
        costs one logaddexp + Huber per (start, point) instead of the whole law.
        """
        form, x = self.form, self._data32()  # float32 halves the memory traffic; ranking needs ~1e-7 precision
        outer, inner = outer.astype(np.float32), inner.astype(np.float32)
        th_o = {p: outer[:, i, None] for i, p in enumerate(form.outer)}  # [nO, 1] each
        th_i = {p: inner[:, i, None] for i, p in enumerate(form.inner)}  # [nI, 1] each
        f = form.outer_feature(th_o, x)[:, None, :]  # [nO, 1, n]
        g = np.broadcast_to(form.inner_feature(th_i, x), (len(inner), len(x)))[None]  # [1, nI, n]
        th_i3 = {p: v[None] for p, v in th_i.items()}  # [1, nI, 1]
        with np.errstate(over="ignore", invalid="ignore"):
            r = form.combine(f, g, th_i3, x) - x.log_y  # [nO, nI, n]
            out = huber(r, np.float32(self.delta)).sum(axis=-1, dtype=np.float64)
        return np.where(np.isfinite(out), out, np.inf)

    def _data32(self) -> LawData:
        c = lambda a: None if a is None else a.astype(np.float32)
        d = self.data
        return LawData(c(d.log_n), c(d.log_d), c(d.log_y), c(d.log_lt), c(d.log_ls))


# -- process pool: the problem (and grid) are shipped once per worker -------------------------------------

_WORKER: Dict[str, object] = {}


def _init_worker(problem: Problem, outer: Optional[np.ndarray], inner: Optional[np.ndarray],
                 pin_blas: bool = False) -> None:
    _WORKER.update(problem=problem, outer=outer, inner=inner)
    if pin_blas:  # a worker process only fits: pin its BLAS for good
        for set_fn, _ in _openblas_handles():
            set_fn(1)


def _grid_task(lo: int, hi: int) -> np.ndarray:
    return _WORKER["problem"].grid_block(_WORKER["outer"][lo:hi], _WORKER["inner"])


def _screen_task(thetas: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    return lm_screen(_WORKER["problem"], thetas)


def _refine_task(theta0: np.ndarray) -> Tuple[np.ndarray, float]:
    return _WORKER["problem"].refine(theta0)


def _polish_task(theta0: np.ndarray) -> Tuple[np.ndarray, float]:
    return _WORKER["problem"].polish(theta0)


def _bootstrap_task(theta0: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Refit a chunk of resamples [B, n] from the full-data optimum with batched LM; returns [B, P]."""
    problem = _WORKER["problem"]
    thetas, _ = lm_batch(problem, np.repeat(theta0[None], len(weights), axis=0), iters=200, weights=weights)
    return thetas


class Runner:
    """Runs tasks inline (1 worker) or on a fork-started process pool sharing the problem and grid."""

    def __init__(self, problem: Problem, outer=None, inner=None, workers: int = 1):
        self.workers = workers
        self.pool = None
        self._blas = single_threaded_blas()
        self._blas.__enter__()
        if workers > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(problem, outer, inner, True))
        else:
            _init_worker(problem, outer, inner)

    def map(self, fn, *iterables) -> list:
        if self.pool is None:
            return [fn(*a) for a in zip(*iterables)]
        return list(self.pool.map(fn, *iterables))

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self._blas.__exit__(None, None, None)


def evaluate_grid(problem: Problem, outer: np.ndarray, inner: np.ndarray, runner: Runner) -> np.ndarray:
    """Objective at every (outer, inner) start of the factorised grid: [nO, nI]."""
    rows = max(1, GRID_BLOCK // max(1, len(inner) * len(problem.data)))
    rows = min(rows, max(1, -(-len(outer) // (4 * runner.workers))))  # >= 4 blocks per worker for balance
    los = list(range(0, len(outer), rows))
    return np.concatenate(runner.map(_grid_task, los, [min(lo + rows, len(outer)) for lo in los]), axis=0)


def screen_candidates(obj: np.ndarray, n_top: int, n_random: int, rng: np.random.Generator) -> np.ndarray:
    """Flat grid indices to screen: the n_top best starts plus n_random others drawn uniformly (diversity:
    the best-scoring starts crowd into few basins, often not the deepest)."""
    flat = obj.ravel()
    finite = np.flatnonzero(np.isfinite(flat))
    if len(finite) <= n_top + n_random:
        return finite
    top = finite[np.argpartition(flat[finite], n_top - 1)[:n_top]] if n_top else np.array([], dtype=int)
    rest = np.setdiff1d(finite, top, assume_unique=True)
    return np.concatenate([top, rng.choice(rest, size=n_random, replace=False)])


def split_chunks(a: np.ndarray, n: int) -> List[np.ndarray]:
    """a split into n near-equal interleaved chunks (interleaving spreads the best starts over workers)."""
    return [a[i::n] for i in range(n) if len(a[i::n])]


def distinct_best(thetas: np.ndarray, f: np.ndarray, k: int, rel: float = 1e-9) -> List[np.ndarray]:
    """Up to k coefficient vectors with distinct objectives, best first (duplicates end in the same minimum)."""
    out, last = [], None
    for i in np.argsort(f):
        if not np.isfinite(f[i]):
            break
        if last is None or abs(f[i] - last) > rel * max(abs(last), 1e-300):
            out.append(thetas[i])
            last = f[i]
        if len(out) == k:
            break
    return out
