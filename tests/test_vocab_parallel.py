"""Vocab-parallel CE / KL / z-loss at TP=1, 2, 4 against dense single-process references in plain torch."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from dist_harness import run_distributed
from megadistill.errors import UserError
from megadistill.parallel import vocab_parallel as vp

V = 64  # global vocab; TP=4 gives 16 columns per rank
SHAPE = (3, 5)  # [b, s] tokens


# ------------------------------------------------------------------------------------------- dense references

def _up(x):
    """The references compute in fp32, or in fp64 for fp64 inputs (as the losses must)."""
    return x.double() if x.dtype == torch.float64 else x.float()


def ref_teacher_probs(zt, tau, top_k=None, top_p=None):
    """Tempered teacher over the full vocab, top-k (ties kept) then top-p (mass strictly above < p), renormalised."""
    t = _up(zt) / tau
    if top_k is not None and top_k < t.shape[-1]:
        kth = t.topk(top_k, dim=-1).values[..., -1:]
        t = t.masked_fill(t < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        p = torch.softmax(t, dim=-1)
        above = (p.unsqueeze(-2) * (t.unsqueeze(-2) > t.unsqueeze(-1))).sum(-1)  # [..., a]: mass of b with t_b > t_a
        t = t.masked_fill(~(above < top_p), -math.inf)
    return torch.softmax(t, dim=-1)


def ref_kl(zs, zt, temperature=1.0, top_k=None, top_p=None, reverse=False):
    tau = temperature
    log_q = torch.log_softmax(_up(zs) / tau, dim=-1)
    if reverse:
        log_p = torch.log_softmax(_up(zt) / tau, dim=-1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        p = ref_teacher_probs(zt, tau, top_k, top_p)
        kl = torch.where(p > 0, p * (p.log() - log_q), 0.0).sum(-1)
    return kl * tau ** 2


def ref_ce(z, y):
    return F.cross_entropy(_up(z).reshape(-1, z.shape[-1]), y.reshape(-1), reduction="none",
                           ignore_index=-100).reshape(y.shape)


def ref_z(z):
    return torch.logsumexp(_up(z), dim=-1) ** 2


# ------------------------------------------------------------------------------------------------------ cases

KL_CASES = ([dict(temperature=t) for t in (0.5, 1.0, 2.0)]
            + [dict(top_k=k) for k in (1, 5, "wide")]  # "wide": k > V/tp (here V/tp + 3)
            + [dict(top_k=5, temperature=2.0)]
            + [dict(top_p=p) for p in (0.5, 0.9, 1.0)]
            + [dict(top_p=0.9, temperature=0.5), dict(top_p=0.9, top_p_candidates=2),  # fallback: bisection
               dict(top_p=0.97, top_p_candidates=1), dict(top_k=12, top_p=0.8),
               dict(top_p=0.5, top_p_candidates=4)]  # rows split between the candidate and the full bisection
            + [dict(reverse=True), dict(reverse=True, temperature=2.0), dict(mask=True)])
CASES = ([("ce", {}), ("ce", dict(dtype=torch.bfloat16)), ("z", {})]
         + [("kl", c) for c in KL_CASES] + [("kl", dict(dtype=torch.bfloat16, top_k=5)),
            ("kl", dict(dtype=torch.bfloat16, top_p=0.8, top_p_candidates=3))]  # bf16 rounding: ties at the cut
         # fp64 in, fp64 out (computed in fp64, never cut to fp32)
         + [("ce", dict(dtype=torch.float64)), ("z", dict(dtype=torch.float64))]
         + [("kl", dict(dtype=torch.float64, **o)) for o in ({}, dict(temperature=2.0), dict(top_k=5),
                                                               dict(top_p=0.8), dict(reverse=True))])


def _inputs(seed, vocab=V, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(*SHAPE, vocab, generator=g) * 2.0).to(dtype)
    zt = (torch.randn(*SHAPE, vocab, generator=g) * 3.0).to(dtype)
    y = torch.randint(0, vocab, SHAPE, generator=g)
    y[0, 1] = y[2, 4] = -100
    w = torch.rand(SHAPE, generator=g) + 0.5  # per-token weights so each token's gradient is checked
    return zs, zt, y, w


def check_case(kind, opts, group, rank, world, seed=0):
    opts = dict(opts)
    dtype = opts.pop("dtype", torch.float32)
    zs, zt, y, w = _inputs(seed, dtype=dtype)
    v_local = V // world
    cols = slice(rank * v_local, (rank + 1) * v_local)
    if opts.get("top_k") == "wide":
        opts["top_k"] = v_local + 3
    zs_full = zs.clone().requires_grad_(True)
    zs_local = zs[..., cols].clone().requires_grad_(True)
    if kind == "ce":
        out, ref = vp.vocab_parallel_cross_entropy(zs_local, y, group), ref_ce(zs_full, y)
    elif kind == "z":
        out, ref = vp.vocab_parallel_z_loss(zs_local, group), ref_z(zs_full)
    else:
        mask = (y != -100) if opts.pop("mask", False) else None
        out = vp.vocab_parallel_kl_div(zs_local, zt[..., cols], group, mask=mask, **opts)
        opts.pop("top_p_candidates", None)
        ref = ref_kl(zs_full, zt, **opts)
        if mask is not None:
            ref = torch.where(mask, ref, 0.0)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}.get(
        dtype, dict(atol=2e-2, rtol=2e-2))
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == want and out.shape == SHAPE and zs_local.grad.dtype == dtype
    # bf16 values are upcast exactly, so fp32 tolerance
    assert_close(out, ref, **(tol if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)))
    assert_close(zs_local.grad, zs_full.grad[..., cols].to(dtype), **tol)
    if kind == "ce":
        assert (out[y == -100] == 0).all() and (zs_local.grad[y == -100] == 0).all()
    return f"{kind}:{opts}"


# ------------------------------------------------------------------------------------------------------ TP = 1

@pytest.mark.parametrize("kind,opts", CASES, ids=[f"{k}-{o}" for k, o in CASES])
def test_tp1_matches_dense(kind, opts):
    check_case(kind, opts, None, 0, 1)


def test_kl_zero_when_equal_and_nonnegative():
    zs, zt, _, _ = _inputs(1)
    assert (vp.vocab_parallel_kl_div(zs, zs.clone()) == 0).all()
    assert (vp.vocab_parallel_kl_div(zs, zs.clone(), reverse=True, temperature=2.0) == 0).all()
    assert (vp.vocab_parallel_kl_div(zs, zt, top_p=0.8) >= 0).all()


@pytest.mark.parametrize("top_p,n_cand", [(0.3, 256), (0.9, 256), (0.9, 3), (0.99, 1), (0.999, 5)])
@pytest.mark.parametrize("flat", [False, True])
def test_top_p_support_exact_with_ties(top_p, n_cand, flat):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(40, V, generator=g) * (0.3 if flat else 3.0)
    t = t.to(torch.bfloat16).float()  # bf16 rounding creates ties
    p = torch.softmax(t, dim=-1)
    above = (p.unsqueeze(-2) * (t.unsqueeze(-2) > t.unsqueeze(-1))).sum(-1)
    got = vp.teacher_support(t, None, None, top_p, n_cand)
    assert torch.equal(got, above < top_p)


def test_top_k_keeps_ties_and_matches_topk():
    t = torch.randn(20, V)
    got = vp.teacher_support(t, None, 7, None)
    ref = torch.zeros_like(t, dtype=torch.bool).scatter(-1, t.topk(7, dim=-1).indices, True)
    assert torch.equal(got, ref)
    tied = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, 0.0]])
    assert torch.equal(vp.teacher_support(tied, None, 2, None)[0], torch.tensor([1, 0, 1, 0, 1, 0]).bool())
    assert vp.teacher_support(t, None, V, None) is None  # k >= V: no truncation


def test_user_errors():
    zs, zt, y, _ = _inputs(0)
    with pytest.raises(UserError, match="reverse"):
        vp.vocab_parallel_kl_div(zs, zt, top_k=5, reverse=True)
    with pytest.raises(UserError, match="temperature"):
        vp.vocab_parallel_kl_div(zs, zt, temperature=0.0)
    with pytest.raises(UserError, match="top_p"):
        vp.vocab_parallel_kl_div(zs, zt, top_p=1.5)
    with pytest.raises(UserError, match="same"):
        vp.vocab_parallel_kl_div(zs, zt[..., :10])
    with pytest.raises(UserError, match="targets"):
        vp.vocab_parallel_cross_entropy(zs, torch.full(SHAPE, V))
    with pytest.raises(UserError, match="teacher"):
        vp.distill_loss(zs, None, y, kd_weight=0.5)


def test_distill_loss_matches_dense_objective():
    zs, zt, y, _ = _inputs(4)
    zs.requires_grad_(True)
    loss, stats = vp.distill_loss(zs, zt, y, kd_weight=0.7, temperature=2.0, z_loss=1e-2, top_k=9)
    zr = zs.detach().clone().requires_grad_(True)
    valid = y != -100
    n = valid.sum()
    ntp, kd, z = ref_ce(zr, y).sum() / n, ref_kl(zr, zt, 2.0, 9)[valid].sum() / n, ref_z(zr)[valid].sum() / n
    ref = 0.3 * ntp + 0.7 * kd + 1e-2 * z
    loss.backward()
    ref.backward()
    assert_close(loss, ref)
    assert_close(zs.grad, zr.grad)
    assert_close(torch.stack([stats["ntp"], stats["kd"], stats["z"]]), torch.stack([ntp, kd, z]).detach())
    assert int(stats["tokens"]) == int(n)


# ------------------------------------------------------------------------------------------------- TP = 2, 4

def _count_elements(fn):
    """Run fn with every torch.distributed collective wrapped; return the number of tensor elements sent."""
    names = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
             "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv"]
    count = [0]
    saved = {n: getattr(dist, n) for n in names}

    def wrap(name, orig):
        def inner(*args, **kwargs):
            x = args[0] if name != "all_gather" else args[1]
            count[0] += sum(t.numel() for t in x) if isinstance(x, (list, tuple)) else x.numel()
            return orig(*args, **kwargs)
        return inner

    for n, orig in saved.items():
        setattr(dist, n, wrap(n, orig))
    try:
        fn()
    finally:
        for n, orig in saved.items():
            setattr(dist, n, orig)
    return count[0]


def _kl_traffic(vocab, group, rank, world, **opts):
    zs, zt, _, _ = _inputs(5, vocab=vocab)
    v_local = vocab // world
    cols = slice(rank * v_local, (rank + 1) * v_local)
    zs_local = zs[..., cols].clone().requires_grad_(True)

    def run():
        vp.vocab_parallel_kl_div(zs_local, zt[..., cols], group, **opts).sum().backward()
    return _count_elements(run)


def _tp_worker(rank, world):
    torch.set_num_threads(1)
    group = dist.group.WORLD
    done = [check_case(kind, opts, group, rank, world) for kind, opts in CASES]
    if world == 2:  # communication volume: O(tokens) (top-k: O(tokens k tp)) and independent of V
        n_tok = SHAPE[0] * SHAPE[1]
        for opts, bound in [({}, 6 * n_tok), (dict(temperature=2.0, reverse=True), 6 * n_tok),
                            (dict(top_k=5), 7 * n_tok + n_tok * 5 * world)]:
            moved = [_kl_traffic(v, group, rank, world, **opts) for v in (V, 2 * V, 8 * V)]
            assert moved[0] == moved[1] == moved[2] <= bound, (opts, moved, bound)
            done.append(f"traffic:{opts}:{moved[0]}")
        # exact top-p: O(tokens) per bisection step, the same for any nucleus size (top_p, a flat teacher that
        # overflows the candidates) and any V; the earlier candidate gather moved [n, tp 256] numbers
        base = _kl_traffic(V, group, rank, world)
        top_p = [_kl_traffic(v, group, rank, world, **o) for v in (V, 8 * V)
                 for o in (dict(top_p=0.3), dict(top_p=0.99), dict(top_p=0.9, top_p_candidates=2),
                           dict(top_p=0.9, temperature=20.0))]
        assert len(set(top_p)) == 1 and top_p[0] - base == 37 * n_tok, (base, top_p)
        done.append(f"traffic:top_p:{top_p[0]}")
    return done


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_tp_matches_dense(world):
    done = run_distributed(_tp_worker, world)
    assert all(len(d) >= len(CASES) for d in done)
    if world == 2:
        assert sum(s.startswith("traffic") for s in done[0]) == 4
