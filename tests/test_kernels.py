"""model.kernels (torch | liger): config and build-time errors, kernels=torch is our eager ops, Liger's RMSNorm /
SwiGLU / RoPE against them on CUDA (gpu) and on CPU under Triton's interpreter (slow), and the teacher's choice."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import liger_cases
from tiny_runs import tiny_overrides

from megadistill import config
from megadistill.config import ConfigError, ModelConfig
from megadistill.errors import UserError
from megadistill.model import kernels
from megadistill.model.attention import Rotary
from megadistill.model.transformer import Transformer

TINY = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=192, vocab_size=128)


def _cfg(**kw):
    cfg = ModelConfig(**{**TINY, **kw})
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------- errors (CPU)

def test_unknown_kernels_value_names_the_key():
    with pytest.raises(ConfigError, match=r"model.kernels='triton' is not one of \['torch', 'liger'\]"):
        config.load([], ["model.kernels=triton", "train.steps=1"])
    assert config.load([], ["model.kernels=liger", "train.steps=1"]).model.kernels == "liger"  # resolvable anywhere


def test_liger_without_cuda_is_an_error_at_build(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"model.kernels='liger'.*need a CUDA GPU.*set model.kernels=torch"):
        Transformer(_cfg(kernels="liger"))


def test_liger_without_the_package_is_an_error_at_build(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the CUDA check, to the import
    for mod in ("liger_kernel", "liger_kernel.ops", "liger_kernel.ops.rms_norm", "liger_kernel.ops.rope",
                "liger_kernel.ops.swiglu"):
        monkeypatch.setitem(sys.modules, mod, None)  # import of any of them raises ImportError
    kernels._liger.cache_clear()
    try:
        with pytest.raises(UserError, match=r"model.kernels='liger' needs the liger-kernel package.*"
                                            r"pip install liger-kernel.*or set model.kernels=torch"):
            Transformer(_cfg(kernels="liger"))
    finally:
        kernels._liger.cache_clear()


# ---------------------------------------------------------------------------------- kernels=torch is our eager ops

def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grad_out)
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def test_torch_kernels_match_dense_references():
    """The dispatch's torch path against independent fp64 formulas (plain autograd), values and grads: SwiGLU and
    RoPE in fp64 to 1e-12; RMSNorm computes in fp32 by design, so fp32 inputs against the fp64 result to 2e-6."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 24, generator=g, dtype=torch.float64), 1 + 0.1 * torch.randn(24, generator=g,
                                                                                             dtype=torch.float64)
    dy = torch.randn(3, 5, 24, generator=g, dtype=torch.float64)
    ref = _grads(lambda x, w: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w, [x, w], [dy])
    got = _grads(lambda x, w: kernels.rms_norm(x, w, 1e-5), [x.float(), w.float()], [dy.float()])
    assert_close([t.double() for t in got], ref, rtol=2e-6, atol=2e-6)

    a, b = (torch.randn(3, 5, 40, generator=g, dtype=torch.float64) for _ in range(2))
    ref = _grads(lambda a, b: a * torch.sigmoid(a) * b, [a, b], [dy[..., :1].expand(3, 5, 40)])
    assert_close(_grads(lambda a, b: kernels.swiglu(a, b), [a, b], [dy[..., :1].expand(3, 5, 40)]), ref,
                 rtol=1e-12, atol=1e-12)

    s, hd = 7, 16
    q, k = torch.randn(2, s, 4, hd, generator=g, dtype=torch.float64), torch.randn(2, s, 2, hd, generator=g,
                                                                                   dtype=torch.float64)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = Rotary(hd, 500000.0)(s, "cpu", torch.float64)

    def rotate(t):  # pairs (t_i, t_{i + hd/2}) as complex numbers, turned by p * base^(-2i / hd)
        theta = 500000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        turn = torch.polar(torch.ones(s, hd // 2, dtype=torch.float64), torch.arange(s).double()[:, None] * theta)
        z = torch.complex(t[..., : hd // 2], t[..., hd // 2:]) * turn[:, None, :]
        return torch.cat([z.real, z.imag], -1)

    ref = _grads(lambda q, k: (rotate(q), rotate(k)), [q, k], [gq, gk])
    assert_close(_grads(lambda q, k: kernels.rope(q, k, cos, sin), [q, k], [gq, gk]), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,width", [(torch.float32, 16), (torch.bfloat16, 16), (torch.float32, 5),
                                         (torch.bfloat16, 12)], ids=["fp32", "bf16", "fp32-loop", "bf16-loop"])
def test_grouped_linear_matches_per_expert_linears(dtype, width):
    """grouped_linear (a mixture's experts) against F.linear per expert in fp64, values and gradients, with experts
    that get no rows (zero weight gradients) and experts that get all of them. Aligned rows take torch._grouped_mm
    (one kernel), rows of 20 / 24 bytes the loop; both give the same function."""
    g = torch.Generator().manual_seed(0)
    n_in, counts = 32, torch.tensor([3, 0, 5, 0, 1])
    x = torch.randn(int(counts.sum()), n_in, generator=g, dtype=torch.float64)
    w = torch.randn(len(counts), width, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5
    dy = torch.randn(x.shape[0], width, generator=g, dtype=torch.float64)

    def per_expert(x, w):
        return torch.cat([torch.nn.functional.linear(p, w[e]) for e, p in enumerate(x.split(counts.tolist()))])

    assert kernels.grouped_mm_usable(x.to(dtype), *w.shape[1:]) == (width * x.to(dtype).element_size() % 16 == 0)
    ref = _grads(per_expert, [x, w], [dy])
    got = _grads(lambda x, w: kernels.grouped_linear(x, w, counts), [x.to(dtype), w.to(dtype)], [dy.to(dtype)])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_close([t.double() for t in got], ref, rtol=tol, atol=tol)
    assert float(got[2][1].abs().sum()) == 0 and float(got[2][3].abs().sum()) == 0  # unrouted: zero gradients
    assert float(got[2][0].abs().sum()) > 0
    every = torch.tensor([0, 0, 9, 0, 0])  # one expert takes every row
    assert_close(kernels.grouped_linear(x.float(), w.float(), every), x.float() @ w[2].float().T, rtol=1e-5, atol=1e-5)


def test_grouped_linear_loops_over_an_unaligned_weight(monkeypatch):
    """An expert weight that does not start 16-byte aligned (a view into a flat buffer, as DeepSpeed's ZeRO-1/2 make
    them) never reaches torch._grouped_mm, which refuses it on CUDA: the loop gives the same result."""
    x, counts = torch.randn(6, 16), torch.tensor([2, 0, 4])
    flat = torch.randn(1 + 3 * 8 * 16)
    w = flat[1:].view(3, 8, 16)  # 4 bytes past an aligned start
    assert w.data_ptr() % 16 and kernels.grouped_mm_usable(x, 8, 16)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(a) or real(*a, **k))
    out = kernels.grouped_linear(x, w, counts)
    assert not calls
    assert_close(out, torch.cat([x[:2] @ w[0].T, x[2:] @ w[2].T]), rtol=1e-5, atol=1e-5)
    kernels.grouped_linear(x, w.clone(), counts)
    assert len(calls) == 1  # aligned: the grouped kernel


def test_grouped_linear_takes_the_grouped_kernel_where_torch_has_it(monkeypatch):
    """On this CPU (torch 2.13 and 2.11) torch._grouped_mm runs and is used for aligned fp32 / bf16 operands; made
    to fail, the probe falls back to the loop (logged) and the result is unchanged."""
    x, w, counts = torch.randn(6, 16), torch.randn(3, 8, 16), torch.tensor([2, 0, 4])
    kernels._grouped_mm_works.cache_clear()
    assert kernels.grouped_mm_usable(x, *w.shape[1:]) and kernels.grouped_mm_usable(x.bfloat16(), *w.shape[1:])
    grouped = kernels.grouped_linear(x, w, counts)

    def broken(*args, **kwargs):
        raise RuntimeError("grouped gemm is only supported on SM90")
    monkeypatch.setattr(torch, "_grouped_mm", broken)
    kernels._grouped_mm_works.cache_clear()
    try:
        assert not kernels.grouped_mm_usable(x, *w.shape[1:])
        assert_close(kernels.grouped_linear(x, w, counts), grouped, rtol=1e-6, atol=1e-6)
        with torch.inference_mode():  # a teacher forward: the probe itself still runs (autograd re-enabled)
            monkeypatch.undo()
            kernels._grouped_mm_works.cache_clear()
            assert kernels.grouped_mm_usable(x, *w.shape[1:])
    finally:
        kernels._grouped_mm_works.cache_clear()


@pytest.mark.parametrize("multiple", [8, 16])
def test_pad_groups_aligns_every_group(multiple):
    """pad_groups: each expert's rows start at a multiple of `multiple` in the padded layout, in order, zeros
    elsewhere; the padded counts are multiples summing to the static row count, and rows maps back exactly."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 17, 8, 0, 1])
    x = torch.randn(int(counts.sum()), 5, generator=g)
    xp, padded, rows = kernels.pad_groups(x, counts, multiple)
    n, experts = x.shape[0], len(counts)
    bound = n + experts * (multiple - 1)  # rounded up to a multiple
    assert xp.shape[0] % multiple == 0 and bound <= xp.shape[0] < bound + multiple
    assert int(padded.sum()) == xp.shape[0] and bool((padded % multiple == 0).all())
    assert bool((padded >= counts).all())
    assert torch.equal(xp.index_select(0, rows), x)
    starts, packed = padded.cumsum(0) - padded, counts.cumsum(0) - counts
    for e in range(experts):  # expert e's rows, in order, at the start of its padded group
        assert torch.equal(rows[packed[e]:packed[e] + counts[e]], torch.arange(counts[e]) + starts[e])
    outside = torch.ones(xp.shape[0], dtype=torch.bool)
    outside[rows] = False
    assert float(xp[outside].abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixture_with_padded_groups_equals_packed(monkeypatch, dtype):
    """On CUDA the experts' grouped GEMMs take groups padded to 16 rows (an unaligned group is a device-side assert
    there): the same block with padding forced on this CPU gives the packed layout's output and gradients; compiled
    (bf16) the padding traces into the block graph."""
    import torch._dynamo as dynamo
    from megadistill.model.transformer import MoEFeedForward
    from megadistill.parallel.layers import LayerFactory
    cfg = ModelConfig(**{**TINY, "d_ff": 32, "moe_experts": 8, "moe_top_k": 2})
    cfg.validate()
    torch.manual_seed(0)
    block = MoEFeedForward(cfg, cfg.d_ff, LayerFactory(dtype=dtype))
    x0 = torch.randn(2, 24, cfg.d_model, dtype=dtype)

    def run(fn):
        x = x0.clone().requires_grad_()
        y = fn(x)
        (y.float() * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        out = [y.detach(), x.grad] + [p.grad.clone() for p in block.parameters()]
        block.zero_grad(set_to_none=True)
        return out

    packed = run(block)
    monkeypatch.setattr(kernels, "group_rows", lambda device: 16)
    padded = run(block)
    # fp32: a GEMM's rows do not depend on each other, but BLAS may pick another blocking for the padded row count
    # (bit-equal on the Intel CPUs this was written on; on an AMD EPYC up to 1.7e-6 apart, 3.5e-5 relative); a
    # padding bug is off by O(1)
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2)
    assert_close(padded, packed, rtol=rtol, atol=atol)
    if dtype == torch.bfloat16:
        dynamo.reset()
        ex = dynamo.explain(block)(x0)
        assert ex.graph_count == 1 and ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
        dynamo.reset()
        assert_close(run(torch.compile(block, backend="aot_eager")), padded, rtol=0, atol=0)


def test_grouped_mm_probe_first_reached_inside_a_checkpointed_mixture():
    """The probe's own backward, run where activation checkpointing's saved-tensor hooks are active (the first mixture
    forward of a training run with model.activation_checkpointing), set off the block's recompute, which stopped it
    with an exception: the loop for the rest of the run. In its own thread it is not reached by those hooks."""
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, d_ff=32, vocab_size=64, moe_experts=4,
                      moe_top_k=2, activation_checkpointing="full")
    cfg.validate()
    model = Transformer(cfg)
    kernels._grouped_mm_works.cache_clear()
    try:
        model(torch.randint(0, 64, (2, 8))).float().pow(2).mean().backward()  # the probe runs inside the checkpoint
        assert kernels._grouped_mm_works.cache_info().currsize == 1
        assert kernels._grouped_mm_works("cpu", None, torch.float32)  # the cached verdict: the kernel works
        assert float(model.blocks[0].ffn.experts.w2.grad.abs().sum()) > 0
    finally:
        kernels._grouped_mm_works.cache_clear()


def _kernel_users(model):
    users = [m for m in model.modules() if hasattr(m, "kernels")]
    # 2 blocks x (attn norm, q / k norm, attention (RoPE), ffn norm, SwiGLU) + the final norm
    assert len(users) == 2 * 6 + 1
    return {m.kernels for m in users}


def test_model_default_is_torch_everywhere():
    assert _kernel_users(Transformer(_cfg())) == {"torch"}


def test_liger_choice_reaches_every_op(monkeypatch):
    """Built (not run: no CUDA here) with kernels=liger where the package imports; skipped where it does not."""
    pytest.importorskip("liger_kernel", reason="liger-kernel not installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _kernel_users(Transformer(_cfg(kernels="liger"))) == {"liger"}


def test_hf_teacher_gets_the_students_kernels(tmp_path, monkeypatch):
    """distill.teacher=hf:PATH: the teacher's ModelConfig comes from config.json; model.kernels is the student's."""
    from megadistill.hf.config import from_model_config
    from megadistill.parallel.groups import ParallelGroups
    from megadistill.train.teacher import load_teacher, teacher_source

    folder = tmp_path / "hf_teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(from_model_config(_cfg(), max_position=64)))
    cfg = config.load([], tiny_overrides(tmp_path / "student", "distill",
                                         ["train.steps=1", f"distill.teacher=hf:{folder}", "model.kernels=liger"]))
    src = teacher_source(cfg)
    assert src.hf and src.model_cfg.kernels == "liger"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="model.kernels='liger'"):  # the teacher's build checks it too
        load_teacher(cfg, ParallelGroups.single(), torch.device("cpu"), src)


# ----------------------------------------------------------------------------------------- Liger itself (GPU / CPU)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_liger_ops_match_torch_on_cuda(dtype):
    """975M widths (d 2176, d_ff 5888, 16 heads x 128), seq 1024: values and grads (tolerances in liger_cases)."""
    pytest.importorskip("liger_kernel", reason="liger-kernel not installed (pip install .[liger])")
    errs = liger_cases.op_errors("cuda", dtype)
    print(json.dumps(errs))
    liger_cases.assert_within(errs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_liger_transformer_matches_torch_on_cuda(dtype):
    """A Transformer (QK-norm, GQA 8 / 2 heads) built with model.kernels=liger vs torch: logits and every grad."""
    pytest.importorskip("liger_kernel", reason="liger-kernel not installed (pip install .[liger])")
    errs = liger_cases.model_errors("cuda", dtype, small=False)
    print(json.dumps(errs))
    liger_cases.assert_within(errs, dtype, liger_cases.MODEL_FP32_TOL)


@pytest.mark.gpu
def test_liger_in_compiled_blocks_matches_eager_torch():
    """train.compile with kernels=liger: the Liger ops are graph breaks (torch.compiler.disable) inside the compiled
    blocks; logits and grads equal the eager torch model's in fp32."""
    pytest.importorskip("liger_kernel", reason="liger-kernel not installed (pip install .[liger])")
    errs = liger_cases.compiled_errors("cuda", "inductor")
    print(json.dumps(errs))
    liger_cases.assert_within(errs, torch.float32, liger_cases.MODEL_FP32_TOL)


def _interpreter_available() -> bool:
    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec("liger_kernel") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _interpreter_available(), reason="needs triton and liger-kernel importable (pip install "
                                                          "triton liger-kernel); runs them on CPU, interpreted")
def test_liger_under_triton_interpreter_on_cpu():
    """Liger's kernels executed by Triton's interpreter on CPU tensors (tests/liger_interpret.py, a subprocess with
    TRITON_INTERPRET=1): every op in fp32 and RMSNorm in bf16, a whole tiny Transformer eager and compiled."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("liger_interpret.py"))], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout)
    print(json.dumps(out))
    liger_cases.assert_within(out["ops_fp32"], torch.float32)
    for key in ("model_fp32", "compiled_fp32"):
        liger_cases.assert_within(out[key], torch.float32, liger_cases.MODEL_FP32_TOL)
    liger_cases.assert_within(out["ops_bf16"], torch.bfloat16)
    # under compile each Liger call is a graph break (torch.compiler.disable): 6 calls per block with QK-norm, q-norm
    # and k-norm back to back (no graph between them), so 6 graphs where the torch block is one
    assert out["block_graphs"]["torch"] == {"graphs": 1, "graph_breaks": 0}
    assert 2 <= out["block_graphs"]["liger"]["graphs"] <= 7
