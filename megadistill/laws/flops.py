"""Compute accounting of PAPER.md (Eq. 9, Eq. 69): forward FLOPs per token and the total FLOPs of distillation."""
from __future__ import annotations

from typing import Dict, Tuple, Union

import numpy as np

from megadistill.errors import UserError

ArrayLike = Union[float, int, np.ndarray]

# Paper defaults: context 4096, vocabulary 32768, aspect ratio rho = d_model / n_layers = 128, omega = 12.
N_CTX = 4096
N_VOCAB = 32768
RHO = 128.0
OMEGA = 12.0

# name -> (delta_Lgt, delta_Pre): whether teacher inference on the student tokens and teacher pretraining are paid.
SCENARIOS: Dict[str, Tuple[float, float]] = {
    "best-case": (0.0, 0.0),
    "teacher-inference": (1.0, 0.0),
    "teacher-pretraining": (0.0, 1.0),
    "teacher-pretraining-inference": (1.0, 1.0),
}


def scenario_deltas(scenario: str) -> Tuple[float, float]:
    """(delta_Lgt, delta_Pre) of a named scenario; UserError listing the names if unknown."""
    try:
        return SCENARIOS[scenario]
    except KeyError:
        raise UserError(f"unknown scenario {scenario!r}; choose one of {list(SCENARIOS)}") from None


def forward_flops_per_token(n_params: ArrayLike, n_ctx: int = N_CTX, n_vocab: int = N_VOCAB,
                            rho: float = RHO, omega: float = OMEGA) -> ArrayLike:
    """F(N) = 2N (1 + sigma1 n_ctx / N^(1/3) + sigma2 n_vocab / N^(2/3)): forward FLOPs per token of a size-N model.

    sigma1 = (1 / (rho omega^2))^(1/3) counts causal attention scores, sigma2 = (rho / omega)^(1/3) the
    embedding / unembedding matmul, both expressed through N = omega n_layers d_model^2 with d_model = rho n_layers.
    Works elementwise on numpy arrays.
    """
    n = np.asarray(n_params, dtype=np.float64)
    sigma1 = (1.0 / (rho * omega ** 2)) ** (1.0 / 3.0)
    sigma2 = (rho / omega) ** (1.0 / 3.0)
    out = 2.0 * n * (1.0 + sigma1 * n_ctx / np.cbrt(n) + sigma2 * n_vocab / np.cbrt(n) ** 2)
    return float(out) if out.ndim == 0 else out


def training_flops(student_params: ArrayLike, student_tokens: ArrayLike,
                   teacher_params: ArrayLike = 0.0, teacher_tokens: ArrayLike = 0.0,
                   delta_lgt: float = 0.0, delta_pre: float = 0.0, n_ctx: int = N_CTX,
                   n_vocab: int = N_VOCAB, rho: float = RHO, omega: float = OMEGA,
                   students_per_cache: float = 1.0) -> ArrayLike:
    """FLOPs = 3 F(N_S) D_S + F(N_T) (delta_Lgt D_S / n_cache + delta_Pre 3 D_T)  (PAPER.md total).

    3 F: one forward plus a backward costing two forwards. delta_Lgt = 1 pays the teacher forward on every
    student token (teacher logits), delta_Pre = 1 pays the teacher's own pretraining on D_T tokens.
    students_per_cache = n_cache: students distilled from one offline teacher cache (`megadistill teacher-cache`)
    share its forward, so each pays 1 / n_cache of it (1: the paper's co-resident teacher).
    A supervised run is training_flops(N, D). Works elementwise on numpy arrays.
    """
    check_students_per_cache(students_per_cache)
    delta_lgt = delta_lgt / students_per_cache
    kw = dict(n_ctx=n_ctx, n_vocab=n_vocab, rho=rho, omega=omega)
    d_s = np.asarray(student_tokens, dtype=np.float64)
    total = 3.0 * np.asarray(forward_flops_per_token(student_params, **kw)) * d_s
    if delta_lgt or delta_pre:
        f_t = np.asarray(forward_flops_per_token(teacher_params, **kw))
        total = total + f_t * (delta_lgt * d_s + delta_pre * 3.0 * np.asarray(teacher_tokens, dtype=np.float64))
    return float(total) if np.ndim(total) == 0 else total


def check_students_per_cache(n: float) -> None:
    if not n >= 1:
        raise UserError(f"students_per_cache={n!r} must be >= 1 (students sharing one teacher cache)")


def scenario_flops(scenario: str, student_params: ArrayLike, student_tokens: ArrayLike,
                   teacher_params: ArrayLike = 0.0, teacher_tokens: ArrayLike = 0.0,
                   students_per_cache: float = 1.0) -> ArrayLike:
    """training_flops with the (delta_Lgt, delta_Pre) of a named scenario (see SCENARIOS)."""
    d_lgt, d_pre = scenario_deltas(scenario)
    return training_flops(student_params, student_tokens, teacher_params, teacher_tokens, d_lgt, d_pre,
                          students_per_cache=students_per_cache)


def tokens_for_compute(n_params: ArrayLike, compute: ArrayLike) -> ArrayLike:
    """D such that a supervised run of a size-N model costs `compute`: D = C / (3 F(N)) (IsoFLOP profiles)."""
    d = np.asarray(compute, dtype=np.float64) / (3.0 * np.asarray(forward_flops_per_token(n_params)))
    return float(d) if d.ndim == 0 else d
