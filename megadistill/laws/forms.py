"""The supervised (Eq. 1) and distillation (Eq. 8) laws: coefficients, log-space predictions, Jacobians, grids."""
from __future__ import annotations

import abc
import itertools
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from megadistill.errors import UserError

# PAPER.md Table 6 (natural units).
PAPER_SUPERVISED = {"E": 1.220, "A": 3355.0, "B": 18186.0, "alpha": 0.408, "beta": 0.431, "gamma": 0.452}
PAPER_DISTILLATION = {"A": 2243.0, "B": 24181.0, "alpha": 0.321, "beta": 0.637, "gamma": 0.764,
                      "c0": 2.549, "c1": 522.6, "f1": 0.090, "d1": 1.315}
# Epoch AI's Chinchilla Approach-3 replication (gamma fixed to 1), PAPER.md.
CHINCHILLA_EPOCH = {"E": 1.8172, "A": 477.9, "B": 2144.0, "alpha": 0.3473, "beta": 0.3672, "gamma": 1.0}

_F1_FLOOR = 1e-12  # f1 -> 0 is the hard-max limit of the smooth capacity-gap break; keep the division finite


@dataclass
class LawData:
    """Per-point inputs of a fit in log space; log_lt / log_ls (log L_T, log Ltilde_S) only for distillation."""
    log_n: np.ndarray  # [n]
    log_d: np.ndarray  # [n]
    log_y: np.ndarray  # [n] observed log loss
    log_lt: Optional[np.ndarray] = None  # [n]
    log_ls: Optional[np.ndarray] = None  # [n]

    def __len__(self) -> int:
        return len(self.log_y)

    def take(self, idx: np.ndarray) -> "LawData":
        pick = lambda a: None if a is None else a[idx]
        return LawData(self.log_n[idx], self.log_d[idx], self.log_y[idx], pick(self.log_lt), pick(self.log_ls))


def _softplus_scaled(z: np.ndarray, f1: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """g = f1 log(1 + exp(z / f1)) computed stably, with dg/df1 and sigmoid(z / f1).

    g = max(z, 0) + f1 log1p(exp(-|z| / f1));  dg/df1 = log1p(e^-|u|) + |u| sigmoid(-|u|), u = z / f1.
    """
    f = np.maximum(f1, _F1_FLOOR)
    au = np.abs(z) / f
    em = np.exp(-au)  # in (0, 1]: never overflows
    l1p = np.log1p(em)
    g = np.maximum(z, 0.0) + f * l1p
    sig_neg = em / (1.0 + em)  # sigmoid(-|u|)
    dg_df1 = l1p + au * sig_neg
    sig = np.where(z >= 0, 1.0 - sig_neg, sig_neg)  # sigmoid(u)
    return g, dg_df1, sig


def _columns(theta: np.ndarray):
    """Coefficient columns broadcastable against per-point arrays: [P] -> P scalars, [S, P] -> P arrays [S, 1]."""
    theta = np.asarray(theta, dtype=np.float64)
    return list(theta) if theta.ndim == 1 else [theta[:, i, None] for i in range(theta.shape[1])]


class LawForm(abc.ABC):
    """A law in log space: names of its coefficients (logs where positive scale factors), bounds, grids."""
    name: str = ""
    params: Tuple[str, ...] = ()
    log_params: Tuple[str, ...] = ()  # internal "log_X" stored for natural "X"
    bounds: Dict[str, Tuple[float, float]] = {}
    outer: Tuple[str, ...] = ()  # grid factorisation: per-point feature from outer params ...
    inner: Tuple[str, ...] = ()  # ... combined with every inner-param combination
    grids: Dict[str, Dict[str, Sequence[float]]] = {}

    # -- natural <-> internal coefficients -------------------------------------------------------------
    def natural_name(self, p: str) -> str:
        return p[4:] if p.startswith("log_") else p

    def internal_name(self, natural: str) -> str:
        for p in self.params:
            if self.natural_name(p) == natural or p == natural:
                return p
        raise UserError(f"{self.name} law has no coefficient {natural!r}; "
                        f"coefficients: {[self.natural_name(p) for p in self.params]}")

    def to_internal(self, coeffs: Mapping[str, float]) -> np.ndarray:
        missing = [self.natural_name(p) for p in self.params if self.natural_name(p) not in coeffs]
        if missing:
            raise UserError(f"{self.name} coefficients are missing {missing}")
        out = []
        for p in self.params:
            v = float(coeffs[self.natural_name(p)])
            if p.startswith("log_"):
                if v <= 0:
                    raise UserError(f"{self.name} coefficient {self.natural_name(p)}={v} must be > 0")
                v = np.log(v)
            out.append(v)
        return np.array(out)

    def to_natural(self, theta: np.ndarray) -> Dict[str, float]:
        return {self.natural_name(p): float(np.exp(v) if p.startswith("log_") else v)
                for p, v in zip(self.params, theta)}

    def fix_value(self, natural: str, value: float) -> Tuple[str, float]:
        """(internal name, internal value) of a `--fix NAME=VALUE` given in natural units."""
        p = self.internal_name(natural)
        if p.startswith("log_"):
            if value <= 0:
                raise UserError(f"--fix {natural}={value}: {natural} must be > 0")
            return p, float(np.log(value))
        return p, float(value)

    def grid_axes(self, grid: str | Mapping[str, Sequence[float]]) -> Dict[str, np.ndarray]:
        """Start values per internal parameter from a named grid or a mapping (keys internal or natural)."""
        if isinstance(grid, str):
            if grid not in self.grids:
                raise UserError(f"grid {grid!r} is not defined for the {self.name} law; "
                                f"choose one of {list(self.grids)} or give a grid file")
            grid = self.grids[grid]
        axes = {}
        for key, values in grid.items():
            p = key if key in self.params else self.internal_name(key)
            vals = np.atleast_1d(np.asarray(values, dtype=np.float64))
            if vals.size == 0 or not np.all(np.isfinite(vals)):
                raise UserError(f"grid values for {key!r} must be a non-empty list of finite numbers")
            axes[p] = vals
        missing = [p for p in self.params if p not in axes]
        if missing:
            raise UserError(f"grid for the {self.name} law lacks start values for {missing}")
        return axes

    # -- maths of each law ------------------------------------------------------------------------------
    @abc.abstractmethod
    def outer_feature(self, th: Dict[str, np.ndarray], x: LawData) -> np.ndarray:
        """Per-point term of the outer coefficients, broadcast over their leading dims: [..., n]."""

    @abc.abstractmethod
    def inner_feature(self, th: Dict[str, np.ndarray], x: LawData) -> np.ndarray:
        """Per-point term of the inner coefficients: [..., n] (or [..., 1] when it does not depend on the point)."""

    @abc.abstractmethod
    def combine(self, f: np.ndarray, g: np.ndarray, th_in: Dict[str, np.ndarray], x: LawData) -> np.ndarray:
        """Predicted log loss from the outer and inner terms (broadcasting)."""

    @abc.abstractmethod
    def log_pred_jac(self, theta: np.ndarray, x: LawData, jac: bool = True):
        """(log prediction [(S,) n], d log prediction / d theta [(S,) n, P] or None) for theta [P] or [S, P]."""

    def log_pred(self, theta: np.ndarray, x: LawData) -> np.ndarray:
        """Predicted log loss for one coefficient vector [P] -> [n], or a batch [S, P] -> [S, n]."""
        return self.log_pred_jac(theta, x, jac=False)[0]

    def grid_split(self, axes: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Cartesian products of the outer and inner axes: ([nO, Po], [nI, Pi]) in `outer` / `inner` order."""
        prod = lambda names: np.array(list(itertools.product(*[axes[p] for p in names])), dtype=np.float64)
        return prod(self.outer).reshape(-1, len(self.outer)), prod(self.inner).reshape(-1, len(self.inner))

    def assemble(self, outer_rows: np.ndarray, inner_rows: np.ndarray) -> np.ndarray:
        """Full coefficient vectors [k, P] from matching outer [k, Po] and inner [k, Pi] rows."""
        by_name = {p: outer_rows[:, i] for i, p in enumerate(self.outer)}
        by_name.update({p: inner_rows[:, i] for i, p in enumerate(self.inner)})
        return np.stack([by_name[p] for p in self.params], axis=1)


class SupervisedForm(LawForm):
    """log L = LSE(log E, gamma LSE(log A - alpha log N, log B - beta log D))  (Eq. 1 in log space)."""
    name = "supervised"
    params = ("log_A", "log_B", "log_E", "alpha", "beta", "gamma")
    bounds = {"log_A": (-30.0, 80.0), "log_B": (-30.0, 80.0), "log_E": (-10.0, 10.0),
              "alpha": (0.0, 10.0), "beta": (0.0, 10.0), "gamma": (0.0, 10.0)}
    outer = ("log_A", "log_B", "alpha", "beta")
    inner = ("log_E", "gamma")
    grids = {
        "paper": {"log_A": [0, 5, 10, 15, 20], "log_B": [0, 5, 10, 15, 20], "log_E": [-1, -0.5, 0, 0.5, 1, 1.5],
                  "alpha": [0, 0.5, 1, 1.5], "beta": [0, 0.5, 1, 1.5], "gamma": [0, 0.5, 1, 1.5]},
        "chinchilla": {"log_A": [0, 5, 10, 15, 20, 25], "log_B": [0, 5, 10, 15, 20, 25],
                       "log_E": [-1, -0.5, 0, 0.5, 1], "alpha": [0, 0.5, 1, 1.5, 2], "beta": [0, 0.5, 1, 1.5, 2],
                       "gamma": [1.0]},
    }

    def outer_feature(self, th, x):
        return np.logaddexp(th["log_A"] - th["alpha"] * x.log_n, th["log_B"] - th["beta"] * x.log_d)  # s [.., n]

    def inner_feature(self, th, x):
        return th["log_E"]

    def combine(self, f, g, th_in, x):
        return np.logaddexp(g, th_in["gamma"] * f)

    def log_pred_jac(self, theta, x, jac=True):
        a, b, e, alpha, beta, gamma = _columns(theta)
        u1, u2 = a - alpha * x.log_n, b - beta * x.log_d
        s = np.logaddexp(u1, u2)
        t = gamma * s
        pred = np.logaddexp(e, t)
        if not jac:
            return pred, None
        p_e, p_t = np.exp(e - pred), np.exp(t - pred)  # softmax weights of the outer LSE
        w1, w2 = np.exp(u1 - s), np.exp(u2 - s)  # softmax weights of the inner LSE
        j = np.stack(np.broadcast_arrays(p_t * gamma * w1, p_t * gamma * w2, p_e, -p_t * gamma * w1 * x.log_n,
                                         -p_t * gamma * w2 * x.log_d, p_t * s), axis=-1)  # [(S,) n, 6]
        return pred, j


class DistillationForm(LawForm):
    """log L_S = LSE(log L_T, -c0 log L_T - c1 f1 softplus((log L_T - log Ltilde_S - log d1) / f1)
    + gamma LSE(log A - alpha log N_S, log B - beta log D_S))  (Eq. 8 in log space)."""
    name = "distillation"
    params = ("log_A", "log_B", "alpha", "beta", "gamma", "c0", "c1", "f1", "log_d1")
    bounds = {"log_A": (-30.0, 80.0), "log_B": (-30.0, 80.0), "alpha": (0.0, 10.0), "beta": (0.0, 10.0),
              "gamma": (0.0, 10.0), "c0": (-20.0, 20.0), "c1": (0.0, 1e4), "f1": (0.0, 10.0), "log_d1": (-10.0, 10.0)}
    outer = ("log_A", "log_B", "alpha", "beta", "gamma")
    inner = ("c0", "c1", "f1", "log_d1")
    grids = {
        "paper": {"log_A": [0, 5, 10, 15, 20], "log_B": [0, 5, 10, 15, 20], "alpha": [0, 0.5, 1],
                  "beta": [0, 0.5, 1], "gamma": [0, 0.5, 1], "c0": [0, 0.5, 1, 1.5], "c1": [0, 0.5, 1, 1.5],
                  "f1": [0, 0.5, 1, 1.5], "log_d1": [-1, -0.5, 0, 0.5, 1]},
    }

    def outer_feature(self, th, x):
        s = np.logaddexp(th["log_A"] - th["alpha"] * x.log_n, th["log_B"] - th["beta"] * x.log_d)
        return th["gamma"] * s  # K [.., n]

    def inner_feature(self, th, x):
        g = _softplus_scaled(x.log_lt - x.log_ls - th["log_d1"], th["f1"])[0]
        return -th["c0"] * x.log_lt - th["c1"] * g  # T [.., n]

    def combine(self, f, g, th_in, x):
        return np.logaddexp(x.log_lt, f + g)

    def log_pred_jac(self, theta, x, jac=True):
        a, b, alpha, beta, gamma, c0, c1, f1, ld1 = _columns(theta)
        u1, u2 = a - alpha * x.log_n, b - beta * x.log_d
        s = np.logaddexp(u1, u2)
        g, dg_df1, sig = _softplus_scaled(x.log_lt - x.log_ls - ld1, f1)
        t = -c0 * x.log_lt - c1 * g + gamma * s
        pred = np.logaddexp(x.log_lt, t)
        if not jac:
            return pred, None
        q = np.exp(t - pred)  # weight of the student term in the outer LSE
        w1, w2 = np.exp(u1 - s), np.exp(u2 - s)
        j = np.stack(np.broadcast_arrays(q * gamma * w1, q * gamma * w2, -q * gamma * w1 * x.log_n,
                                         -q * gamma * w2 * x.log_d, q * s, -q * x.log_lt, -q * g, -q * c1 * dg_df1,
                                         q * c1 * sig), axis=-1)  # [(S,) n, 9]
        return pred, j


SUPERVISED = SupervisedForm()
DISTILLATION = DistillationForm()
FORMS = {"supervised": SUPERVISED, "distillation": DISTILLATION}


def get_form(law: str) -> LawForm:
    try:
        return FORMS[law]
    except KeyError:
        raise UserError(f"unknown law {law!r}; choose one of {list(FORMS)}") from None


def supervised_loss(n, d, coeffs: Mapping[str, float] = PAPER_SUPERVISED):
    """L(N, D) = E + (A / N^alpha + B / D^beta)^gamma, elementwise over arrays."""
    c = coeffs
    n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
    out = c["E"] + (c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]) ** c.get("gamma", 1.0)
    return float(out) if out.ndim == 0 else out


def distillation_loss(n_s, d_s, l_t, coeffs: Mapping[str, float] = PAPER_DISTILLATION,
                      supervised: Mapping[str, float] = PAPER_SUPERVISED, l_tilde=None):
    """L_S(N_S, D_S, L_T) of Eq. 8, Ltilde_S = L(N_S, D_S) from `supervised` unless given; elementwise."""
    n_s, d_s = np.asarray(n_s, dtype=np.float64), np.asarray(d_s, dtype=np.float64)
    l_t = np.asarray(l_t, dtype=np.float64)
    l_tilde = supervised_loss(n_s, d_s, supervised) if l_tilde is None else np.asarray(l_tilde, dtype=np.float64)
    x = LawData(np.log(n_s), np.log(d_s), np.zeros(np.broadcast(n_s, d_s, l_t).shape),
                np.log(l_t), np.log(l_tilde))
    th = {p: v for p, v in zip(DISTILLATION.params, DISTILLATION.to_internal(coeffs))}
    out = np.exp(DISTILLATION.combine(DISTILLATION.outer_feature(th, x), DISTILLATION.inner_feature(th, x), th, x))
    return float(out) if out.ndim == 0 else out
