"""GPU-only checks (marker `gpu`, skipped without CUDA): flash / sdpa-flash / flex attention vs eager in bf16; fused
AdamW; the grouped-GEMM mixture."""
import pytest
import torch

from megadistill.model.attention import attention, build_mask

pytestmark = pytest.mark.gpu


def _qkv(seq=1024, heads=8, hd=64, batch=2):
    torch.manual_seed(0)
    return [torch.randn(batch, seq, heads, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)]


def _run(backend, qkv, mask=None, dtype=torch.bfloat16, softcap=0.0):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in qkv)
    o = attention(q, k, v, backend, mask, softcap=softcap)
    o.float().pow(2).mean().backward()
    return [o.float(), q.grad.float(), k.grad.float(), v.grad.float()]


def _close(a, b, tol):
    for x, y in zip(a, b):
        assert ((x - y).abs().max() / y.abs().max()).item() < tol


def _mask(backend, docs, window):
    doc_ids = (torch.arange(1024, device="cuda") // 300).expand(2, 1024) if docs else None
    return build_mask(doc_ids, backend, 1024, window, "cuda")


@pytest.mark.parametrize("docs,window", [(False, 0), (True, 0), (False, 200), (True, 200)])
def test_sdpa_bf16_matches_fp32_eager(docs, window):
    qkv = _qkv()
    ref = _run("eager", qkv, _mask("eager", docs, window), torch.float32)
    _close(_run("sdpa", qkv, _mask("sdpa", docs, window)), ref, 2e-2)


@pytest.mark.parametrize("docs,window", [(False, 0), (True, 0), (False, 200), (True, 200)])
def test_flash_attn_matches_fp32_eager(docs, window):
    """flash-attn's cu_seqlens and window_size give the dense mask's attention (documents of 300, a window of 200)."""
    pytest.importorskip("flash_attn", reason="flash-attn not installed (pip install .[gpu])")
    qkv = _qkv()
    ref = _run("eager", qkv, _mask("eager", docs, window), torch.float32)
    _close(_run("flash", qkv, _mask("flash", docs, window)), ref, 2e-2)


@pytest.mark.parametrize("docs,window,softcap,kv_heads", [(False, 0, 0.0, 8), (True, 0, 0.0, 2), (False, 200, 20.0, 8),
                                                          (True, 200, 20.0, 2)])
def test_flex_matches_fp32_eager(docs, window, softcap, kv_heads):
    """FlexAttention (compiled, block-sparse) gives the dense mask's attention and gradients: documents of 300, a
    window of 200, a softcap in its score_mod, GQA (8 query heads reading 2 key/value heads)."""
    q, k, v = _qkv()
    k, v = (t.detach()[:, :, :kv_heads].clone().requires_grad_() for t in (k, v))
    ref = _run("eager", (q, k, v), _mask("eager", docs, window), torch.float32, softcap)
    _close(_run("flex", (q, k, v), _mask("flex", docs, window), softcap=softcap), ref, 2e-2)


def test_fused_adamw_on_cuda_matches_foreach():
    """build_optimizer picks torch's fused AdamW for CUDA parameters; its steps match the foreach kernel's (fp32)."""
    from megadistill import config
    from megadistill.model.transformer import Transformer
    from megadistill.train.engine import build_optimizer
    cfg = config.load([], ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.head_dim=32",
                           "model.vocab_size=128", "model.ff_multiple=64", "train.steps=1"])
    torch.manual_seed(0)
    fused_model = Transformer(cfg.model).cuda()
    ref_model = Transformer(cfg.model).cuda()
    ref_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, cfg)
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    ref = build_optimizer(ref_model, cfg)
    for g in ref.param_groups:
        g["fused"], g["foreach"] = False, True
    ids = torch.randint(0, 128, (2, 32), device="cuda")
    for _ in range(3):
        for model, opt in ((fused_model, fused), (ref_model, ref)):
            opt.zero_grad()
            model(ids).float().logsumexp(-1).mean().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_moe_grouped_gemm_on_cuda_matches_the_loop_without_host_syncs():
    """A mixture's experts in bf16 on the GPU: torch._grouped_mm is taken (the probe passes on Hopper), gives the loop's
    output and gradients, and the dispatch (routing, counts, grouped GEMMs, the k-slot sum) never syncs with the host
    (torch.cuda.set_sync_debug_mode('error') raises on any sync)."""
    from unittest import mock

    from megadistill.config import ModelConfig
    from megadistill.model import kernels
    from megadistill.model.transformer import MoEFeedForward
    from megadistill.parallel.layers import LayerFactory
    cfg = ModelConfig(n_layers=1, d_model=256, n_heads=2, head_dim=128, d_ff=128, vocab_size=128, moe_experts=16,
                      moe_top_k=4)
    cfg.validate()
    torch.manual_seed(0)
    block = MoEFeedForward(cfg, cfg.d_ff, LayerFactory(device="cuda", dtype=torch.bfloat16))
    x = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16)

    def run(grouped):
        leaf = x.clone().requires_grad_()
        with mock.patch.object(kernels, "_grouped_mm_works", lambda *a: grouped):
            y = block(leaf)
            y.float().pow(2).mean().backward()
        grads = [leaf.grad] + [p.grad.clone() for p in block.experts.parameters()]
        block.zero_grad(set_to_none=True)
        return [y.detach()] + grads

    assert kernels._grouped_mm_works("cuda", torch.cuda.current_device(), torch.bfloat16)
    _close([t.float() for t in run(True)], [t.float() for t in run(False)], 2e-2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_document_masks_from_host_ids_have_no_host_sync():
    """Document ids on the host (as the trainer passes them): flash-attn's run starts and the SDPA mask are
    built for the GPU without a host sync, equal to the masks built from ids already on the GPU (where finding the
    run starts syncs)."""
    docs = torch.randint(0, 3, (4, 2048)).cumsum(1) // 200  # runs of ~200 tokens, on the host
    expected = {b: build_mask(docs.cuda(), b, window=512) for b in ("flash", "sdpa")}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = {b: build_mask(docs, b, window=512, device="cuda") for b in ("flash", "sdpa")}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got["flash"].cu_seqlens, expected["flash"].cu_seqlens)
    assert got["flash"].cu_seqlens.is_cuda and got["flash"].window == 512
    assert torch.equal(got["sdpa"].allowed, expected["sdpa"].allowed) and got["sdpa"].allowed.is_cuda
    assert build_mask(docs, "flex", window=512, device="cuda").block.kv_num_blocks.is_cuda


@pytest.mark.parametrize("fused", [False, True])
def test_distillation_loss_on_cuda_has_no_host_sync(fused):
    """The single-pass loss (logits form and fused-linear form; KD + CE + z-loss, no top-p) forward and backward on the
    GPU without a host sync: the targets' range check is asynchronous there (check_targets)."""
    from megadistill.parallel.fused_loss import fused_linear_distill_loss, logits_distill_loss
    torch.manual_seed(0)
    n, d, v = 4096, 256, 8192
    h, h_t = (torch.randn(n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_t = torch.randn(v, d, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, v, (n,), device="cuda")
    y[:7] = -100  # ignored

    def run():
        if fused:
            loss, _ = fused_linear_distill_loss(h, w, h_t, w_t, y)
        else:
            logits = h @ w.t()
            loss, _ = logits_distill_loss(logits, h_t @ w_t.t(), y)
        loss.backward()
        return loss

    run()  # compiles the loss kernel first (loss_kernel=auto: compiled on CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype,docs,window", [(torch.bfloat16, True, 0), (torch.bfloat16, False, 200),
                                               (torch.float32, False, 0), (torch.float32, True, 0)])
def test_sdpa_gqa_runs_a_fused_kernel(dtype, docs, window):
    """Grouped-query attention through SDPA with a mask, or in fp32 (a default fp32 teacher), never needs the math
    kernel (its fp32 [b, h, s, s] scores): with the math kernel ruled out it still runs (k / v repeated:
    sdpa_repeats_kv), and matches the fp32 eager reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = _qkv()
    k, v = (t.detach()[:, :, :2].clone().requires_grad_() for t in (k, v))  # 8 query heads read 2 k / v heads
    ref = _run("eager", (q, k, v), _mask("eager", docs, window), torch.float32)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = _run("sdpa", (q, k, v), _mask("sdpa", docs, window), dtype)
    _close(out, ref, 2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_sdpa_document_mask_bias_is_kept_once_not_per_layer():
    """Eight 'layers' of SDPA with a document mask, their graphs kept for backward: given the bool mask, the
    memory-efficient kernel keeps its own converted bias per call (2 b s^2 bytes each); given build_mask's bias in
    q's dtype, all keep the one tensor."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = _qkv()  # [2, 1024, 8, 64] bf16
    doc_ids = (torch.arange(1024, device="cuda") // 300).expand(2, 1024)
    held = {}
    for bias in (False, True):
        mask = build_mask(doc_ids, "sdpa", bias_dtype=torch.bfloat16 if bias else None)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # the masked kernel SDPA picks on Hopper
            outs = [attention(q, k, v, "sdpa", mask) for _ in range(8)]
        held[bias] = torch.cuda.memory_allocated() - base
        del outs
    per_call = 2 * 2 * 1024 * 1024  # one converted [2, 1, 1024, 1024] bf16 bias
    assert held[False] - held[True] >= 6 * per_call, held

