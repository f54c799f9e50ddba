"""Compute-optimal planner with the paper's Table 6 coefficients: PAPER.md's findings, budgets and bad input."""
import numpy as np
import pytest

from megadistill.errors import UserError
from megadistill.laws.flops import forward_flops_per_token, scenario_flops
from megadistill.laws.forms import distillation_loss, supervised_loss
from megadistill.laws.planner import answer_line, crossover_compute, plan, supervised_optimum


def test_plan_spends_the_budget_and_beats_its_own_grid():
    p = plan(1e21, "teacher-pretraining-inference", 1e9)
    assert p.flops == pytest.approx(1e21, rel=1e-5)
    assert p.flops == pytest.approx(scenario_flops(p.scenario, p.student_params, p.student_tokens,
                                                   p.teacher_params, p.teacher_tokens), rel=1e-12)
    assert p.teacher_loss == pytest.approx(supervised_loss(p.teacher_params, p.teacher_tokens))
    assert p.student_loss == pytest.approx(distillation_loss(1e9, p.student_tokens, p.teacher_loss))
    # No random feasible allocation does better than the optimum.
    rng = np.random.default_rng(0)
    n_t, d_t = 10 ** rng.uniform(7, 12, 2000), 10 ** rng.uniform(8, 13, 2000)
    f_s, f_t = forward_flops_per_token(1e9), forward_flops_per_token(n_t)
    d_s = (1e21 - 3 * f_t * d_t) / (3 * f_s + f_t)
    ok = d_s > 1e6
    losses = distillation_loss(1e9, d_s[ok], supervised_loss(n_t[ok], d_t[ok]))
    assert p.student_loss <= losses.min() + 1e-9


def test_supervised_alternative():
    s = supervised_optimum(1e22)
    assert s["params"] * 3 * forward_flops_per_token(s["params"]) * s["tokens"] / s["params"] == pytest.approx(1e22)
    n = np.geomspace(s["params"] / 3, s["params"] * 3, 41)
    assert s["loss"] <= supervised_loss(n, 1e22 / (3 * forward_flops_per_token(n))).min() + 1e-9
    fixed = supervised_optimum(1e22, 1e9)
    assert fixed["params"] == 1e9 and fixed["loss"] >= s["loss"]


@pytest.mark.parametrize("n_s", [1e9, 3e9])
def test_best_case_distillation_wins_small_compute_loses_large(n_s):
    small, large = plan(1e20, "best-case", n_s), plan(1e25, "best-case", n_s)
    assert small.answer == "distil" and small.delta < -0.01
    assert large.answer == "supervise" and large.delta >= 0
    assert answer_line(small).startswith("distil -") and answer_line(large).startswith("supervise +")
    # Best case: the teacher costs nothing, so the student spends the whole budget on its own tokens.
    assert small.student_tokens == pytest.approx(1e20 / (3 * forward_flops_per_token(n_s)), rel=1e-6)


def test_crossover_grows_with_student_size():
    xs = [crossover_compute(n, "best-case", 1e20, 1e26, points=7) for n in (1e9, 3e9, 1e10)]
    assert all(x is not None for x in xs)
    assert xs[0] < xs[1] < xs[2]
    assert abs(plan(xs[1], "best-case", 3e9).delta) < 1e-4  # it is where the two losses meet


@pytest.mark.parametrize("scenario", ["teacher-pretraining", "teacher-pretraining-inference"])
def test_counting_teacher_pretraining_distillation_never_wins(scenario):
    for n_s in (None, 3e8, 1e9, 3e9):
        for c in (1e21, 1e23, 1e25):
            if n_s and c < 3 * forward_flops_per_token(n_s) * n_s:
                continue  # below one token per parameter even for supervised training
            p = plan(c, scenario, n_s)
            assert p.delta >= -1e-6, (scenario, n_s, c, p.delta)
            assert p.answer == "supervise"


def test_teacher_inference_overtrains_the_teacher():
    for c in (1e20, 1e23):
        p = plan(c, "teacher-inference", 1e9)
        assert p.teacher_tokens == pytest.approx(1e17, rel=1e-6)  # D_T at its upper bound: pretraining is free
        assert p.teacher_tokens / p.teacher_params > 20 * 100  # far beyond Chinchilla's M = 20


def test_bad_budgets():
    with pytest.raises(UserError, match="too small"):
        plan(1e10, "best-case", 1e9)
    with pytest.raises(UserError, match="unknown scenario"):
        plan(1e21, "cheap-teacher")
    with pytest.raises(UserError, match="positive"):
        plan(-1.0)


def test_best_case_reports_the_cheapest_teacher_of_its_loss():
    from megadistill.laws.planner import cheapest_teacher
    n, d = cheapest_teacher(2.0)
    assert supervised_loss(n, d) == pytest.approx(2.0, rel=1e-9)
    cost = forward_flops_per_token(n) * d
    for f in (0.7, 1.4):  # other teachers of the same loss cost more
        n2 = n * f
        rest = (2.0 - 1.22) ** (1 / 0.452) - 3355 / n2 ** 0.408
        d2 = (18186 / rest) ** (1 / 0.431)
        assert forward_flops_per_token(n2) * d2 > cost
    p = plan(1e21, "best-case", 1e9)
    assert (p.teacher_params, p.teacher_tokens) == pytest.approx(cheapest_teacher(p.teacher_loss), rel=1e-6)
    assert cheapest_teacher(1.0) is None  # below E: no teacher reaches it
