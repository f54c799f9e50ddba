"""PAPER.md compute accounting: F(N) against the architecture's matmul count, scenario totals, IsoFLOP tokens."""
import numpy as np
import pytest

from megadistill.errors import UserError
from megadistill.laws.flops import (SCENARIOS, forward_flops_per_token, scenario_deltas, scenario_flops,
                                    tokens_for_compute, training_flops)


@pytest.mark.parametrize("n_layers", [8, 14, 40])
def test_forward_flops_matches_matmul_count(n_layers):
    # With d_model = rho L and N = omega L d^2, F(N) = 2N + 2 n_ctx L d (causal QK^T and AV) + 2 V d (unembedding).
    rho, omega, n_ctx, vocab = 128, 12, 4096, 32768
    d = rho * n_layers
    n = omega * n_layers * d ** 2
    expected = 2 * n + 2 * n_ctx * n_layers * d + 2 * vocab * d
    np.testing.assert_allclose(forward_flops_per_token(n), expected, rtol=1e-12)


def test_forward_flops_value_and_vectorised():
    sigma1, sigma2 = (1 / (128 * 144)) ** (1 / 3), (128 / 12) ** (1 / 3)
    n = 1e9
    ref = 2 * n * (1 + sigma1 * 4096 / n ** (1 / 3) + sigma2 * 32768 / n ** (2 / 3))
    assert forward_flops_per_token(n) == pytest.approx(ref, rel=1e-12)
    assert forward_flops_per_token(n) == pytest.approx(2.45441e9, rel=1e-4)
    arr = forward_flops_per_token(np.array([1e8, 1e9]))
    assert arr.shape == (2,) and arr[1] == pytest.approx(ref, rel=1e-12)
    assert forward_flops_per_token(n, n_ctx=0, n_vocab=0) == pytest.approx(2 * n)


def test_training_flops_scenarios():
    ns, ds, nt, dt = 5e8, 1e10, 3e9, 6e10
    fs, ft = forward_flops_per_token(ns), forward_flops_per_token(nt)
    assert training_flops(ns, ds) == pytest.approx(3 * fs * ds)
    expect = {"best-case": 3 * fs * ds, "teacher-inference": 3 * fs * ds + ft * ds,
              "teacher-pretraining": 3 * fs * ds + 3 * ft * dt,
              "teacher-pretraining-inference": 3 * fs * ds + ft * ds + 3 * ft * dt}
    assert set(expect) == set(SCENARIOS)
    for sc, v in expect.items():
        assert scenario_flops(sc, ns, ds, nt, dt) == pytest.approx(v, rel=1e-12)
        d_lgt, d_pre = scenario_deltas(sc)
        assert training_flops(ns, ds, nt, dt, d_lgt, d_pre) == pytest.approx(v, rel=1e-12)
    with pytest.raises(UserError, match="unknown scenario"):
        scenario_deltas("free-lunch")


def test_tokens_for_compute_inverts_supervised_cost():
    n = np.array([1e7, 1e8, 1e9])
    d = tokens_for_compute(n, 1e20)
    np.testing.assert_allclose(training_flops(n, d), 1e20, rtol=1e-12)


def test_students_sharing_a_teacher_cache_pay_its_forward_once():
    n_s, d_s, n_t = 1e8, 2e9, 1e9
    one = training_flops(n_s, d_s, n_t, 0.0, delta_lgt=1.0)
    four = training_flops(n_s, d_s, n_t, 0.0, delta_lgt=1.0, students_per_cache=4)
    student_only = training_flops(n_s, d_s)
    teacher_fwd = forward_flops_per_token(n_t) * d_s
    assert one - student_only == pytest.approx(teacher_fwd, rel=1e-12)
    assert 4 * (four - student_only) == pytest.approx(teacher_fwd, rel=1e-12)  # four students: one forward in all
    assert scenario_flops("teacher-inference", n_s, d_s, n_t, students_per_cache=4) == pytest.approx(four, rel=1e-12)
    with pytest.raises(UserError, match="students_per_cache"):
        training_flops(n_s, d_s, n_t, 0.0, delta_lgt=1.0, students_per_cache=0.5)


def test_planner_and_aggregate_share_the_cache():
    from megadistill.laws.planner import plan
    from megadistill.laws.records import share_cache_flops
    p1 = plan(1e21, "teacher-inference", 1e9)
    p8 = plan(1e21, "teacher-inference", 1e9, students_per_cache=8)
    assert p8.flops == pytest.approx(1e21, rel=1e-3) and p1.flops == pytest.approx(1e21, rel=1e-3)
    assert p8.student_loss <= p1.student_loss + 1e-9  # a cheaper teacher forward never hurts the student
    rows = [{"run": r, "tokens": 1000, "flops": 5.0, "teacher_cache": "c1", "cache_flops_per_token": 2.0}
            for r in ("a", "b")] + [{"run": "c", "tokens": 1000, "flops": 5.0, "teacher_cache": None}]
    out = share_cache_flops(rows)
    assert [r["flops"] for r in out] == [1005.0, 1005.0, 5.0]  # 2 x 1000 teacher FLOPs paid once over a and b
