"""PNG figures (matplotlib, Agg): data vs fitted law, IsoFLOP profiles, capacity gap, optimal allocation, crossover."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megadistill.errors import UserError  # noqa: E402
from megadistill.laws.api import distill_rows, predict_rows, supervised_rows  # noqa: E402
from megadistill.laws.fit import FitResult  # noqa: E402
from megadistill.laws.flops import tokens_for_compute  # noqa: E402
from megadistill.laws.forms import (PAPER_DISTILLATION, PAPER_SUPERVISED, distillation_loss,  # noqa: E402
                                    supervised_loss)
from megadistill.laws.planner import Accounting, allocation_curve, plan, supervised_optimum  # noqa: E402

Coeffs = Mapping[str, float]


def compute_grid(lo: float, hi: float, points: int = 13) -> np.ndarray:
    if not 0 < lo < hi or points < 2:
        raise UserError(f"compute range needs 0 < LO < HI and >= 2 points (got {lo:g}, {hi:g}, {points})")
    return np.geomspace(lo, hi, points)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _colors(n: int):
    return plt.cm.viridis(np.linspace(0.05, 0.9, max(n, 1)))


def _fmt_n(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else (f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n:.3g}")


def plot_fit(rows: Sequence[dict], fit: FitResult, path) -> Path:
    """Supervised: loss vs tokens per model size, points and law curves. Distillation: observed vs predicted."""
    if fit.law == "supervised":
        sup = supervised_rows(rows)
        if not sup:
            raise UserError("plot fit: the table has no supervised rows")
        by_n: Dict[float, List[dict]] = defaultdict(list)
        for r in sup:
            by_n[float(r["params"])].append(r)
        fig, ax = plt.subplots(figsize=(7, 5))
        for c, n in zip(_colors(len(by_n)), sorted(by_n)):
            d = np.array([float(r["tokens"]) for r in by_n[n]])
            ax.scatter(d, [r["eval_loss"] for r in by_n[n]], color=c, s=18, label=_fmt_n(n))
            dd = np.geomspace(d.min() / 2, d.max() * 2, 100)
            ax.plot(dd, supervised_loss(n, dd, fit.coefficients), color=c, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens D")
        ax.set_ylabel("eval loss (nats/token)")
        ax.set_title(f"supervised law: mean rel. error {100 * fit.residuals.get('mean_rel_error', np.nan):.2f}%")
        ax.legend(title="N", fontsize=7, ncol=2 if len(by_n) > 8 else 1)
    else:
        pred = predict_rows(fit, rows)
        obs = np.array([r["eval_loss"] for r in pred])
        prd = np.array([r["predicted_loss"] for r in pred])
        fig, ax = plt.subplots(figsize=(6, 6))
        sc = ax.scatter(obs, prd, c=np.log10([r["params"] for r in pred]), s=14, cmap="viridis")
        lims = [min(obs.min(), prd.min()), max(obs.max(), prd.max())]
        ax.plot(lims, lims, "k--", lw=1)
        fig.colorbar(sc, ax=ax, label="log10 N_S")
        ax.set_xlabel("observed student loss")
        ax.set_ylabel("predicted student loss")
        ax.set_title(f"distillation law: mean rel. error {100 * np.mean(np.abs(prd / obs - 1)):.2f}%")
    return _save(fig, path)


def isoflop_groups(rows: Sequence[dict], rel_tol: float = 0.05, min_sizes: int = 3) -> List[Tuple[float, List[dict]]]:
    """Supervised rows clustered by FLOPs (consecutive levels within rel_tol); levels with >= min_sizes sizes."""
    sup = sorted(supervised_rows(rows), key=lambda r: float(r["flops"]))
    groups: List[List[dict]] = []
    for r in sup:
        if groups and float(r["flops"]) <= float(groups[-1][0]["flops"]) * (1 + rel_tol):
            groups[-1].append(r)
        else:
            groups.append([r])
    out = []
    for g in groups:
        if len({float(r["params"]) for r in g}) >= min_sizes:
            out.append((float(np.exp(np.mean([np.log(float(r["flops"])) for r in g]))), g))
    return out


def plot_isoflop(rows: Sequence[dict], path, supervised: Optional[Coeffs] = None) -> Path:
    """Loss vs N at each compute level with a quadratic-in-log-N fit and its minimum (and the law's, if given)."""
    groups = isoflop_groups(rows)
    if not groups:
        raise UserError("plot isoflop: no compute level has supervised runs of 3 or more sizes")
    fig, ax = plt.subplots(figsize=(7, 5))
    for c, (flops, g) in zip(_colors(len(groups)), groups):
        n = np.array([float(r["params"]) for r in g])
        loss = np.array([r["eval_loss"] for r in g])
        ax.scatter(n, loss, color=c, s=20, label=f"{flops:.2g} FLOPs")
        x = np.log(n)
        a, b, cc = np.polyfit(x, loss, 2)
        xs = np.linspace(x.min(), x.max(), 100)
        ax.plot(np.exp(xs), np.polyval([a, b, cc], xs), color=c, lw=1)
        if a > 0:
            xm = -b / (2 * a)
            ax.plot(np.exp(xm), np.polyval([a, b, cc], xm), marker="*", ms=12, color=c, mec="k")
        if supervised is not None:
            nn = np.exp(np.linspace(x.min() - 0.5, x.max() + 0.5, 100))
            lv = supervised_loss(nn, tokens_for_compute(nn, flops), supervised)
            ax.plot(nn, lv, color=c, lw=1, ls=":")
            i = int(np.argmin(lv))
            ax.plot(nn[i], lv[i], marker="x", ms=9, color=c)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("eval loss")
    ax.set_title("IsoFLOP profiles (star: quadratic minimum" + (", x: law minimum)" if supervised else ")"))
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_capacity_gap(rows: Sequence[dict], path, fits: Optional[Tuple[Coeffs, Coeffs]] = None) -> Path:
    """Student loss vs teacher loss per (student size, tokens): too strong a teacher hurts (the capacity gap)."""
    dist = distill_rows(rows)
    if not dist:
        raise UserError("plot capacity-gap: the table has no distillation rows")
    by: Dict[Tuple[float, float], List[dict]] = defaultdict(list)
    for r in dist:
        by[(float(r["params"]), float(r["tokens"]))].append(r)
    keys = sorted(by)
    if len(keys) > 10:  # keep the figure legible: the largest token budget of each student size
        best = {}
        for n, d in keys:
            best[n] = max(best.get(n, 0.0), d)
        keys = sorted((n, d) for n, d in best.items())[:10]
    fig, ax = plt.subplots(figsize=(7, 5))
    for c, (n, d) in zip(_colors(len(keys)), keys):
        g = sorted(by[(n, d)], key=lambda r: r["teacher_loss"])
        lt = np.array([r["teacher_loss"] for r in g])
        ax.scatter(lt, [r["eval_loss"] for r in g], color=c, s=18, label=f"N_S={_fmt_n(n)}, D_S={d:.2g}")
        if fits is not None:
            dcoef, scoef = fits
            lts = np.linspace(lt.min() * 0.97, lt.max() * 1.03, 200)
            ax.plot(lts, distillation_loss(n, d, lts, dcoef, scoef), color=c, lw=1)
            ax.axhline(supervised_loss(n, d, scoef), color=c, lw=0.8, ls=":")
    lim = ax.get_xlim()
    ax.plot(lim, lim, "k--", lw=0.8, label="L_S = L_T")
    ax.set_xlabel("teacher loss L_T")
    ax.set_ylabel("student loss L_S")
    ax.set_title("capacity gap" + (" (dotted: supervised student)" if fits else ""))
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_allocation(computes: Sequence[float], path, scenarios: Sequence[str] = ("best-case",),
                    student_params: Optional[float] = None, supervised: Coeffs = PAPER_SUPERVISED,
                    distillation: Coeffs = PAPER_DISTILLATION, **accounting) -> Path:
    """Compute-optimal N_S (if free), D_S, N_T, D_T and L_S against compute, one line per scenario.
    `accounting`: planner Accounting fields (n_ctx, n_vocab, rho, omega, bounds)."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = [("student_params", "N_S"), ("student_tokens", "D_S"), ("teacher_params", "N_T"),
              ("teacher_tokens", "D_T"), ("teacher_loss", "L_T"), ("student_loss", "L_S")]
    for c, sc in zip(plt.cm.tab10(np.arange(len(scenarios))), scenarios):
        plans = allocation_curve(computes, sc, student_params, supervised, distillation, **accounting)
        for ax, (key, label) in zip(axes.ravel(), panels):
            ax.plot(computes, [getattr(p, key) for p in plans], marker="o", ms=3, color=c, label=sc)
    axes.ravel()[-1].plot(computes, [supervised_optimum(float(c), student_params, supervised, **accounting)["loss"]
                                     for c in computes], "k--", lw=1, label="supervised")
    for ax, (key, label) in zip(axes.ravel(), panels):
        ax.set_xscale("log")
        if "loss" not in key:
            ax.set_yscale("log")
        ax.set_xlabel("compute (FLOPs)")
        ax.set_ylabel(label)
    axes.ravel()[-1].legend(fontsize=7)
    fig.suptitle("compute-optimal distillation" + (f", N_S={_fmt_n(student_params)}" if student_params else ""))
    return _save(fig, path)


def plot_crossover(student_params: Sequence[float], computes: Sequence[float], path, scenario: str = "best-case",
                   supervised: Coeffs = PAPER_SUPERVISED, distillation: Coeffs = PAPER_DISTILLATION,
                   **accounting) -> Path:
    """L_distil - L_supervised against compute per student size; the zero crossing is where supervision catches up."""
    acct = Accounting(**accounting)
    fig, ax = plt.subplots(figsize=(7, 5))
    for c, n in zip(_colors(len(student_params)), student_params):
        per_token = 3.0 * acct.f(n)  # budgets outside the box of student tokens are skipped
        pts = [(cc, plan(float(cc), scenario, float(n), supervised, distillation, **accounting).delta)
               for cc in computes if per_token * acct.bounds[0] < cc < per_token * acct.bounds[1]]
        if not pts:
            continue
        x, y = np.array(pts).T
        ax.plot(x, y, marker="o", ms=3, color=c, label=f"N_S={_fmt_n(n)}")
        s = np.where((y[:-1] < 0) & (y[1:] >= 0))[0]
        if s.size:
            i = s[0]
            xc = np.exp(np.interp(0.0, [y[i], y[i + 1]], np.log([x[i], x[i + 1]])))
            ax.axvline(xc, color=c, lw=0.8, ls=":")
    ax.axhline(0.0, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("compute (FLOPs)")
    ax.set_ylabel("L_distil - L_supervised (< 0: distil)")
    ax.set_title(f"distil vs supervise, {scenario}")
    ax.legend(fontsize=7)
    return _save(fig, path)
