"""model.attention=flex on CPU: the block masks built from document runs are torch's create_block_mask's, block for
block; the compiled FlexAttention kernel gives the dense mask's attention (documents, windows, softcap, GQA) in a
forward, new documents reuse its graph, a Gemma-2-like model compiles to one graph per block, and a training forward
on CPU is refused by name. Gradients need the GPU (torch has no CPU backward for FlexAttention): tests/test_gpu.py."""
import dataclasses

import pytest
import torch
import torch._dynamo as dynamo
from torch.testing import assert_close

from megadistill import config
from megadistill.errors import UserError
from megadistill.model import flex
from megadistill.model.attention import attention, build_mask, document_segments
from megadistill.model.transformer import Transformer
from megadistill.train import memory


def _kinds(bm) -> torch.Tensor:
    """[b, n, n]: 0 = key block skipped, 1 = partial (rule evaluated per pair), 2 = full."""
    b, _, n = bm.kv_num_blocks.shape
    out = torch.zeros(b, n, bm.kv_indices.shape[-1], dtype=torch.int8)
    for val, count, index in ((1, bm.kv_num_blocks, bm.kv_indices), (2, bm.full_kv_num_blocks, bm.full_kv_indices)):
        for r in range(b):
            for i in range(n):
                out[r, i, index[r, 0, i, :count[r, 0, i]].long()] = val
    return out


def _docs(s: int) -> torch.Tensor:
    """Two rows: documents ending inside and exactly at 128-token blocks, a one-token document, and one long one."""
    a = torch.tensor([0] * 100 + [1] * 156 + [2] + [3] * (s - 257))
    b = torch.tensor([5] * (s - 40) + [6] * 40)
    return torch.stack([a, b])


@pytest.mark.parametrize("seq", [384, 520])  # a whole number of blocks, and a short last block
@pytest.mark.parametrize("window", [0, 100, 129, 256])
@pytest.mark.parametrize("docs", [False, True])
def test_block_mask_is_torchs_create_block_mask(seq, window, docs):
    from torch.nn.attention.flex_attention import create_block_mask
    seg = document_segments(_docs(seq)) if docs else None
    ours = flex.block_mask(seg, seq, window)
    ref = create_block_mask(flex._pair_rule(seg, window), 2 if docs else 1, None, seq, seq, device="cpu")
    kinds = _kinds(ours)
    assert torch.equal(kinds, _kinds(ref))
    if docs or window in (100, 129):  # the first row's documents, a window under a block: whole blocks skipped
        n = kinds.shape[-1]
        assert (kinds[:, torch.ones(n, n, dtype=torch.bool).tril(-1)] == 0).any()
    assert (kinds.diagonal(dim1=1, dim2=2) == 1).all()  # causal within the block


def test_plain_block_masks_are_cached_and_document_masks_are_not():
    with torch.inference_mode():  # a teacher's forward builds it first; the student's training forward reuses it
        first = flex.block_mask(None, 256, 0)
    assert flex.block_mask(None, 256, 0) is first
    assert not any(t.is_inference() for t in first.as_tuple() if isinstance(t, torch.Tensor))
    seg = document_segments(_docs(384))
    assert flex.block_mask(seg, 384) is not flex.block_mask(seg, 384)
    with pytest.raises(ValueError, match=r"segments \(2, 384\) must be \[batch, 256\]"):
        flex._build(seg, 256, 0, "cpu")


def _qkv(s=384, heads=4, kv_heads=2, hd=32):
    torch.manual_seed(0)
    return torch.randn(2, s, heads, hd), torch.randn(2, s, kv_heads, hd), torch.randn(2, s, kv_heads, hd)


def test_flex_forward_is_the_dense_masks_attention():
    """One compiled kernel (documents + window + softcap + GQA + a scale), then the plain causal one, against the
    eager reference's explicit scores; then new documents of the same shape reuse the compiled graph."""
    q, k, v = _qkv()
    doc_ids = _docs(384)
    counters = dynamo.utils.counters["stats"]
    for docs, window, cap in ((doc_ids, 100, 5.0), (None, 0, 0.0)):
        ref = attention(q, k, v, "eager", build_mask(docs, "eager", 384, window), scale=0.1, softcap=cap)
        out = attention(q, k, v, "flex", build_mask(docs, "flex", 384, window), scale=0.1, softcap=cap)
        assert_close(out, ref, atol=2e-5, rtol=1e-4)
    graphs = counters["unique_graphs"]
    shifted = torch.roll(doc_ids, 37, dims=1)  # other document boundaries, same shape
    ref = attention(q, k, v, "eager", build_mask(shifted, "eager", 384, 100), scale=0.1, softcap=5.0)
    out = attention(q, k, v, "flex", build_mask(shifted, "flex", 384, 100), scale=0.1, softcap=5.0)
    assert_close(out, ref, atol=2e-5, rtol=1e-4)  # not the first documents' mask baked into the graph
    assert counters["unique_graphs"] == graphs


def test_eager_paths_kernel_is_not_held_to_dynamos_recompile_limit():
    """Each new shape compiles a graph of its own, past dynamo's recompile limit (here 1, 8 by default): a run meets
    several (student, evaluation, teacher, sliding / full blocks), and past the limit FlexAttention would run its dense
    reference."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch.nn.attention.flex_attention import flex_attention
    dynamo.reset()
    with dynamo.config.patch(recompile_limit=1):
        for hd in (16, 32):
            q, k, v = _qkv(s=128, heads=2, kv_heads=2, hd=hd)
            mask = build_mask(None, "flex", 128, 0)
            assert_close(attention(q, k, v, "flex", mask), attention(q, k, v, "eager", None), atol=2e-5, rtol=1e-4)
        assert len(_debug_get_cache_entry_list(flex_attention.__code__)) == 2
        assert dynamo.config.recompile_limit == 1  # raised for the kernel's calls only


def test_flex_refuses_to_train_on_cpu():
    q, k, v = (t.requires_grad_() for t in _qkv(s=128))
    with pytest.raises(UserError, match="model.attention=flex cannot train on CPU.*model.attention=sdpa"):
        attention(q, k, v, "flex", build_mask(None, "flex", 128, 0))
    q, k, v = (t.detach() for t in (q, k, v))  # a no-grad forward (a teacher's, evaluation) runs
    assert attention(q, k, v, "flex", build_mask(None, "flex", 128, 0)).shape == q.shape
    with pytest.raises(ValueError, match="needs the block mask"):
        attention(q, k, v, "flex", None)


def test_gemma2_like_model_with_flex_compiles_whole_and_matches_eager():
    """Sliding and full blocks, an attention softcap, documents: flex = eager in a no-grad forward, eager and with the
    blocks compiled (each block one graph, FlexAttention inside it; new documents reuse the graphs)."""
    from megadistill.train.compile import compile_blocks
    cfg = config.load([], ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
                           "model.head_dim=16", "model.vocab_size=128", "model.ff_multiple=64",
                           "model.sliding_window=100", "model.layer_types=[sliding,full]", "model.attn_softcap=20",
                           "model.attention=flex", "train.seq_len=384", "train.steps=1"]).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    ref = Transformer(dataclasses.replace(cfg, attention="eager"))
    ref.load_state_dict(model.state_dict())
    ids, doc_ids = torch.randint(0, 128, (2, 384)), _docs(384)
    with torch.no_grad():
        expected = ref(ids, doc_ids)
        assert_close(model(ids, doc_ids), expected, atol=1e-4, rtol=1e-4)
        x = torch.randn(2, 384, 64)
        cos, sin = model.rope(384, x.device, x.dtype)
        dynamo.reset()
        ex = dynamo.explain(model.blocks[0])(x, cos, sin, build_mask(doc_ids, "flex", 384, 100))
        assert ex.graph_break_count == 0 and ex.graph_count == 1, [r.reason for r in ex.break_reasons]
        dynamo.reset()
        # aot_eager: the graphs, not Inductor's flex kernel again (test_flex_forward_is_the_dense_masks_attention)
        assert compile_blocks(model, "aot_eager") == 2
        assert_close(model(ids, doc_ids), expected, atol=1e-4, rtol=1e-4)
        graphs = dynamo.utils.counters["stats"]["unique_graphs"]
        shifted = torch.roll(doc_ids, 37, dims=1)
        assert_close(model(ids, shifted), ref(ids, shifted), atol=1e-4, rtol=1e-4)
        assert dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_config_takes_flex_and_memory_counts_no_scores():
    cfg = config.load([], ["model.attention=flex", "model.attn_softcap=50", "train.steps=1"])
    assert cfg.model.attention == "flex"
    assert not memory.explicit_scores(cfg.model)  # softcap in the kernel: no [b, h, s, s] scores kept
    assert memory.explicit_scores(dataclasses.replace(cfg.model, attention="sdpa"))


def test_backend_needs_are_checked_before_a_run_is_built(monkeypatch):
    """train() calls check_backend first: flex training on CPU, flash off CUDA / without flash-attn / with an fp32
    model (the student's precision or a live teacher's dtype) are named errors; what can run passes."""
    import importlib.util

    from megadistill.model.attention import check_backend
    with pytest.raises(UserError, match="model.attention=flex cannot train on cpu"):
        check_backend("flex", "cpu", {"train.precision": "fp32"})
    check_backend("flex", "cuda", {"train.precision": "fp32"})
    check_backend("sdpa", "cpu", {"train.precision": "fp32"})
    with pytest.raises(UserError, match="model.attention=flash runs flash-attn's CUDA kernels; this run is on cpu"):
        check_backend("flash", "cpu", {"train.precision": "bf16"})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="needs the flash-attn package, which is not installed"):
        check_backend("flash", "cuda", {"train.precision": "bf16"})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    check_backend("flash", "cuda", {"train.precision": "bf16", "distill.teacher_dtype": "bf16"})
    with pytest.raises(UserError, match="distill.teacher_dtype=fp32: set distill.teacher_dtype=bf16"):
        check_backend("flash", "cuda", {"train.precision": "bf16", "distill.teacher_dtype": "fp32"})


def test_flex_in_blocks_compiled_by_another_backend_is_warned_of(caplog):
    """Only Inductor fuses FlexAttention: blocks compiled by aot_eager run its dense reference, and apply() says so."""
    from megadistill.train import compile as compile_mod
    over = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.vocab_size=64",
            "model.attention=flex", "train.compile=true", "train.steps=1"]
    for backend, warned in (("aot_eager", True), ("inductor", False)):
        cfg = config.load([], over + [f"train.compile_backend={backend}"])
        caplog.clear()
        with caplog.at_level("WARNING", logger="megadistill.train.compile"):
            assert compile_mod.apply(cfg, torch.device("cpu"), Transformer(cfg.model)) == 1
        assert ("unfused FlexAttention reference" in caplog.text) == warned, caplog.text
