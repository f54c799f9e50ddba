"""Batched Levenberg-Marquardt for Huber objectives in numpy: many starts (or bootstrap resamples) descend at once."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

_LAMBDA0, _LAMBDA_MIN, _LAMBDA_MAX = 1e-3, 1e-12, 1e10
_UP, _DOWN = 4.0, 3.0  # damping after a rejected / accepted step


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber_delta(r) = r^2/2 for |r| <= delta, delta (|r| - delta/2) beyond; m = min(|r|, delta) gives both."""
    a = np.abs(r)
    m = np.minimum(a, delta)
    return m * (a - 0.5 * m)


def _objective(problem, theta: np.ndarray, weights: Optional[np.ndarray]) -> np.ndarray:
    """Sum of Huber losses per coefficient vector of a batch [S, P] -> [S] (inf where not finite)."""
    h = huber(problem.form.log_pred(theta, problem.data) - problem.data.log_y, problem.delta)
    f = (h if weights is None else h * weights).sum(axis=1)
    return np.where(np.isfinite(f), f, np.inf)


def lm_state(problem, theta: np.ndarray, weights: Optional[np.ndarray]):
    """Objective [S], gradient pieces and IRLS Gauss-Newton matrix at a batch of coefficient vectors [S, P]."""
    pred, jac = problem.form.log_pred_jac(theta, problem.data)  # [S, n], [S, n, P]
    jac = jac[..., problem.free]  # [S, n, F]
    r = pred - problem.data.log_y  # [S, n]
    d = problem.delta
    h = huber(r, d)
    psi = np.clip(r, -d, d)  # dHuber/dr
    # IRLS weight psi(r) / r: 1 in the quadratic zone, delta / |r| in the linear one (Huber's M-estimator weights).
    w = np.minimum(1.0, d / np.maximum(np.abs(r), 1e-300))
    if weights is not None:
        h, psi, w = h * weights, psi * weights, w * weights
    f = h.sum(axis=1)
    f = np.where(np.isfinite(f), f, np.inf)
    g = np.einsum("snf,sn->sf", jac, psi)  # [S, F]
    hess = np.matmul(np.swapaxes(jac * w[..., None], 1, 2), jac)  # J^T W J  [S, F, F]
    return f, g, hess


def lm_batch(problem, theta: np.ndarray, iters: int = 40, weights: Optional[np.ndarray] = None,
             tol: float = 1e-10) -> Tuple[np.ndarray, np.ndarray]:
    """Run damped Gauss-Newton (IRLS Huber weights) on every row of theta [S, P] for `iters` steps.

    Steps are projected onto the problem's bounds; each start keeps its own damping lambda, accepting a step only
    when the objective drops. Starts whose relative decrease falls below `tol` stop early.
    Returns (theta [S, P], objective [S]) with the objective unscaled (sum of Huber losses).
    """
    theta = np.array(theta, dtype=np.float64, copy=True)
    lo = np.array([b[0] for b in problem.bounds])
    hi = np.array([b[1] for b in problem.bounds])
    free = problem.free
    theta[:, free] = np.clip(theta[:, free], lo, hi)
    f, g, hess = lm_state(problem, theta, weights)
    lam = np.full(len(theta), _LAMBDA0)
    active = np.isfinite(f)
    eye = np.eye(len(free))
    for _ in range(iters):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        h_a, g_a = hess[idx], g[idx]
        diag = np.diagonal(h_a, axis1=1, axis2=2)  # [s, F]
        scale = diag + 1e-9 * diag.mean(axis=1, keepdims=True) + 1e-30
        a = h_a + lam[idx, None, None] * eye * scale[:, None, :]  # Marquardt: damp by the diagonal
        try:
            step = np.linalg.solve(a, -g_a[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = -g_a / scale  # a singular system somewhere: fall back to scaled gradient steps for this round
        cand = theta[idx].copy()
        cand[:, free] = np.clip(cand[:, free] + step, lo, hi)
        w_a = None if weights is None else weights[idx]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            f_c = _objective(problem, cand, w_a)  # prediction only; Jacobians just for accepted steps
            ok = f_c < f[idx]
            acc = idx[ok]
            if acc.size:
                _, g[acc], hess[acc] = lm_state(problem, cand[ok], None if weights is None else weights[acc])
        gain = np.where(ok, (f[idx] - f_c) / np.maximum(np.abs(f[idx]), 1e-300), 0.0)
        theta[acc], f[acc] = cand[ok], f_c[ok]
        lam[idx] = np.clip(np.where(ok, lam[idx] / _DOWN, lam[idx] * _UP), _LAMBDA_MIN, _LAMBDA_MAX)
        # Converged: an accepted step that barely helped, or damping so high that steps vanish.
        done = (ok & (gain < tol)) | (lam[idx] >= _LAMBDA_MAX)
        active[idx[done]] = False
    return theta, f


def lm_screen(problem, theta: np.ndarray, rounds: int = 4, iters: int = 25, keep: float = 0.5,
              min_keep: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """Successive halving over starts: `rounds` of `iters` LM steps, keeping the best `keep` share after each
    round but the last (never fewer than min_keep). Returns the survivors (theta [k, P], objective [k]), best first."""
    f = None
    for k in range(rounds):
        theta, f = lm_batch(problem, theta, iters)
        order = np.argsort(f)
        if k < rounds - 1:
            order = order[:max(min_keep, int(np.ceil(keep * len(order))))]
        theta, f = theta[order], f[order]
    return theta, f
