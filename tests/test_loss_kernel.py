"""The compiled per-chunk loss kernel (inductor, C++ on CPU) against the eager single-pass path and the dense
reference: values, stats and grads, fused-linear and on-logits forms, TP=1 and TP=2, fp32 and bf16; bounded
compilation.

Tolerances: fp32, compiled vs eager and vs dense, loss 1e-5 and grads atol 1e-6 / rtol 1e-4 (the eager path's own
tolerance against dense; the kernels only reorder fp32 sums). bf16 (logits, G and the GEMMs in bf16, softmax maths in
fp32), compiled vs eager: loss rtol 1e-3, grads within 1e-2 of the gradient's scale (one bf16 rounding of G may fall
the other way: 2^-8 relative); vs dense the eager path's bf16 tolerance.
"""
import json

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from dist_harness import run_distributed
from megadistill import config
from megadistill.config import ConfigError
from megadistill.errors import UserError
from megadistill.parallel import loss_kernel
from megadistill.parallel.fused_loss import fused_linear_distill_loss, logits_distill_loss
from test_fused_loss import V, _dense, _inputs

CASES = {
    "ce": dict(kd_weight=0.0, temperature=1.0, z_loss=0.0),
    "z_loss": dict(kd_weight=0.0, temperature=1.0, z_loss=0.1),
    "kd_tau1": dict(kd_weight=1.0, temperature=1.0, z_loss=0.0),
    "kd_tau2_z": dict(kd_weight=0.5, temperature=2.0, z_loss=1e-2),
    "top_k": dict(kd_weight=0.7, temperature=0.5, z_loss=1e-4, top_k=5),
    "top_p": dict(kd_weight=0.3, temperature=1.0, z_loss=1e-3, top_p=0.9),  # support mask from the eager bisection
    "reverse_tau1": dict(kd_weight=0.6, temperature=1.0, z_loss=1e-4, reverse=True),
    "reverse_tau2": dict(kd_weight=1.0, temperature=2.0, z_loss=1e-4, reverse=True),
}


def _loss(form, kernel, h, w, h_t, w_t, y, cfg, group=None, cols=slice(None), chunk=8):
    """Loss, stats and grads of (loss * 3) w.r.t. hidden and this rank's weight shard."""
    teacher = cfg["kd_weight"] != 0.0
    h = h.clone().requires_grad_(True)
    w_local = w[cols].clone().requires_grad_(True)
    if form == "fused":
        loss, stats = fused_linear_distill_loss(h, w_local, h_t if teacher else None, w_t[cols] if teacher else None,
                                                y, group, chunk_tokens=chunk, loss_kernel=kernel, **cfg)
    else:
        zt = (h_t @ w_t[cols].t()) if teacher else None
        loss, stats = logits_distill_loss(h @ w_local.t(), zt, y, group, chunk_tokens=chunk, inplace=True,
                                          loss_kernel=kernel, **cfg)
    (loss * 3.0).backward()
    return loss.detach(), stats, h.grad, w_local.grad


def _compare(got, ref, bf16: bool, vs_dense: bool = False):
    (g_loss, g_stats, g_gh, g_gw), (r_loss, r_stats, r_gh, r_gw) = got, ref
    if not bf16:
        assert_close(g_loss, r_loss, atol=1e-5, rtol=1e-5)
        for a, b in [(g_gh, r_gh), (g_gw, r_gw)]:
            assert_close(a, b, atol=1e-6, rtol=1e-4)
    else:
        assert g_gh.dtype == g_gw.dtype == torch.bfloat16
        assert_close(g_loss, r_loss, atol=2e-2 if vs_dense else 1e-3, rtol=2e-2 if vs_dense else 1e-3)
        for a, b in [(g_gh, r_gh), (g_gw, r_gw)]:
            assert_close(a.float(), b.float(), atol=1e-2 * b.float().abs().max().item(), rtol=2e-2)
    if r_stats:
        assert set(g_stats) == set(r_stats)
        for k in g_stats:
            assert_close(g_stats[k], r_stats[k], atol=1e-3 if bf16 else 1e-5, rtol=1e-3 if bf16 else 1e-5,
                         check_dtype=False)


def _dense_run(h, w, h_t, w_t, y, cfg):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss = _dense(h, w, h_t, w_t, y, **cfg)
    (loss * 3.0).backward()
    return loss.detach(), {}, h.grad, w.grad


# ------------------------------------------------------------------------------------------- default suite

def test_compiled_matches_eager_tp1():
    """KD at tau=2 with z-loss and ignored targets, fp32, 26 tokens in 2 chunks of 13: two graphs (stats, grad),
    reused by the second chunk, later steps and the on-logits form. (Inductor's C++ build of the two graphs is most of
    this test's time on a cold cache; the partial-chunk twin and the matrix run in the slow tests.)"""
    args = _inputs(0)
    cfg = CASES["kd_tau2_z"]
    before = loss_kernel.compile_count()
    got = _loss("fused", "compiled", *args, cfg, chunk=13)
    assert loss_kernel.compile_count() - before <= 2
    _compare(got, _loss("fused", "eager", *args, cfg, chunk=13), bf16=False)
    _compare(got, _dense_run(*args, cfg), bf16=False, vs_dense=True)
    n = loss_kernel.compile_count()
    _compare(_loss("fused", "compiled", *args, cfg, chunk=13), got, bf16=False)
    _compare(_loss("logits", "compiled", *args, cfg, chunk=13), got, bf16=False)
    assert loss_kernel.compile_count() == n, "the kernel recompiled"


@pytest.mark.slow
def test_compiled_partial_chunks_compile_once():
    """26 tokens in chunks of 8 (3 full chunks + a partial one): four graphs (stats and grad, static and dynamic);
    later steps, another token count (another partial chunk) and the on-logits form reuse them; inference-mode
    teacher logits (the trainer's) add one set of graphs, once, and are never written."""
    args = _inputs(0)
    cfg = CASES["kd_tau2_z"]
    before = loss_kernel.compile_count()
    got = _loss("fused", "compiled", *args, cfg)
    assert loss_kernel.compile_count() - before <= 4
    _compare(got, _loss("fused", "eager", *args, cfg), bf16=False)
    _compare(got, _dense_run(*args, cfg), bf16=False, vs_dense=True)
    n = loss_kernel.compile_count()
    for _ in range(2):
        _compare(_loss("fused", "compiled", *args, cfg), got, bf16=False)
    h, w, h_t, w_t, y = args
    short = (h[:, :11], w, h_t[:, :11], w_t, y[:, :11])  # 22 tokens: a partial chunk of 6
    _compare(_loss("fused", "compiled", *short, cfg), _loss("fused", "eager", *short, cfg), bf16=False)
    _compare(_loss("logits", "compiled", *args, cfg), got, bf16=False)
    assert loss_kernel.compile_count() == n, "the kernel recompiled"
    for step in range(2):
        with torch.inference_mode():
            zt = h_t @ w_t.t()
        keep = zt.clone()
        hh = h.clone().requires_grad_(True)
        loss, _ = logits_distill_loss(hh @ w.t(), zt, y, chunk_tokens=8, inplace=True, loss_kernel="compiled", **cfg)
        assert torch.equal(zt, keep)
        assert_close(loss, got[0], atol=1e-5, rtol=1e-5)
        if step == 0:
            n_inf = loss_kernel.compile_count()
            assert n_inf <= n + 4
    assert loss_kernel.compile_count() == n_inf, "the kernel recompiled"


def test_kernel_selection_and_config():
    assert not loss_kernel.use_compiled("auto", "cpu") and loss_kernel.use_compiled("auto", "cuda")
    assert loss_kernel.use_compiled("compiled", "cpu") and not loss_kernel.use_compiled("eager", "cuda")
    with pytest.raises(UserError, match="loss_kernel='triton'"):
        loss_kernel.use_compiled("triton", "cpu")
    # GPU chunk from memory: 3 live [c, V/tp] buffers within 384 MiB, in [1024, 8192]
    assert loss_kernel.default_chunk_tokens(32768, torch.bfloat16, "cuda", True) == 2048
    assert loss_kernel.default_chunk_tokens(32768, torch.float32, "cuda", True) == 1024
    assert loss_kernel.default_chunk_tokens(4096, torch.bfloat16, "cuda", True) == 8192
    assert loss_kernel.default_chunk_tokens(262144, torch.float32, "cuda", True) == 1024
    assert loss_kernel.default_chunk_tokens(32768, torch.bfloat16, "cpu", True) == 1024
    assert config.load([], ["train.steps=1"]).distill.loss_kernel == "auto"
    assert config.load([], ["train.steps=1", "distill.loss_kernel=eager"]).distill.loss_kernel == "eager"
    with pytest.raises(ConfigError, match=r"distill.loss_kernel='fast' is not one of \['auto', 'compiled', 'eager'\]"):
        config.load([], ["train.steps=1", "distill.loss_kernel=fast"])


# --------------------------------------------------------------------------------------------- slow matrix

@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_matrix_tp1(case, dtype):
    args = _inputs(3, dtype)
    cfg = CASES[case]
    bf16 = dtype == torch.bfloat16
    dense = _dense_run(*args, cfg)
    for form in ("fused", "logits"):
        got = _loss(form, "compiled", *args, cfg, chunk=8)
        _compare(got, _loss(form, "eager", *args, cfg, chunk=8), bf16)
        _compare(got, dense, bf16, vs_dense=True)


def _tp2_worker(rank, world):
    torch.set_num_threads(1)
    group = dist.group.WORLD
    cols = slice(rank * V // world, (rank + 1) * V // world)
    done = []
    for dtype in (torch.float32, torch.bfloat16):
        args = _inputs(4, dtype)
        bf16 = dtype == torch.bfloat16
        for name, cfg in CASES.items():
            if bf16 and name not in ("kd_tau1", "top_k", "reverse_tau2"):
                continue
            dense = _dense_run(*args, cfg)
            dense = (dense[0], {}, dense[2], dense[3][cols])
            for form in ("fused", "logits"):
                got = list(_loss(form, "compiled", *args, cfg, group=group, cols=cols, chunk=8))
                ref = list(_loss(form, "eager", *args, cfg, group=group, cols=cols, chunk=8))
                for r in (got, ref):  # the hidden-state grad through a column head shard is a partial sum
                    dist.all_reduce(r[2], group=group)
                _compare(got, ref, bf16)
                _compare(got, dense, bf16, vs_dense=True)
                done.append((name, form, str(dtype)))
    return done, loss_kernel.compile_count()


@pytest.mark.slow
@pytest.mark.multiproc
def test_compiled_matches_dense_tp2():
    """All cases at TP=2 over gloo in one pair of processes (fp32, and three in bf16)."""
    results = run_distributed(_tp2_worker, 2, timeout=1200.0)
    (done, graphs), _ = results
    assert len(done) == 2 * (len(CASES) + 3)
    # per (variant, dtype): stats + grad, static + dynamic = 4 graphs at most
    assert graphs <= 4 * (len(CASES) - 1 + 3), graphs  # ce and z_loss share a variant


@pytest.mark.slow
def test_loss_kernel_check_cpu():
    """tools/bench_loss.loss_kernel_check on CPU (tiny): every case computes the same objective; ratios reported."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_loss import loss_kernel_check
    r = loss_kernel_check("cpu", tokens=(192,), d=32, vocab=512, dtype="fp32", repeats=1, threads=1, chunk=64)
    assert r["chunk_kernel"]["bf16"]["eager_ms"] > 0
    res = r["results"]["192"]
    losses = [res[c]["loss"] for c in ("naive", "fused", "fused_compiled")]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0]), res
    assert {"fused_time_over_naive", "fused_compiled_time_over_naive", "compiled_time_over_eager"} <= set(
        r["ratios"]["192"])


@pytest.mark.slow
def test_trainer_loss_kernel_compiled_matches_eager(tmp_path):
    """distill.loss_kernel reaches the trainer's loss and evaluation: a tiny distill run (on materialised logits, the
    trainer's default, with inference-mode teacher logits) gives the same loss curve compiled and eager."""
    from test_cli_train import TINY, cli
    teacher = tmp_path / "teacher"
    cli("train", "configs/tiny/teacher.yaml", *TINY, "train.steps=2", f"train.run_dir={teacher}")
    curves = {}
    for kernel in ("eager", "compiled"):
        run = tmp_path / kernel
        cli("train", "configs/tiny/distill.yaml", *TINY, "train.steps=3", f"distill.teacher={teacher}",
            f"train.run_dir={run}", f"distill.loss_kernel={kernel}")
        curves[kernel] = [json.loads(line)["loss"] for line in (run / "train.jsonl").read_text().splitlines()]
        curves[kernel].append(json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["eval_loss"])
    assert_close(torch.tensor(curves["compiled"]), torch.tensor(curves["eager"]), atol=1e-4, rtol=1e-4)


def test_chunk_tokens_unset_is_1024_eager_and_sized_when_compiled():
    """distill.chunk_tokens=null: 1024 rows with the eager kernel (CPU auto), left to default_chunk_tokens (sized from
    memory on a GPU) with the compiled one; a configured count always wins."""
    from megadistill import config
    from megadistill.parallel.loss_kernel import chunk_tokens_for, default_chunk_tokens
    assert config.load([], ["train.steps=1"]).distill.chunk_tokens is None
    assert chunk_tokens_for(None, "auto", "cpu") == chunk_tokens_for(None, "eager", "cuda") == 1024
    assert chunk_tokens_for(None, "compiled", "cpu") is None and chunk_tokens_for(None, "auto", "cuda") is None
    assert chunk_tokens_for(96, "compiled", "cuda") == chunk_tokens_for(96, "eager", "cpu") == 96
    # the compiled GPU chunk keeps the eager kernel's bytes: 3 bf16 [c, 32768] buffers at c = 2048
    assert default_chunk_tokens(32768, torch.bfloat16, "cuda", True) == 2048
    with pytest.raises(config.ConfigError, match="distill.chunk_tokens"):
        config.load([], ["train.steps=1", "train.mode=distill", "distill.teacher=x", "distill.chunk_tokens=0"])
