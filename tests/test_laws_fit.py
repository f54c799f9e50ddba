"""Law fits: analytic Jacobians, the grid scorer, Chinchilla reproduction, simulation recovery, bootstrap, bad input."""
import csv
import time

import numpy as np
import pytest

from megadistill.errors import UserError
from megadistill.laws import api
from megadistill.laws.fit import FitResult, fit_law, random_grid_starts
from megadistill.laws.forms import (CHINCHILLA_EPOCH, DISTILLATION, PAPER_DISTILLATION, PAPER_SUPERVISED,
                                    SUPERVISED, LawData, distillation_loss, supervised_loss)
from megadistill.laws.lm import lm_batch
from megadistill.laws.search import Problem
from megadistill.laws.simulate import PAPER_SIZES, extrapolation_split, simulate


def _random_data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return LawData(np.log(rng.uniform(1e8, 1e10, n)), np.log(rng.uniform(1e9, 1e11, n)), np.log(rng.uniform(2, 3, n)),
                   np.log(rng.uniform(2, 3, n)), np.log(rng.uniform(2, 3, n)))


@pytest.mark.parametrize("form,theta", [
    (SUPERVISED, [8.0, 9.0, 0.2, 0.4, 0.4, 0.5]),
    (DISTILLATION, [7.7, 10.1, 0.32, 0.63, 0.76, 2.5, 5.0, 0.3, 0.27]),
    (DISTILLATION, [7.7, 10.1, 0.32, 0.63, 0.76, 2.5, 500.0, 0.0, 0.27]),  # f1 = 0: the hard-max limit
])
def test_jacobian_matches_finite_differences(form, theta):
    x, theta = _random_data(), np.array(theta)
    pred, jac = form.log_pred_jac(theta, x)
    for i in range(len(theta)):
        if theta[i] == 0.0 and form.params[i] == "f1":
            continue  # one-sided at the bound
        e = np.zeros_like(theta)
        e[i] = 1e-6 * max(1.0, abs(theta[i]))
        num = (form.log_pred(theta + e, x) - form.log_pred(theta - e, x)) / (2 * e[i])
        np.testing.assert_allclose(jac[:, i], num, rtol=1e-5, atol=1e-8, err_msg=form.params[i])
    batch = np.stack([theta, theta * 1.05])
    pb, jb = form.log_pred_jac(batch, x)
    np.testing.assert_allclose(pb[0], pred, rtol=1e-14)
    np.testing.assert_allclose(jb[1], form.log_pred_jac(theta * 1.05, x)[1], rtol=1e-14)


def test_forms_match_the_natural_laws():
    n, d, lt = np.array([1e8, 3e9]), np.array([2e9, 6e10]), np.array([2.4, 2.1])
    x = LawData(np.log(n), np.log(d), np.zeros(2), np.log(lt), np.log(supervised_loss(n, d)))
    ref_s = PAPER_SUPERVISED["E"] + (3355 / n ** 0.408 + 18186 / d ** 0.431) ** 0.452
    np.testing.assert_allclose(np.exp(SUPERVISED.log_pred(SUPERVISED.to_internal(PAPER_SUPERVISED), x)), ref_s)
    c = PAPER_DISTILLATION
    lts = supervised_loss(n, d)
    ref_d = lt + lt ** -c["c0"] * (1 + (lt / (lts * c["d1"])) ** (1 / c["f1"])) ** (-c["c1"] * c["f1"]) * (
        c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]) ** c["gamma"]
    np.testing.assert_allclose(distillation_loss(n, d, lt), ref_d, rtol=1e-12)


def test_grid_scorer_and_lm_agree_with_the_objective():
    x = _random_data(30)
    problem = Problem(DISTILLATION, x, 1e-3, {})
    axes = DISTILLATION.grid_axes({"log_A": [0, 5], "log_B": [5, 10], "alpha": [0.5], "beta": [0.5, 1],
                                   "gamma": [1], "c0": [0, 1], "c1": [0.5], "f1": [0, 0.5], "log_d1": [0, 1]})
    outer, inner = DISTILLATION.grid_split(axes)
    obj = problem.grid_block(outer, inner)  # [nO, nI]
    oi, ii = np.unravel_index(np.arange(obj.size), obj.shape)
    direct = [problem.objective(t) for t in DISTILLATION.assemble(outer[oi], inner[ii])]
    np.testing.assert_allclose(obj.ravel(), direct, rtol=2e-4)
    theta, f = lm_batch(problem, DISTILLATION.assemble(outer[oi[:4]], inner[ii[:4]]), iters=20)
    assert np.all(f <= obj.ravel()[:4] * (1 + 1e-12))  # descent only
    np.testing.assert_allclose(f, [problem.objective(t) for t in theta], rtol=1e-12)


def _chinchilla_rows(path):
    with open(path, newline="") as fh:
        pts = [(float(r["Model Size"]), float(r["Training FLOP"]), float(r["loss"])) for r in csv.DictReader(fh)]
    pts = sorted(pts, key=lambda p: p[2])[:-5]  # Epoch drops the 5 highest-loss points
    return [{"mode": "supervised", "params": n, "tokens": c / (6 * n), "eval_loss": loss, "teacher_loss": None}
            for n, c, loss in pts]


def test_chinchilla_reproduction(shared_data_dir):
    path = shared_data_dir / "chinchilla_svg_extracted_data.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent (shared data, not part of the repository)")
    rows = _chinchilla_rows(path)
    assert len(rows) == 240
    t = time.perf_counter()
    fit = api.fit_supervised(rows, fix={"gamma": 1}, huber_delta=1e-3, grid="chinchilla")
    secs = time.perf_counter() - t
    got, ref = fit.coefficients, CHINCHILLA_EPOCH
    for k in ("E", "alpha", "beta"):
        assert got[k] == pytest.approx(ref[k], rel=0.01), k
    for k in ("A", "B"):
        assert got[k] == pytest.approx(ref[k], rel=0.05), k
    assert got["gamma"] == 1.0 and fit.fixed == {"gamma": 1.0} and fit.n_starts == 4500
    print(f"chinchilla fit {secs:.1f}s: {got}")


def test_supervised_recovery_and_bootstrap():
    rng = np.random.default_rng(1)
    n = np.repeat(np.geomspace(1e8, 1e10, 8), 6)
    d = n * np.tile(np.geomspace(5, 400, 6), 8)
    loss = supervised_loss(n, d) * (1 + 0.003 * rng.standard_normal(len(n)))
    rows = [{"mode": "supervised", "params": a, "tokens": b, "eval_loss": c} for a, b, c in zip(n, d, loss)]
    small = [r for r in rows if r["params"] < 4e9]
    fit = api.fit_supervised(small, bootstrap=64)
    pred = api.predict_rows(fit, [r for r in rows if r["params"] >= 4e9])
    assert api.error_summary(pred)["mean_rel_error"] < 0.01
    for k, (lo, hi) in fit.intervals.items():
        assert lo <= hi and np.isfinite([lo, hi]).all(), k
    assert fit.intervals["E"][0] <= fit.coefficients["E"] * 1.05 and fit.n_bootstrap == 64


def test_distillation_simulation_extrapolates():
    # PAPER.md Table 6 laws, 0.3% noise, teachers 143M-12.6B at M_T = 20, students at M in {20..320}.
    rows = simulate(teacher_params=list(PAPER_SIZES.values()), student_params=list(PAPER_SIZES.values())[:8],
                    seed=3)
    train, test = extrapolation_split(rows, 1e9)  # fit students <= 975M, predict 1.82B and 2.72B
    fit = api.fit_distillation(train)
    err = api.error_summary(api.predict_rows(fit, test))
    assert err["n"] == 2 * 5 * 11
    assert err["mean_rel_error"] < 0.01, err
    assert fit.residuals["mean_rel_error"] < 0.005 and fit.n_starts == 216000


def test_plain_loop_mode_and_fast_mode_no_worse():
    rows = simulate(teacher_params=[2e8, 8e8, 3e9], student_params=[1e8, 4e8], student_ratios=(20, 80), seed=2)
    sup = PAPER_SUPERVISED
    starts = random_grid_starts("distillation", "paper", 24, seed=5)
    slow = api.fit_distillation(rows, sup, starts=starts, workers=1)
    fast = api.fit_distillation(rows, sup, workers=1, n_top=32, n_random=32, n_refine=4)
    assert slow.n_starts == 24 and fast.n_starts == 216000
    assert fast.objective <= slow.objective * (1 + 1e-6)  # equal minima agree to ~1e-8 (L-BFGS-B ftol)


def test_fit_result_roundtrip_and_errors(tmp_path):
    x = _random_data(12)
    fit = fit_law("supervised", x, grid={"log_A": [5], "log_B": [5], "log_E": [0], "alpha": [0.3], "beta": [0.3],
                                         "gamma": [0.5]}, workers=1)
    assert fit.grid == "custom" and fit.n_starts == 1
    back = FitResult.load(fit.save(tmp_path / "fit.json"))
    assert back.coefficients == fit.coefficients and back.law == "supervised"
    with pytest.raises(UserError, match="needs at least 5 points; got 4"):
        fit_law("supervised", x.take(np.arange(4)), fix={"gamma": 1}, workers=1)
    with pytest.raises(UserError, match="no coefficient 'zeta'"):
        fit_law("supervised", x, fix={"zeta": 1}, workers=1)
    with pytest.raises(UserError, match="grid 'chinchilla' is not defined for the distillation law"):
        fit_law("distillation", x, grid="chinchilla", workers=1)
    (tmp_path / "bad.json").write_text('{"law": "supervised", "coefficients": {"A": 1}}')
    with pytest.raises(UserError, match="missing"):
        FitResult.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="no such fit file"):
        FitResult.load(tmp_path / "none.json")


@pytest.mark.slow
def test_full_grid_fit_no_worse_than_exhaustive_500():
    # The speed/quality bar on 700 simulated points (tools/bench_fit.py reports the timings).
    from megadistill.laws.simulate import student_sizes
    rows = simulate(teacher_params=list(PAPER_SIZES.values())[1:], student_params=student_sizes(14), seed=0)
    sup = api.fit_supervised(rows)
    t = time.perf_counter()
    fast = api.fit_distillation(rows, sup)
    secs = time.perf_counter() - t
    slow = api.fit_distillation(rows, sup, starts=random_grid_starts("distillation", "paper", 500, seed=1000))
    assert fast.n_points == 700 and fast.n_starts == 216000
    assert fast.objective <= slow.objective * (1 + 1e-6)
    print(f"full grid {secs:.1f}s objective {fast.objective:.6g}; exhaustive-500 {slow.seconds:.1f}s "
          f"objective {slow.objective:.6g}")


def test_points_that_cannot_identify_the_law_say_so(tmp_path, caplog):
    """One model size (any alpha fits, A absorbs it) or one teacher: the fit says which coefficients, and how many
    distinct values it needs; a grid over 3 sizes x 3 token counts x 2 teachers identifies everything."""
    from megadistill.laws.commands import format_fit
    from megadistill.laws.fit import identifiability
    n, d = np.meshgrid(np.log([1e8, 3e8, 1e9]), np.log([1e9, 3e9, 1e10]))
    n, d = np.tile(n.ravel(), 2), np.tile(d.ravel(), 2)
    lt = np.log(np.repeat([2.2, 2.6], 9))
    ly = np.log(supervised_loss(np.exp(n), np.exp(d)))
    full = LawData(n, d, ly, lt, ly)
    assert identifiability("supervised", full) == [] and identifiability("distillation", full) == []
    one_size = full.take(np.flatnonzero(n == n[0]))  # 6 points, all at N = 1e8
    caplog.set_level("WARNING")
    fit = fit_law("supervised", one_size, grid={"log_A": [5], "log_B": [5], "log_E": [0], "alpha": [0.3],
                                                "beta": [0.3], "gamma": [1]}, fix={"gamma": 1}, workers=1)
    assert len(fit.warnings) == 1, fit.warnings
    assert "A, alpha need points at >= 3 distinct N values" in fit.warnings[0] and "have 1" in fit.warnings[0]
    assert fit.warnings[0] in caplog.text and f"warning: {fit.warnings[0]}" in format_fit(fit)
    assert FitResult.load(fit.save(tmp_path / "fit.json")).warnings == fit.warnings
    # a fixed exponent needs one distinct value fewer; two sizes then suffice
    two_sizes = full.take(np.flatnonzero(n != n.max()))
    assert identifiability("supervised", two_sizes, {"alpha": 0.3}) == []
    assert "need points at >= 3 distinct N values" in identifiability("supervised", two_sizes)[0]
    one_teacher = full.take(np.arange(9))
    w = identifiability("distillation", one_teacher)
    assert len(w) == 1 and "c0, c1, f1, d1 need points at >= 2 distinct L_T values" in w[0], w
