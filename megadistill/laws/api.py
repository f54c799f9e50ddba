"""Plain-function interface over loss tables: fit the supervised and distillation laws, predict, summarise errors."""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from megadistill.errors import UserError
from megadistill.laws.fit import N_REFINE, FitResult, fit_law, residual_summary
from megadistill.laws.forms import DISTILLATION, SUPERVISED, LawData, supervised_loss
from megadistill.laws.records import aggregate, read_table  # noqa: F401  (re-exported for callers)

log = logging.getLogger(__name__)

Coeffs = Mapping[str, float]


def supervised_rows(rows: Sequence[dict]) -> List[dict]:
    return [r for r in rows if r.get("mode", "supervised") == "supervised" and r.get("teacher_loss") is None]


def distill_rows(rows: Sequence[dict]) -> List[dict]:
    out = [r for r in rows if r.get("mode") == "distill" or r.get("teacher_loss") is not None]
    bad = [r.get("run") for r in out if r.get("teacher_loss") is None]
    if bad:
        raise UserError(f"distillation rows need teacher_loss; missing for run(s) {bad[:5]}")
    return out


def _finite(rows: Sequence[dict], keys: Sequence[str]) -> List[dict]:
    keep = [r for r in rows if all(r.get(k) is not None and math.isfinite(float(r[k])) for k in keys)]
    if len(keep) < len(rows):
        log.warning("dropped %d rows with missing or non-finite %s", len(rows) - len(keep), "/".join(keys))
    return keep


def supervised_data(rows: Sequence[dict]) -> LawData:
    """LawData of supervised rows: log N, log D, log L."""
    rows = _finite(rows, ("params", "tokens", "eval_loss"))
    a = lambda k: np.array([float(r[k]) for r in rows], dtype=np.float64)
    return LawData(np.log(a("params")), np.log(a("tokens")), np.log(a("eval_loss")))


def distillation_data(rows: Sequence[dict], supervised: Coeffs) -> LawData:
    """LawData of distillation rows with log L_T and log Ltilde_S = log L(N_S, D_S) from `supervised`."""
    rows = _finite(rows, ("params", "tokens", "eval_loss", "teacher_loss"))
    a = lambda k: np.array([float(r[k]) for r in rows], dtype=np.float64)
    n, d = a("params"), a("tokens")
    return LawData(np.log(n), np.log(d), np.log(a("eval_loss")), np.log(a("teacher_loss")),
                   np.log(supervised_loss(n, d, supervised)))


def _coeffs(fit: Union[FitResult, Coeffs, None]) -> Optional[Dict[str, float]]:
    if fit is None:
        return None
    return dict(fit.coefficients) if isinstance(fit, FitResult) else dict(fit)


def fit_supervised(rows: Sequence[dict], fix: Optional[Coeffs] = None, huber_delta: float = 1e-4,
                   grid: Union[str, Mapping] = "paper", bootstrap: int = 0, workers: Optional[int] = None,
                   n_refine: int = N_REFINE, seed: int = 0, **search) -> FitResult:
    """Fit Eq. 1 to the supervised rows (mode supervised, no teacher) of a table; `search` goes to fit_law
    (n_top, n_random, starts)."""
    sup = supervised_rows(rows)
    if not sup:
        raise UserError("the table has no supervised rows (mode=supervised, empty teacher_loss) to fit Eq. 1")
    return fit_law("supervised", supervised_data(sup), huber_delta, grid, fix, n_refine, bootstrap, workers, seed,
                   **search)


def fit_distillation(rows: Sequence[dict], supervised_fit: Union[FitResult, Coeffs, None] = None,
                     fix: Optional[Coeffs] = None, huber_delta: float = 1e-4, grid: Union[str, Mapping] = "paper",
                     bootstrap: int = 0, workers: Optional[int] = None, n_refine: int = N_REFINE, seed: int = 0,
                     supervised_grid: Union[str, Mapping] = "paper", **search) -> FitResult:
    """Fit Eq. 8 to the distill rows. Ltilde_S comes from `supervised_fit` (FitResult or coefficients), or from a
    supervised fit of the table's own supervised rows when None."""
    dist = distill_rows(rows)
    if not dist:
        raise UserError("the table has no distillation rows (mode=distill with teacher_loss) to fit Eq. 8")
    sup = _coeffs(supervised_fit)
    if sup is None:
        if not supervised_rows(rows):
            raise UserError("the distillation fit needs the student's supervised law: give --supervised-fit "
                            "fit.json or include supervised rows in the table")
        sup = fit_supervised(rows, huber_delta=huber_delta, grid=supervised_grid, workers=workers).coefficients
        log.info("supervised law for Ltilde_S fitted from the table's supervised rows: %s", sup)
    SUPERVISED.to_internal(sup)  # checks every coefficient is there
    return fit_law("distillation", distillation_data(dist, sup), huber_delta, grid, fix, n_refine, bootstrap,
                   workers, seed, supervised=sup, **search)


def predict_rows(fit: Union[FitResult, Mapping], rows: Sequence[dict]) -> List[dict]:
    """Each row of the fit's kind with `predicted_loss` and `rel_error` = predicted / observed - 1 added."""
    fit = fit if isinstance(fit, FitResult) else FitResult(**fit)
    if fit.law == "supervised":
        use = _finite(supervised_rows(rows), ("params", "tokens"))
        n = np.array([float(r["params"]) for r in use])
        pred = supervised_loss(n, np.array([float(r["tokens"]) for r in use]), fit.coefficients) if use else []
    else:
        use = _finite(distill_rows(rows), ("params", "tokens", "teacher_loss"))
        if use:
            x = distillation_data([dict(r, eval_loss=1.0) for r in use], fit.supervised)
            pred = np.exp(DISTILLATION.log_pred(DISTILLATION.to_internal(fit.coefficients), x))
        else:
            pred = []
    if not use:
        raise UserError(f"the table has no {fit.law} rows to predict "
                        f"({'mode=distill with teacher_loss' if fit.law == 'distillation' else 'mode=supervised'})")
    out = []
    for r, p in zip(use, np.atleast_1d(pred)):
        obs = r.get("eval_loss")
        rel = float(p / obs - 1.0) if obs is not None and math.isfinite(float(obs)) else None
        out.append(dict(r, predicted_loss=float(p), rel_error=rel))
    return out


def error_summary(pred_rows: Sequence[dict]) -> Dict[str, float]:
    """Mean and max |relative error| of predicted rows (rows without an observed loss are ignored)."""
    rel = np.array([abs(r["rel_error"]) for r in pred_rows if r.get("rel_error") is not None])
    if rel.size == 0:
        return {"n": 0, "mean_rel_error": float("nan"), "max_rel_error": float("nan")}
    return {"n": int(rel.size), "mean_rel_error": float(rel.mean()), "max_rel_error": float(rel.max())}


def in_sample(fit: FitResult) -> Dict[str, float]:
    """The in-sample relative errors stored in a fit: {"mean_rel_error", "max_rel_error", ...}."""
    return dict(fit.residuals)


predict = predict_rows  # the short name the demo calls

__all__ = ["predict", "in_sample", "aggregate", "read_table", "fit_supervised", "fit_distillation", "predict_rows", "error_summary",
           "supervised_data", "distillation_data", "residual_summary"]
