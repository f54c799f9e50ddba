"""Single-process model tests: shapes, causality, RoPE, SDPA vs eager, document masks, checkpointing, µP groups."""
import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from megadistill.config import ModelConfig
from megadistill.errors import UserError
from megadistill.model import mup
from megadistill.model.attention import Rotary, apply_rotary, attention, build_mask, document_segments
from megadistill.model.transformer import Transformer
from megadistill.parallel.layers import LayerFactory
from megadistill.parallel.mappings import (copy_to_tp_region, gather_from_tp_region, reduce_from_tp_region,
                                           scatter_to_tp_region)


def tiny_cfg(**kw):
    base = dict(n_layers=2, d_model=64, n_heads=4, head_dim=16, d_ff=192, vocab_size=128)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny_cfg(**kw))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def loss_fn(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_shapes_and_head_matmul():
    model = build()
    ids = torch.randint(0, 128, (3, 10))
    logits = model(ids)
    h = model.hidden_states(ids)
    assert logits.shape == (3, 10, 128) and h.shape == (3, 10, 64)
    assert model.output_weight.shape == (128, 64) and model.output_weight is model.head.weight
    assert_close(logits, h @ model.output_weight.T)
    # final RMSNorm with unit gains: every hidden vector has RMS 1
    assert_close(h.pow(2).mean(-1), torch.ones(3, 10), atol=1e-4, rtol=0)


def test_no_biases_and_tp_attributes_on_matrices():
    model = build()
    for name, p in model.named_parameters():
        assert "bias" not in name
        if p.dim() == 2:
            assert p.tensor_model_parallel and p.partition_stride == 1
            assert p.partition_dim == (1 if name.endswith(("wo.weight", "w2.weight")) else 0), name
        else:
            assert not getattr(p, "tensor_model_parallel", False), name


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_causal_future_tokens_do_not_change_past_logits(backend):
    model = build(attention=backend)
    ids = torch.randint(0, 128, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % 128
    a, b = model(ids), model(changed)
    assert_close(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


def test_rope_depends_only_on_relative_position():
    rope = Rotary(16, 500000.0)
    cos, sin = rope(40, "cpu", torch.float64)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    qs = apply_rotary(q.expand(1, 40, 1, 16), cos, sin)[0, :, 0]  # [40, 16], q placed at every position
    ks = apply_rotary(k.expand(1, 40, 1, 16), cos, sin)[0, :, 0]
    dots = qs @ ks.T  # [m, n]
    for delta in (0, 3, 17):
        diag = torch.diagonal(dots, offset=-delta)  # entries with m - n = delta
        assert_close(diag, diag[:1].expand_as(diag))
    assert (dots[5, 2] - dots[5, 1]).abs() > 1e-6  # it does depend on the offset
    assert_close(qs.norm(dim=-1), q.norm().expand(40))  # rotations keep norms
    assert rope(40, "cpu", torch.float64)[0] is cos  # cached per (seq_len, device, dtype)
    assert rope(40, "cpu", torch.float32)[0].dtype == torch.float32


def test_model_logits_are_shift_invariant_inside_a_document():
    # the same document placed at offset 0 or after another document gives the same logits (RoPE is relative)
    model = build()
    doc = torch.randint(0, 128, (1, 9))
    other = torch.randint(0, 128, (1, 5))
    packed = torch.cat([other, doc], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 9])
    assert_close(model(packed, doc_ids)[:, 5:], model(doc), atol=1e-5, rtol=1e-4)


def _qkv(b=2, s=11, h=3, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, hd, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("with_docs", [False, True])
def test_sdpa_matches_eager_values_and_grads(with_docs):
    q, k, v = _qkv()
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7]])
    out = {}
    for backend in ("sdpa", "eager"):
        mask = build_mask(doc_ids, backend) if with_docs else None
        o = attention(q, k, v, backend, mask)
        out[backend] = (o, torch.autograd.grad((o * o.detach().sin()).sum(), (q, k, v)))
    assert_close(out["sdpa"][0], out["eager"][0])
    for gs, ge in zip(out["sdpa"][1], out["eager"][1]):
        assert_close(gs, ge)


def test_doc_masked_attention_equals_each_document_alone():
    q, k, v = _qkv(b=2, s=10)
    doc_ids = torch.tensor([[3, 3, 3, 3, 9, 9, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 2, 2, 2]])
    for backend in ("sdpa", "eager"):
        packed = attention(q, k, v, backend, build_mask(doc_ids, backend))
        for row in range(2):
            seg = document_segments(doc_ids)[row]
            for sid in seg.unique():
                idx = (seg == sid).nonzero().squeeze(1)
                lo, hi = int(idx[0]), int(idx[-1]) + 1
                alone = attention(q[row:row + 1, lo:hi], k[row:row + 1, lo:hi], v[row:row + 1, lo:hi], "eager")
                assert_close(packed[row:row + 1, lo:hi], alone)


def test_documents_are_runs_of_equal_ids():
    assert document_segments(torch.tensor([[4, 4, 2, 2, 4, 7]])).tolist() == [[0, 0, 1, 1, 2, 3]]
    mask = build_mask(torch.tensor([[4, 4, 2, 4]]), "eager").allowed[0, 0]
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False],
                             [False, False, True, False], [False, False, False, True]]


@pytest.mark.parametrize("with_docs", [False, True])
def test_sliding_window_is_each_querys_last_window_alone(with_docs):
    """Window w: query i attends to keys i - w + 1 .. i (within its document) -- each output equals attention over
    that slice alone; sdpa and eager agree on values and grads."""
    q, k, v = _qkv(b=2, s=12)
    w = 4
    doc_ids = torch.tensor([[0] * 7 + [1] * 5, [2] * 12]) if with_docs else None
    out = {}
    for backend in ("sdpa", "eager"):
        mask = build_mask(doc_ids, backend, 12, w)
        o = attention(q, k, v, backend, mask)
        out[backend] = (o, torch.autograd.grad((o * o.detach().sin()).sum(), (q, k, v)))
        starts = document_segments(doc_ids) if with_docs else torch.zeros(2, 12, dtype=torch.long)
        for row in range(2):
            for i in range(12):
                doc_start = int((starts[row] == starts[row, i]).nonzero()[0])
                lo = max(i - w + 1, doc_start)
                alone = attention(*(t[row:row + 1, lo:i + 1] for t in (q, k, v)), "eager")[:, -1]
                assert_close(o[row:row + 1, i], alone)
    assert_close(out["sdpa"][0], out["eager"][0])
    for gs, ge in zip(out["sdpa"][1], out["eager"][1]):
        assert_close(gs, ge)


@pytest.mark.parametrize("window", [0, 4])
def test_sdpa_with_the_additive_bias_is_the_bool_masks_attention(window):
    """The 0 / -inf bias built once per forward (what Transformer hands SDPA on CUDA) gives the bool mask's values
    and gradients; a bias of another dtype than q is not used (the bool mask is)."""
    q, k, v = _qkv(b=2, s=12)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    plain = build_mask(doc_ids, "sdpa", 12, window)
    biased = build_mask(doc_ids, "sdpa", 12, window, bias_dtype=q.dtype)
    assert plain.bias is None and biased.bias.dtype == q.dtype
    assert torch.equal(biased.bias == 0, biased.allowed) and bool((biased.bias[~biased.allowed] == float("-inf")).all())
    out = []
    for mask in (plain, biased):
        o = attention(q, k, v, "sdpa", mask)
        out.append((o, torch.autograd.grad((o * o.detach().sin()).sum(), (q, k, v))))
    assert_close(out[1][0], out[0][0])
    for a, b in zip(out[1][1], out[0][1]):
        assert_close(a, b)
    biased.bias.fill_(float("nan"))  # SDPA reads the bias, not the bool mask beside it
    assert attention(q, k, v, "sdpa", biased).isnan().all()
    wrong = build_mask(doc_ids, "sdpa", 12, window, bias_dtype=torch.float32)  # q is float64
    wrong.bias.fill_(float("nan"))  # would poison the output if it were read
    assert_close(attention(q, k, v, "sdpa", wrong), out[0][0])


def test_sdpa_repeats_grouped_kv_only_where_cuda_would_fall_to_the_math_kernel():
    from megadistill.model.attention import sdpa_repeats_kv
    assert not sdpa_repeats_kv("cuda", torch.bfloat16, masked=False)  # flash / cuDNN take enable_gqa
    assert sdpa_repeats_kv("cuda", torch.bfloat16, masked=True)  # documents / a window: memory-efficient kernel
    assert sdpa_repeats_kv("cuda", torch.float32, masked=False)  # fp32 (a default teacher): memory-efficient
    assert not any(sdpa_repeats_kv("cpu", dt, m) for dt in (torch.float32, torch.bfloat16) for m in (False, True))


def test_repeated_grouped_kv_is_enable_gqas_attention(monkeypatch):
    """The repeated k / v (the CUDA path above, forced here) pair query head i with k / v head i // group, as
    enable_gqa and the eager reference do: same values and gradients, with a document mask and without."""
    from megadistill.model import attention as attn
    torch.manual_seed(0)
    q = torch.randn(2, 12, 8, 16, requires_grad=True)
    k, v = (torch.randn(2, 12, 2, 16, requires_grad=True) for _ in range(2))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    for docs in (None, doc_ids):
        mask = build_mask(docs, "sdpa") if docs is not None else None
        out = {}
        for repeat in (False, True):
            monkeypatch.setattr(attn, "sdpa_repeats_kv", lambda *a, r=repeat: r)
            o = attention(q, k, v, "sdpa", mask)
            out[repeat] = (o, torch.autograd.grad((o * o.detach().sin()).sum(), (q, k, v)))
        ref = attention(q, k, v, "eager", build_mask(docs, "eager") if docs is not None else None)
        assert_close(out[True][0], ref)
        assert_close(out[True][0], out[False][0])
        for a, b in zip(out[True][1], out[False][1]):
            assert_close(a, b)


def test_window_masks_per_backend():
    assert build_mask(None, "sdpa", 12, 12) is None and build_mask(None, "flash", 12, 0) is None  # plain causal
    assert build_mask(None, "sdpa", 13, 12).allowed[0, 0].sum(1).tolist() == list(range(1, 13)) + [12]
    flash = build_mask(None, "flash", 16, 4)  # flash-attn takes the window as window_size=(3, 0)
    assert flash.window == 4 and flash.cu_seqlens is None
    docs = build_mask(torch.tensor([[0] * 10 + [1] * 6]), "flash", window=4)
    assert docs.window == 4 and docs.cu_seqlens.tolist() == [0, 10, 16]
    # static under compile: the row length as the bound (no read-back), the document count a dynamic dimension
    assert docs.max_seqlen == 16 and 0 in docs.cu_seqlens._dynamo_dynamic_indices
    assert build_mask(torch.tensor([[0] * 10 + [1] * 6]), "flash", window=16).window == 0
    with pytest.raises(ValueError, match="window=-1"):
        build_mask(None, "sdpa", 8, -1)


def test_masks_from_host_document_ids_are_built_for_the_attention_device():
    """The trainer passes document ids on the host: every backend's mask lands on the device attention runs on
    ("meta" stands in for a GPU here), and flash-attn's run starts are found on the host (values checked there)."""
    docs = torch.tensor([[0] * 10 + [1] * 6, [4] * 3 + [5] * 13])
    flash = build_mask(docs, "flash", window=4, device="meta")
    assert flash.cu_seqlens.device.type == "meta" and flash.cu_seqlens.shape == (5,) and flash.window == 4
    assert 0 in flash.cu_seqlens._dynamo_dynamic_indices and flash.max_seqlen == 16
    assert build_mask(docs, "flash", device="cpu").cu_seqlens.tolist() == [0, 10, 16, 19, 32]
    for backend in ("sdpa", "eager"):
        mask = build_mask(docs, backend, window=4, device="meta")
        assert mask.allowed.device.type == "meta" and mask.allowed.shape == (2, 1, 16, 16)
        assert mask.segments.device.type == "meta"
    with pytest.raises(ValueError, match="window=-1"):
        build_mask(docs, "flash", window=-1, device="meta")


def test_dense_masks_follow_the_lag_rule():
    """build_mask's [s, s] part is j <= i and i - j < window, for windows from 1 token to past the sequence."""
    for s in (1, 5, 13):
        lag = torch.arange(s).unsqueeze(1) - torch.arange(s).unsqueeze(0)
        for w in (0, 1, 3, 12, 20):
            mask = build_mask(None, "sdpa", s, w)
            if not 0 < w < s:
                assert mask is None
                continue
            assert torch.equal(mask.allowed[0, 0], (lag >= 0) & (lag < w)), (s, w)


def test_model_sdpa_matches_eager_with_and_without_docs():
    ids = torch.randint(0, 128, (2, 16))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 3 + [1] * 4 + [2] * 9])
    for docs in (None, doc_ids):
        res = []
        for backend in ("sdpa", "eager"):
            model = build(seed=3, attention=backend)
            logits = model(ids, docs)
            loss_fn(logits, ids).backward()
            res.append((logits, grads(model)))
        assert_close(res[0][0], res[1][0], atol=1e-5, rtol=1e-4)
        for name in res[0][1]:
            assert_close(res[0][1][name], res[1][1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode,k", [("full", 2), ("every_k", 2), ("every_k", 1)])
def test_activation_checkpointing_gives_identical_grads(mode, k):
    ids = torch.randint(0, 128, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    ref = build(seed=1, n_layers=3)
    loss_fn(ref(ids, doc_ids), ids).backward()
    ckpt = build(seed=1, n_layers=3, activation_checkpointing=mode, checkpoint_every_k=k)
    assert [ckpt._checkpointed(i) for i in range(3)] == ([True] * 3 if mode == "full" or k == 1
                                                         else [True, False, True])
    loss_fn(ckpt(ids, doc_ids), ids).backward()
    g_ref, g_ck = grads(ref), grads(ckpt)
    for name in g_ref:
        assert_close(g_ck[name], g_ref[name], atol=0, rtol=0, msg=name)
    ckpt.eval()
    assert not ckpt._checkpointed(0)


def test_flash_backend_needs_flash_attn():
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash_attn is installed")
    except ImportError:
        pass
    q, k, v = _qkv()
    with pytest.raises(UserError, match=r"install the GPU extra .* or set model.attention=sdpa"):
        attention(q, k, v, "flash")


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="model.n_heads=4 is not divisible by parallel.tp_size=3"):
        Transformer(tiny_cfg(vocab_size=126), factory=_FakeTP(3))
    with pytest.raises(UserError, match="model.attention='fast'"):
        Transformer(dataclasses.replace(tiny_cfg(), attention="fast"))


class _FakeTP(LayerFactory):
    """Dense factory that claims a tp_size, to reach the divisibility checks without processes."""

    def __init__(self, tp_size):
        super().__init__()
        self.tp_size = tp_size


def test_mup_groups_cover_every_parameter_once():
    cfg = tiny_cfg(mup_base_width=32)
    model = Transformer(cfg)
    groups = mup.param_groups(model, cfg)
    assert [g["name"] for g in groups] == ["embedding", "hidden", "head", "norm"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    by = {g["name"]: g for g in groups}
    assert by["hidden"]["lr_mult"] == by["head"]["lr_mult"] == 32 / 64
    assert by["embedding"]["lr_mult"] == by["norm"]["lr_mult"] == 1.0
    assert [by[r]["decay"] for r in ("embedding", "hidden", "head", "norm")] == [True, True, True, False]
    assert len(by["norm"]["params"]) == 2 * 4 + 1  # 2 pre-norms + 2 QK-norms per block, final norm
    assert by["embedding"]["params"] == [model.embed.weight] and by["head"]["params"] == [model.head.weight]
    model.embed.weight.requires_grad_(False)
    assert [g["name"] for g in mup.param_groups(model, cfg)] == ["hidden", "head", "norm"]


def test_qkv_biases_are_their_own_mup_group_counted_in_n():
    """model.qkv_bias (Qwen2): Q/K/V biases, zero at init, in a "bias" group with an unscaled LR and no weight decay;
    params_of's N counts them (the built model's stored weights minus the vocabulary matrices)."""
    from megadistill.model.sizes import params_of
    cfg = tiny_cfg(mup_base_width=32, qkv_bias=True, qk_norm=False, n_kv_heads=2)
    model = Transformer(cfg)
    by = {g["name"]: g for g in mup.param_groups(model, cfg)}
    assert list(by) == ["embedding", "hidden", "head", "norm", "bias"]
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert by["bias"]["params"] == biases and len(biases) == 3 * cfg.n_layers
    assert by["bias"]["lr_mult"] == 1.0 and by["bias"]["decay"] is False
    assert all(not b.detach().any() for b in biases)
    attn = model.blocks[0].attn
    assert [b.shape[0] for b in (attn.wq.bias, attn.wk.bias, attn.wv.bias)] == [4 * 16, 2 * 16, 2 * 16]
    n = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel() - model.head.weight.numel()
    assert params_of(cfg)[0] == n


def test_mup_init_scales():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(d_model=256, n_heads=8, head_dim=32, d_ff=704, vocab_size=1024))
    blk = model.blocks[0]
    for w, fan_in in ((blk.attn.wq.weight, 256), (blk.attn.wo.weight, 256), (blk.ffn.w2.weight, 704),
                      (model.head.weight, 256)):
        assert w.std().item() == pytest.approx(1 / math.sqrt(fan_in), rel=0.05)
    assert model.embed.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert torch.equal(blk.attn.q_norm.weight, torch.ones(32))
    assert mup.init_std_for("hidden", 100) == 0.1 and mup.lr_mult_for("head", 512, 256) == 0.5
    with pytest.raises(ValueError, match="unknown µP role"):
        mup.tag(model, "gain")


def test_mappings_are_identity_without_a_group():
    x = torch.randn(3, 4, requires_grad=True)
    for fn in (copy_to_tp_region, reduce_from_tp_region, scatter_to_tp_region, gather_from_tp_region):
        y = fn(x, None)
        assert y is x


def test_partial_rope_rotates_the_first_dims_and_keeps_relative_positions():
    """model.rope_fraction (HF partial_rotary_factor): the first int(head_dim x fraction) dims of each head rotate,
    the rest pass through; scores still depend on positions only through their difference."""
    from megadistill.config import ConfigError
    from megadistill.model import kernels
    model = Transformer(tiny_cfg(rope_fraction=0.5))  # head_dim 16: 8 dims rotate
    cos, sin = model.rope(12, "cpu", torch.float64)
    assert cos.shape == (12, 8)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 12, 4, 16, generator=g, dtype=torch.float64) for _ in range(2))
    qr, kr = kernels.rope(q, k, cos, sin)
    assert torch.equal(qr[..., 8:], q[..., 8:]) and torch.equal(kr[..., 8:], k[..., 8:])
    assert_close(qr[..., :8], apply_rotary(q[..., :8], cos, sin))
    one_q, one_k = q[:, :1].expand(1, 12, 4, 16), k[:, :1].expand(1, 12, 4, 16)  # the same vectors at every position
    qr, kr = kernels.rope(one_q, one_k, cos, sin)
    score = lambda m, n: (qr[0, m] * kr[0, n]).sum(-1)  # noqa: E731  [h]
    assert_close(score(5, 2), score(9, 6))
    assert_close(score(3, 3), score(11, 11))
    assert not torch.allclose(score(5, 2), score(5, 4))
    with pytest.raises(ConfigError, match="rope_fraction=0.1 must be in"):
        tiny_cfg(rope_fraction=0.1)  # int(16 x 0.1) = 1 dim: nothing to pair it with


@pytest.mark.parametrize("params", [
    {"factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen2.5 / Qwen3's long-context setting
    {"factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    {"factor": 2.0, "original_max_position_embeddings": 2048, "attention_factor": 1.3},
])
@pytest.mark.parametrize("base,head_dim", [(1e6, 128), (1e4, 64)])
def test_yarn_frequencies_equal_transformers(params, base, head_dim):
    """YaRN's per-frequency ramp (kept / blended / divided by factor) and cos / sin scale, against transformers'
    _compute_yarn_parameters on realistic head sizes, through the HF config import."""
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megadistill.hf.config import to_model_config
    from megadistill.model.attention import RopeScaling
    rope = {"rope_type": "yarn", "rope_theta": base, **params}
    hf = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=head_dim * 4, intermediate_size=64,
              num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1, vocab_size=64,
              max_position_embeddings=131072, rope_parameters=rope)
    theirs, their_scale = ROPE_INIT_FUNCTIONS["yarn"](Qwen2Config(**hf))
    m = to_model_config(hf)
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ours = RopeScaling.of(m).apply(inv, 0, m.rope_base)
    assert_close(ours.float(), theirs, rtol=1e-6, atol=0)
    assert RopeScaling.of(m).scale() == pytest.approx(their_scale)
    kept, divided = (ours / inv - 1).abs() < 1e-12, (ours * m.rope_factor / inv - 1).abs() < 1e-12
    assert kept[0] and divided[-1] and kept.sum() + divided.sum() < len(inv)  # all three regimes present


def test_moe_unrouted_experts_get_zero_gradients():
    """16 experts, top 1, 3 tokens: most experts see no token, yet every parameter gets a gradient (zeros for the
    unrouted), as DeepSpeed's ZeRO reductions expect one per parameter; the routed ones get non-zero gradients."""
    from megadistill.config import ModelConfig
    from megadistill.model.transformer import Transformer
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, head_dim=16, d_ff=32, vocab_size=64, moe_experts=16,
                      moe_top_k=1)
    cfg.validate()
    torch.manual_seed(0)
    model = Transformer(cfg)
    model(torch.tensor([[1, 2, 3]])).float().pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    for w in ("w1", "w2", "w3"):  # [E, ...]: one slice per expert
        used = {e for e, g in enumerate(grads[f"blocks.0.ffn.experts.{w}"]) if float(g.abs().sum()) > 0}
        assert 1 <= len(used) <= 3


def test_moe_router_losses_are_switch_transformers_and_st_moe():
    """Transformer.moe_router_losses: [load balance, z-loss], each summed over blocks. Per block the balance is
    E sum_e f_e P_e (f_e the share of the t k routed copies sent to expert e, P_e its mean router probability), 1 when
    the router is uniform, and only its P_e carries gradient (to the routers and below); the z-loss the mean over
    tokens of logsumexp(router logits)^2, value and gradient as torch.logsumexp's. Both from an independent
    computation on the routers' outputs; read once, and not kept by forwards without autograd (a teacher's)."""
    from megadistill.config import ModelConfig
    from megadistill.model.transformer import Transformer
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, d_ff=32, vocab_size=64, moe_experts=8,
                      moe_top_k=2)
    cfg.validate()
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for b in model.blocks:
            b.ffn.router.weight.mul_(30)  # logits of a few units: logsumexp far from log E, gradients not tiny
    scores = []
    hooks = [b.ffn.router.register_forward_hook(lambda m, i, o: scores.append(o)) for b in model.blocks]
    model(torch.randint(0, 64, (2, 12)))
    for h in hooks:
        h.remove()
    ref, ref_z = 0.0, 0.0
    for z in scores:
        probs = torch.softmax(z.detach().float(), -1)
        ids = probs.topk(2, -1).indices
        f = torch.stack([(ids == e).sum() for e in range(8)]).float() / ids.numel()
        ref += 8 * float((f * probs.mean(0)).sum())
        ref_z = ref_z + torch.logsumexp(z.float(), -1).square().mean()
    losses = model.moe_router_losses()
    assert losses.shape == (2,) and losses.requires_grad and ref > 2.05 and float(ref_z.detach()) > 2 * 5
    assert float(losses[0].detach()) == pytest.approx(ref, rel=1e-6)
    assert float(losses[1].detach()) == pytest.approx(float(ref_z.detach()), rel=1e-5)
    assert model.moe_router_losses() is None  # read once
    router = model.blocks[1].ffn.router.weight
    g_ref = torch.autograd.grad(ref_z, router, retain_graph=True)[0]  # the z-loss gradient: torch.logsumexp's
    assert_close(torch.autograd.grad(losses[1], router, retain_graph=True)[0], g_ref, rtol=1e-4, atol=1e-6)
    losses[0].backward()
    assert float(router.grad.abs().sum()) > 0
    assert float(model.embed.weight.grad.abs().sum()) > 0 and model.blocks[1].ffn.experts.w1.grad is None
    with torch.no_grad():
        for b in model.blocks:
            b.ffn.router.weight.zero_()  # uniform routing: P_e = 1 / E whatever the counts; logsumexp = log E
        model(torch.randint(0, 64, (2, 12)))
        assert model.moe_router_losses() is None  # no autograd: nothing kept
    model(torch.randint(0, 64, (2, 12)))
    assert_close(model.moe_router_losses().detach(), torch.tensor([2.0, 2 * math.log(8) ** 2]), rtol=1e-6, atol=0)
    assert Transformer(ModelConfig(n_layers=1, d_model=32, n_heads=2, head_dim=16, d_ff=32,
                                   vocab_size=64)).moe_router_losses() is None
    cfg.activation_checkpointing = "full"  # recomputing the blocks in backward keeps no second balance loss
    ckpt = Transformer(cfg)
    (ckpt(torch.randint(0, 64, (2, 12))).float().pow(2).mean() + ckpt.moe_router_losses().sum()).backward()
    assert all(b.ffn.router_losses is None for b in ckpt.blocks)
    assert float(ckpt.blocks[0].ffn.router.weight.grad.abs().sum()) > 0
    ids = torch.randint(0, 64, (2, 12))
    ckpt(ids).float().pow(2).mean().backward()  # read after the recompute: still this forward's, once per block
    model.load_state_dict(ckpt.state_dict())
    model(ids)
    assert_close(ckpt.moe_router_losses().detach(), model.moe_router_losses().detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_objective_adds_the_weighted_router_losses(tmp_path, fused):
    """A mixture-of-experts student's objective = the token loss + train.moe_aux_loss x the balance loss +
    train.moe_router_z_loss x the router z-loss (stats moe_aux and moe_z, logged at weight 0 too); a dense student's
    has neither."""
    from tiny_runs import tiny_overrides

    from megadistill import config
    from megadistill.model.transformer import Transformer
    from megadistill.train.objective import Objective
    moe = ["model.moe_experts=4", "model.moe_top_k=2", "model.d_ff=64", f"distill.fused={str(fused).lower()}"]
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for aux_w, z_w in ((0.0, 0.0), (0.5, 0.0), (0.0, 0.25), (0.5, 0.25)):
        cfg = config.load([], tiny_overrides(tmp_path, "supervised", [
            "train.steps=1", *moe, f"train.moe_aux_loss={aux_w}", f"train.moe_router_z_loss={z_w}"]))
        torch.manual_seed(0)
        loss, stats = Objective(Transformer(cfg.model), cfg)(ids, ids)
        out[aux_w, z_w] = (float(loss.detach()), float(stats["moe_aux"]), float(stats["moe_z"]))
    base, aux, z = out[0.0, 0.0]
    assert all(v[1:] == (aux, z) for v in out.values()) and aux > 1 and z > 0
    assert out[0.5, 0.0][0] - base == pytest.approx(0.5 * aux, rel=1e-5)
    assert out[0.0, 0.25][0] - base == pytest.approx(0.25 * z, rel=1e-5)
    assert out[0.5, 0.25][0] - base == pytest.approx(0.5 * aux + 0.25 * z, rel=1e-5)
    cfg = config.load([], tiny_overrides(tmp_path, "supervised", ["train.steps=1"]))
    assert not {"moe_aux", "moe_z"} & set(Objective(Transformer(cfg.model), cfg)(ids, ids)[1])
