"""Single-pass objectives (fused-linear, and on materialised logits) vs the autograd vocab-parallel losses and a dense
reference, TP=1 and TP=2."""
import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from dist_harness import run_distributed
from megadistill.errors import UserError
from megadistill.parallel.fused_loss import fused_linear_distill_loss, logits_distill_loss
from megadistill.parallel.vocab_parallel import distill_loss
from test_vocab_parallel import _count_elements, ref_ce, ref_kl, ref_z

V, D, D_T = 48, 16, 24  # vocab, student width, teacher width
SHAPE = (2, 13)  # 26 tokens: chunks of 8 and 5 do not divide it, 13 and 26 do

CONFIGS = [
    dict(kd_weight=1.0, temperature=1.0, z_loss=1e-4),  # the paper's scaling-law setting
    dict(kd_weight=0.5, temperature=2.0, z_loss=1e-2),
    dict(kd_weight=0.7, temperature=0.5, z_loss=0.0, top_k=5),
    dict(kd_weight=1.0, temperature=1.0, z_loss=1e-4, top_k=30),
    dict(kd_weight=0.3, temperature=1.0, z_loss=1e-3, top_p=0.9),
    dict(kd_weight=1.0, temperature=2.0, z_loss=0.0, top_p=0.8, top_p_candidates=2),
    dict(kd_weight=0.6, temperature=1.0, z_loss=1e-4, reverse=True),
    dict(kd_weight=1.0, temperature=2.0, z_loss=1e-4, reverse=True),
    dict(kd_weight=0.0, temperature=1.0, z_loss=1e-4, teacher=False),  # supervised: NTP + Z
]


def _inputs(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*SHAPE, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    h_t = torch.randn(*SHAPE, D_T, generator=g).to(dtype)
    w_t = (torch.randn(V, D_T, generator=g) * 0.6).to(dtype)
    y = torch.randint(0, V, SHAPE, generator=g)
    y[0, 3] = y[1, 12] = y[1, 0] = -100
    return h, w, h_t, w_t, y


def _dense(h, w, h_t, w_t, y, kd_weight, temperature, z_loss, top_k=None, top_p=None, reverse=False, **_):
    """The objective in plain torch on full logits: mean over valid tokens of (1-l) CE + l KL + l_Z lse^2."""
    z = (h @ w.t()).float()  # logits in the input dtype, loss in fp32, as a model's head would
    valid = y != -100
    n = valid.sum()
    loss = (1 - kd_weight) * ref_ce(z, y).sum() / n + z_loss * ref_z(z)[valid].sum() / n
    if kd_weight:
        zt = (h_t @ w_t.t()).float()
        loss = loss + kd_weight * ref_kl(z, zt, temperature, top_k, top_p, reverse)[valid].sum() / n
    return loss


def _run(fn, h, w, h_t, w_t, y, cfg, group=None, cols=slice(None), **kw):
    """Loss, stats and the grads of (loss * 3) w.r.t. hidden and this rank's weight shard for one implementation."""
    cfg = dict(cfg)
    teacher = cfg.pop("teacher", True)
    h = h.clone().requires_grad_(True)
    w_local = w[cols].clone().requires_grad_(True)
    if fn == "fused":
        loss, stats = fused_linear_distill_loss(h, w_local, h_t if teacher else None,
                                                w_t[cols] if teacher else None, y, group, **cfg, **kw)
    elif fn in ("logits", "logits_copy"):  # single pass on materialised logits, overwriting them or not
        zt = (h_t @ w_t[cols].t()) if teacher else None
        cfg.setdefault("chunk_tokens", kw.get("chunk_tokens", 8))
        loss, stats = logits_distill_loss(h @ w_local.t(), zt, y, group, inplace=fn == "logits", **cfg)
    elif fn == "unfused":
        zt = (h_t @ w_t[cols].t()) if teacher else None
        loss, stats = distill_loss(h @ w_local.t(), zt, y, group, **cfg)
    else:
        cfg.pop("top_p_candidates", None)
        loss, stats = _dense(h, w_local, h_t, w_t, y, **cfg), {}
    (loss * 3.0).backward()  # a grad_output != 1 exercises the fused backward's scaling
    return loss.detach(), stats, h.grad, w_local.grad


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("chunk", [8, 5, 13, 1000])
def test_fused_matches_unfused_tp1(cfg, chunk):
    args = _inputs(0)
    u_loss, u_stats, u_gh, u_gw = _run("unfused", *args, cfg)
    d_loss, _, d_gh, d_gw = _run("dense", *args, cfg)
    for fn in ("fused", "logits", "logits_copy"):
        f_loss, f_stats, f_gh, f_gw = _run(fn, *args, cfg, chunk_tokens=chunk)
        for loss, gh, gw in [(u_loss, u_gh, u_gw), (d_loss, d_gh, d_gw)]:
            assert_close(f_loss, loss, atol=1e-5, rtol=1e-5)
            assert_close(f_gh, gh, atol=1e-6, rtol=1e-4)
            assert_close(f_gw, gw, atol=1e-6, rtol=1e-4)
        assert set(f_stats) == set(u_stats)
        for k in f_stats:
            assert_close(f_stats[k], u_stats[k], atol=1e-5, rtol=1e-5, check_dtype=False)


def test_fused_bf16_and_no_grad():
    h, w, h_t, w_t, y = _inputs(1, torch.bfloat16)
    cfg = dict(kd_weight=0.8, temperature=1.0, z_loss=1e-4, top_k=10)
    f_loss, _, f_gh, f_gw = _run("fused", h, w, h_t, w_t, y, cfg, chunk_tokens=7)
    d_loss, _, d_gh, d_gw = _run("dense", h, w, h_t, w_t, y, cfg)
    assert f_gh.dtype == f_gw.dtype == torch.bfloat16
    assert_close(f_loss, d_loss, atol=2e-2, rtol=2e-2)
    for got, ref in [(f_gh, d_gh), (f_gw, d_gw)]:  # bf16: errors ~ 2^-8 of the gradient's scale
        assert_close(got.float(), ref.float(), atol=1e-2 * ref.float().abs().max().item(), rtol=2e-2)
    h, w, h_t, w_t, y = _inputs(2)
    with torch.no_grad():
        loss, stats = fused_linear_distill_loss(h, w, h_t, w_t, y, chunk_tokens=4)
    assert_close(loss, _dense(h, w, h_t, w_t, y, 1.0, 1.0, 1e-4), atol=1e-5, rtol=1e-5)
    assert int(stats["tokens"]) == int((y != -100).sum())


def test_logits_loss_bf16_inplace_no_grad_and_once():
    h, w, h_t, w_t, y = _inputs(1, torch.bfloat16)
    cfg = dict(kd_weight=0.8, temperature=2.0, z_loss=1e-4, top_p=0.9)
    d_loss, _, d_gh, d_gw = _run("dense", h, w, h_t, w_t, y, cfg)
    for fn in ("logits", "logits_copy"):
        got_loss, _, got_gh, got_gw = _run(fn, h, w, h_t, w_t, y, cfg, chunk_tokens=7)
        assert got_gh.dtype == got_gw.dtype == torch.bfloat16
        assert_close(got_loss, d_loss, atol=2e-2, rtol=2e-2)
        for got, ref in [(got_gh, d_gh), (got_gw, d_gw)]:
            assert_close(got.float(), ref.float(), atol=1e-2 * ref.float().abs().max().item(), rtol=2e-2)
    # inplace: the student logits become d loss / d logits, the caller's tensors are consumed as documented
    h, w, h_t, w_t, y = _inputs(2)
    w = w.requires_grad_(True)
    z, zt = h @ w.t(), h_t @ w_t.t()
    z_ref = z.detach().clone().requires_grad_(True)
    loss_ref, _ = distill_loss(z_ref, zt.clone(), y, kd_weight=1.0)
    loss_ref.backward()
    loss, _ = logits_distill_loss(z, zt, y, kd_weight=1.0, chunk_tokens=5, inplace=True)
    assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    assert_close(z.detach(), z_ref.grad, atol=1e-7, rtol=1e-5)  # the gradient, formed in the forward
    loss.backward()
    with pytest.raises(RuntimeError, match="backward ran twice"):
        z2 = h @ w.t()
        l2, _ = logits_distill_loss(z2, h_t @ w_t.t(), y, chunk_tokens=5, inplace=True)
        l2.backward(retain_graph=True)
        l2.backward()
    # a leaf that requires grad is never overwritten (falls back to a separate gradient buffer)
    z_leaf = (h @ w.t()).detach().requires_grad_(True)
    keep = z_leaf.detach().clone()
    logits_distill_loss(z_leaf, h_t @ w_t.t(), y, inplace=True)[0].backward()
    assert torch.equal(z_leaf.detach(), keep) and z_leaf.grad is not None
    # no grad (evaluation): the value alone, same as the reference
    with torch.no_grad():
        loss, stats = logits_distill_loss(h @ w.t(), h_t @ w_t.t(), y, kd_weight=0.5, inplace=True)
        ref, ref_stats = distill_loss(h @ w.t(), h_t @ w_t.t(), y, kd_weight=0.5)
    assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    assert_close(stats["kd"], ref_stats["kd"], atol=1e-6, rtol=1e-6)


def test_fused_user_errors():
    h, w, h_t, w_t, y = _inputs(0)
    with pytest.raises(UserError, match="teacher"):
        fused_linear_distill_loss(h, w, None, None, y, kd_weight=0.5)
    with pytest.raises(UserError, match="shapes"):
        fused_linear_distill_loss(h, w[:, :5], h_t, w_t, y)
    with pytest.raises(UserError, match="teacher hidden"):
        fused_linear_distill_loss(h, w, h_t[:1], w_t, y)
    with pytest.raises(UserError, match="chunk_tokens"):
        fused_linear_distill_loss(h, w, h_t, w_t, y, chunk_tokens=0)
    with pytest.raises(UserError, match="reverse"):
        fused_linear_distill_loss(h, w, h_t, w_t, y, top_p=0.5, reverse=True)


def _tp2_worker(rank, world):
    torch.set_num_threads(1)
    group = dist.group.WORLD
    cols = slice(rank * V // world, (rank + 1) * V // world)
    args = _inputs(0)
    done = []
    for cfg in CONFIGS:
        for chunk in (5, 26):
            f_loss, f_stats, f_gh, f_gw = _run("fused", *args, cfg, group=group, cols=cols, chunk_tokens=chunk)
            u_loss, u_stats, _, u_gw = _run("unfused", *args, cfg, group=group, cols=cols)
            l_loss, l_stats, l_gh, l_gw = _run("logits", *args, cfg, group=group, cols=cols, chunk_tokens=chunk)
            dist.all_reduce(l_gh, group=group)  # h's grad through a column head shard is a partial sum as well
            d_loss, _, d_gh, d_gw = _run("dense", *args, cfg)
            dist.all_reduce(f_gh, group=group)  # the fused hidden grad is this rank's partial sum
            assert_close(f_loss, d_loss, atol=1e-5, rtol=1e-5)
            assert_close(f_loss, u_loss, atol=1e-5, rtol=1e-5)
            assert_close(f_gh, d_gh, atol=1e-6, rtol=1e-4)
            assert_close(f_gw, d_gw[cols], atol=1e-6, rtol=1e-4)
            assert_close(f_gw, u_gw, atol=1e-6, rtol=1e-4)
            assert_close(l_loss, d_loss, atol=1e-5, rtol=1e-5)
            assert_close(l_gh, d_gh, atol=1e-6, rtol=1e-4)
            assert_close(l_gw, d_gw[cols], atol=1e-6, rtol=1e-4)
            for k in f_stats:
                assert_close(f_stats[k], u_stats[k], atol=1e-5, rtol=1e-5, check_dtype=False)
                assert_close(l_stats[k], u_stats[k], atol=1e-5, rtol=1e-5, check_dtype=False)
            done.append((str(cfg), chunk))
    # communication: per chunk O(chunk tokens), independent of V
    moved = []
    for vocab in (V, 4 * V):
        g = torch.Generator().manual_seed(7)
        h, h_t = torch.randn(26, D, generator=g), torch.randn(26, D_T, generator=g)
        w, w_t = torch.randn(vocab // world, D, generator=g), torch.randn(vocab // world, D_T, generator=g)
        y = torch.randint(0, vocab, (26,), generator=g)
        h.requires_grad_(True)
        moved.append(_count_elements(
            lambda: fused_linear_distill_loss(h, w, h_t, w_t, y, group, chunk_tokens=8)[0].backward()))
        moved.append(_count_elements(
            lambda: logits_distill_loss(h @ w.t(), h_t @ w_t.t(), y, group, chunk_tokens=8,
                                        inplace=True)[0].backward()))
    assert moved[0] == moved[2] <= 4 * 26 + 2, moved  # fused, at V and 4V
    assert moved[1] == moved[3] == moved[0], moved  # on logits: the same collectives
    return done


@pytest.mark.multiproc
def test_fused_matches_dense_tp2():
    done = run_distributed(_tp2_worker, 2)
    assert len(done[0]) == 2 * len(CONFIGS)
