"""Compute-optimal distillation (PAPER.md Eq. 9): the allocation (N_S, D_S, N_T, D_T) minimising the student loss
at a FLOPs budget per scenario, the supervised alternative, and the distil-vs-supervise crossover compute."""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import brentq, minimize

from megadistill.errors import UserError
from megadistill.laws.flops import (N_CTX, N_VOCAB, OMEGA, RHO, SCENARIOS, check_students_per_cache,
                                   forward_flops_per_token, scenario_deltas)
from megadistill.laws.forms import PAPER_DISTILLATION, PAPER_SUPERVISED, distillation_loss, supervised_loss

_GRID = 45  # coarse grid points per free log10 variable before the SLSQP polish
_POLISH = 6  # best grid points polished by SLSQP
TIE = 1e-6  # |L_distil - L_supervised| below this counts as a tie, answered "supervise"
# Ours: with N_S free, D_S >= MIN_TOKENS_PER_PARAM N_S. Unconstrained, the best case extrapolates Eq. 8 to absurd
# students (1e12 parameters on 1e8 tokens), far outside any fitted data (the paper plans for given N_S).
MIN_TOKENS_PER_PARAM = 1.0


@dataclass(frozen=True)
class Accounting:
    """FLOPs accounting (PAPER.md F(N) arguments) and the box every N and D lives in (PAPER.md: N_T, D_S, D_T in
    [1e6, 1e17]; here N_S and the supervised N too). Tiny CPU studies pass their own shapes and a smaller box."""
    n_ctx: int = N_CTX
    n_vocab: int = N_VOCAB
    rho: float = RHO
    omega: float = OMEGA
    bounds: Tuple[float, float] = (1e6, 1e17)
    students_per_cache: float = 1.0  # students sharing one offline teacher cache: each pays 1/n of its forward

    def __post_init__(self):
        check_students_per_cache(self.students_per_cache)

    def f(self, n):
        return forward_flops_per_token(n, self.n_ctx, self.n_vocab, self.rho, self.omega)

    @property
    def lo(self) -> float:
        return math.log10(self.bounds[0])

    @property
    def hi(self) -> float:
        return math.log10(self.bounds[1])

    @property
    def box(self) -> str:
        return f"[{self.bounds[0]:.3g}, {self.bounds[1]:.3g}]"


@dataclass
class Plan:
    """A compute-optimal allocation and its supervised alternative at the same compute."""
    compute: float
    scenario: str
    student_params: float  # N_S
    student_tokens: float  # D_S
    teacher_params: float  # N_T
    teacher_tokens: float  # D_T
    teacher_loss: float  # L_T = L(N_T, D_T)
    student_loss: float  # L_S(N_S, D_S, L_T)
    flops: float  # the allocation's FLOPs under the scenario (== compute up to solver tolerance)
    supervised: Dict[str, float] = field(default_factory=dict)  # {"params", "tokens", "loss"} at the same compute
    delta: float = 0.0  # student_loss - supervised loss: < 0 means distillation wins
    answer: str = "supervise"

    def to_dict(self) -> dict:
        return asdict(self)


def _cost(acct: Accounting, scenario, n_s, d_s, n_t, d_t):
    d_lgt, d_pre = scenario_deltas(scenario)
    d_lgt /= acct.students_per_cache
    f_s, f_t = acct.f(n_s), acct.f(n_t)
    return 3.0 * f_s * d_s + f_t * (d_lgt * d_s + d_pre * 3.0 * d_t)


def _student_tokens(acct: Accounting, scenario, compute, n_s, n_t, d_t):
    """D_S that spends exactly `compute` given the other three (NaN when the teacher alone exceeds it)."""
    d_lgt, d_pre = scenario_deltas(scenario)
    d_lgt /= acct.students_per_cache
    f_s, f_t = acct.f(n_s), acct.f(n_t)
    left = compute - d_pre * 3.0 * f_t * d_t
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(left > 0, left / (3.0 * f_s + d_lgt * f_t), np.nan)


def supervised_optimum(compute: float, params: Optional[float] = None,
                       supervised: Mapping[str, float] = PAPER_SUPERVISED,
                       min_tokens_per_param: float = MIN_TOKENS_PER_PARAM, **accounting) -> Dict[str, float]:
    """Best supervised run at `compute` (3 F(N) D = C): N fixed to `params`, or N free in the box
    with D >= min_tokens_per_param N. `accounting`: Accounting fields (n_ctx, n_vocab, rho, omega, bounds)."""
    acct = Accounting(**accounting)
    if params is not None:
        d = compute / (3.0 * acct.f(params))
        _check_tokens(acct, d, compute, params)
        return {"params": float(params), "tokens": float(d), "loss": float(supervised_loss(params, d, supervised))}
    log_n = np.linspace(acct.lo, acct.hi, 400)
    n = 10.0 ** log_n
    d = compute / (3.0 * acct.f(n))
    ok = (d >= acct.bounds[0]) & (d <= acct.bounds[1]) & (d >= min_tokens_per_param * n)
    if not ok.any():
        raise UserError(f"compute {compute:.3g} FLOPs cannot train any model in {acct.box} parameters on "
                        f"{acct.box} tokens")
    loss = np.where(ok, supervised_loss(n, np.clip(d, 1.0, None), supervised), np.inf)
    i = int(np.argmin(loss))
    lo, hi = log_n[max(i - 1, 0)], log_n[min(i + 1, len(log_n) - 1)]

    def f(x):
        nn = 10.0 ** x[0]
        return supervised_loss(nn, compute / (3.0 * acct.f(nn)), supervised)

    def ratio(x):
        nn = 10.0 ** x[0]
        return math.log10(compute / (3.0 * acct.f(nn)) / (min_tokens_per_param * nn))

    res = minimize(f, [log_n[i]], method="SLSQP", bounds=[(lo, hi)], constraints=[{"type": "ineq", "fun": ratio}])
    best = res.x[0] if res.success and res.fun <= loss[i] and ratio(res.x) >= -1e-9 else log_n[i]
    nn = 10.0 ** best
    dd = compute / (3.0 * acct.f(nn))
    return {"params": float(nn), "tokens": float(dd), "loss": float(supervised_loss(nn, dd, supervised))}


def _check_tokens(acct: Accounting, d, compute, n):
    if d < acct.bounds[0]:
        need = 3.0 * acct.f(n) * acct.bounds[0]
        raise UserError(f"compute {compute:.3g} FLOPs is too small for a {n:.3g}-parameter student: training it on "
                        f"the minimum {acct.bounds[0]:.3g} tokens needs {need:.3g} FLOPs")


def plan(compute: float, scenario: str = "best-case", student_params: Optional[float] = None,
         supervised: Mapping[str, float] = PAPER_SUPERVISED,
         distillation: Mapping[str, float] = PAPER_DISTILLATION,
         min_tokens_per_param: float = MIN_TOKENS_PER_PARAM, **accounting) -> Plan:
    """Minimise L_S(N_S, D_S, L(N_T, D_T)) subject to FLOPs(scenario) = compute (SLSQP in log10 space, polished
    from the best points of a coarse feasible grid), N_S fixed when `student_params` is given, else free with
    D_S >= min_tokens_per_param N_S (the supervised alternative gets the same rule).
    `accounting`: Accounting fields (n_ctx, n_vocab, rho, omega for F(N); bounds of every N and D)."""
    acct = Accounting(**accounting)
    if not (isinstance(compute, (int, float)) and math.isfinite(compute) and compute > 0):
        raise UserError(f"--compute must be a positive number of FLOPs, got {compute!r}")
    scenario_deltas(scenario)
    if student_params is not None:
        if not acct.bounds[0] <= student_params <= acct.bounds[1]:
            raise UserError(f"--student-params {student_params:.3g} must be within {acct.box}")
        _check_tokens(acct, compute / (3.0 * acct.f(student_params)), compute, student_params)

    fixed_ns = student_params is not None
    # Free variables x (log10): [N_S (if free), N_T, D_T]; D_S is eliminated by the budget on the grid.
    axes = [np.linspace(acct.lo, acct.hi, _GRID)] * (2 if fixed_ns else 3)
    pts = np.array(list(itertools.product(*axes)))  # [G, k]
    n_s = np.full(len(pts), float(student_params)) if fixed_ns else 10.0 ** pts[:, 0]
    n_t, d_t = 10.0 ** pts[:, -2], 10.0 ** pts[:, -1]
    d_s = _student_tokens(acct, scenario, compute, n_s, n_t, d_t)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(d_s) & (d_s >= acct.bounds[0]) & (d_s <= acct.bounds[1])
        if not fixed_ns:
            ok &= d_s >= min_tokens_per_param * n_s
    if not ok.any():
        raise UserError(f"no allocation spends {compute:.3g} FLOPs within the bounds {acct.box} in scenario "
                        f"{scenario!r}; raise --compute")
    loss = np.full(len(pts), np.inf)
    l_t = supervised_loss(n_t[ok], d_t[ok], supervised)
    loss[ok] = distillation_loss(n_s[ok], d_s[ok], l_t, distillation, supervised)

    # Polish with SLSQP over all four log10 variables [N_S, D_S, N_T, D_T] with the budget as an equality.
    log_c = math.log10(compute)

    def unpack(y):
        ns = float(student_params) if fixed_ns else 10.0 ** y[0]
        return ns, 10.0 ** y[-3], 10.0 ** y[-2], 10.0 ** y[-1]

    def objective(y):
        ns, ds, nt, dt = unpack(y)
        return float(distillation_loss(ns, ds, supervised_loss(nt, dt, supervised), distillation, supervised))

    budget = {"type": "eq", "fun": lambda y: math.log10(_cost(acct, scenario, *unpack(y))) - log_c}
    cons = [budget]
    if not fixed_ns:  # log10 D_S - log10 N_S >= log10 M_min
        cons.append({"type": "ineq", "fun": lambda y: y[1] - y[0] - math.log10(min_tokens_per_param)})
    bounds = [(acct.lo, acct.hi)] * (3 if fixed_ns else 4)
    best_y, best_f = None, np.inf
    for i in np.argsort(loss)[:_POLISH]:
        if not np.isfinite(loss[i]):
            break
        y0 = ([] if fixed_ns else [pts[i, 0]]) + [math.log10(d_s[i]), pts[i, -2], pts[i, -1]]
        if loss[i] < best_f:
            best_y, best_f = np.array(y0), float(loss[i])
        res = minimize(objective, y0, method="SLSQP", bounds=bounds, constraints=cons,
                       options={"maxiter": 300, "ftol": 1e-12})
        feasible = abs(budget["fun"](res.x)) < 1e-6 and all(c["fun"](res.x) >= -1e-9 for c in cons[1:])
        if feasible and res.fun < best_f:
            best_y, best_f = res.x, float(res.fun)
    ns, ds, nt, dt = unpack(best_y)
    if scenario_deltas(scenario) == (0.0, 0.0):
        # Best case: only L_T matters and every (N_T, D_T) on its iso-loss curve is optimal; report the teacher
        # that reaches it with the least pretraining compute.
        nt, dt = cheapest_teacher(float(supervised_loss(nt, dt, supervised)), supervised, **accounting) or (nt, dt)
    lt = float(supervised_loss(nt, dt, supervised))
    sup = supervised_optimum(compute, student_params, supervised, min_tokens_per_param, **accounting)
    delta = best_f - sup["loss"]
    return Plan(compute=float(compute), scenario=scenario, student_params=float(ns), student_tokens=float(ds),
                teacher_params=float(nt), teacher_tokens=float(dt), teacher_loss=lt, student_loss=best_f,
                flops=float(_cost(acct, scenario, ns, ds, nt, dt)), supervised=sup, delta=float(delta),
                answer="distil" if delta < -TIE else "supervise")


def cheapest_teacher(loss: float, supervised: Mapping[str, float] = PAPER_SUPERVISED, **accounting):
    """(N, D) within the box reaching L(N, D) = loss with the least 3 F(N) D, or None if unreachable.

    Along the iso-loss curve D follows from Eq. 1: B / D^beta = ((L - E)^(1 / gamma) - A / N^alpha).
    """
    c, acct = supervised, Accounting(**accounting)
    n = np.logspace(acct.lo, acct.hi, 4001)
    rest = (max(loss - c["E"], 0.0)) ** (1.0 / c["gamma"]) - c["A"] / n ** c["alpha"]
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(rest > 0, (c["B"] / rest) ** (1.0 / c["beta"]), np.inf)
    ok = (d >= acct.bounds[0]) & (d <= acct.bounds[1])
    if not ok.any():
        return None
    cost = np.where(ok, acct.f(n) * d, np.inf)
    i = int(np.argmin(cost))
    return float(n[i]), float(d[i])


def crossover_compute(student_params: float, scenario: str = "best-case", lo: float = 1e19, hi: float = 1e27,
                      supervised: Mapping[str, float] = PAPER_SUPERVISED,
                      distillation: Mapping[str, float] = PAPER_DISTILLATION, points: int = 21,
                      **accounting) -> Optional[float]:
    """Smallest compute in [lo, hi] where supervised training of the fixed student matches distillation
    (delta = L_distil - L_supervised turns >= 0); None if distillation wins (or loses) throughout."""
    acct = Accounting(**accounting)
    per_token = 3.0 * acct.f(student_params)
    lo = max(lo, 1.0001 * per_token * acct.bounds[0])  # D_S within the box
    hi = min(hi, 0.9999 * per_token * acct.bounds[1])
    if lo >= hi:
        return None

    def delta(log_c):
        return plan(10.0 ** log_c, scenario, student_params, supervised, distillation, **accounting).delta

    xs = np.linspace(math.log10(lo), math.log10(hi), points)
    ds = [delta(x) for x in xs]
    for a, b, fa, fb in zip(xs[:-1], xs[1:], ds[:-1], ds[1:]):
        if fa < 0 <= fb:
            return float(10.0 ** brentq(delta, a, b, xtol=1e-4))
    return None


def allocation_curve(computes: Sequence[float], scenario: str = "best-case", student_params: Optional[float] = None,
                     supervised: Mapping[str, float] = PAPER_SUPERVISED,
                     distillation: Mapping[str, float] = PAPER_DISTILLATION, **accounting) -> List[Plan]:
    """plan() at each compute (the optimal allocation against compute of one scenario)."""
    return [plan(float(c), scenario, student_params, supervised, distillation, **accounting) for c in computes]


def answer_line(p: Plan) -> str:
    """The `--answer` line: distil or supervise, then L_distil - L_supervised (negative = distillation better)."""
    return f"{p.answer} {p.delta:+.6f}"


def scenarios() -> List[str]:
    return list(SCENARIOS)
