#!/usr/bin/env python
"""One-GPU check (H100/H200): attention backends vs eager in bf16, distillation-loss forms and kernels (time,
memory), Liger ops vs ours, and the bf16 step time / MFU / peak memory of the real trainer for the run matrix RUNS:
975M and 1.82B supervised, 546M-from-1.82B and 975M-from-4.82B distillation (bf16 teachers), with train.compile on
and off and model.kernels liger / torch; the distill step overhead against the teacher forward's FLOPs.

Each optimizer step accumulates --gas micro-batches (default 4: a sweep shares the optimizer step over many; the
earlier 27.8% figure was at one). Prints one JSON object (and one line per finished run on stderr); --out is rewritten
after every check and run ("complete": false until the end), so a run cut off by a timeout keeps what it measured.
Runs are started in RUNS order until --budget-s is spent; the rest are listed as skipped. `--dry-run` validates the
matrix on any machine; `--tiny` runs it at tiny sizes, on CPU too (teacher files, trainer runs, overhead table:
tests/test_tools.py). PAPER.md FLOPs against the card's dense bf16 peak. First of all, `compile` checks one 975M block
compiled by Inductor against eager and fp32 (values and every gradient): the compiled figures count only if it is ok.
Last, time permitting (--moe-by-s), `flex` checks FlexAttention against eager (documents; a window with a softcap)
and times it beside sdpa's dense document mask, `compile_moe` does what `compile` does for Qwen3-30B-A3B's mixture
block (routing, dispatch and grouped GEMMs in the graph) and `moe` times its experts: grouped GEMM vs the loop, eager
and compiled.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch


def attention_check(seq: int = 4096, heads: int = 16, hd: int = 128, batch: int = 2, device: str = "cuda",
                    repeats: int = 5, flex: bool = False) -> dict:
    """sdpa (forced flash kernel), sdpa with a document mask and flash-attn (if installed) vs the eager reference
    (output and gradients, relative to fp32); flex=True: FlexAttention instead (documents; a window with a softcap),
    two Triton compiles. Then fwd + bwd ms of the document-masked kernels beside sdpa's plain causal one (`ms`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megadistill.model.attention import attention, build_mask

    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, hd, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn(batch, seq, heads, hd, device=device, dtype=torch.bfloat16)
    doc_ids = (torch.arange(seq, device=device) // 1000).expand(batch, seq)
    window, cap = seq // 4, 50.0

    def mask(backend, docs=True, w=0):
        return build_mask(doc_ids if docs else None, backend, seq, w, device)

    def run(backend, m=None, kernel=None, dtype=torch.bfloat16, softcap=0.0):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        if kernel is not None:
            with sdpa_kernel(kernel):
                o = attention(qq, kk, vv, backend, m, softcap=softcap)
        else:
            o = attention(qq, kk, vv, backend, m, softcap=softcap)
        o.backward(g.to(dtype))
        return [o.float(), qq.grad.float(), kk.grad.float(), vv.grad.float()]

    def err(a, b):  # max |a - b| relative to max |b|, over output and grads
        return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))

    def ms(fn):  # median fwd + bwd milliseconds
        fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t))
        return sorted(times)[len(times) // 2]

    ref = run("eager", dtype=torch.float32)
    ref_m = run("eager", mask("eager"), dtype=torch.float32)
    out = {"eager_bf16_vs_eager_fp32": err(run("eager"), ref)}  # the bf16 noise floor the others are judged by
    sdpa_m = mask("sdpa")
    timed = {"sdpa_causal": lambda: run("sdpa"), "sdpa_docmask_dense": lambda: run("sdpa", sdpa_m)}
    if flex:
        flex_m = mask("flex")
        out["flex_docmask_vs_eager_fp32"] = err(run("flex", flex_m), ref_m)
        ref_w = run("eager", mask("eager", False, window), dtype=torch.float32, softcap=cap)  # Gemma 2's blocks
        out["flex_window_softcap_vs_eager_fp32"] = err(run("flex", mask("flex", False, window), softcap=cap), ref_w)
        timed["flex_docmask"] = lambda: run("flex", flex_m)
    else:
        out["sdpa_flash_vs_eager_fp32"] = err(run("sdpa", kernel=SDPBackend.FLASH_ATTENTION), ref)
        out["sdpa_docmask_vs_eager_fp32"] = err(run("sdpa", sdpa_m), ref_m)
        try:
            import flash_attn  # noqa: F401
            out["flash_attn_vs_eager_fp32"] = err(run("flash"), ref)
            flash_m = mask("flash")
            out["flash_attn_varlen_docmask_vs_eager_fp32"] = err(run("flash", flash_m), ref_m)
            ref_w = run("eager", mask("eager", False, window), dtype=torch.float32)  # sliding window
            out["flash_attn_window_vs_eager_fp32"] = err(run("flash", mask("flash", False, window)), ref_w)
            timed["flash_attn_varlen_docmask"] = lambda: run("flash", flash_m)
        except ImportError:
            out["flash_attn"] = "not installed (pip install .[gpu]); sdpa's flash kernel checked instead"
    out["ok"] = all(v <= 2 * out["eager_bf16_vs_eager_fp32"] + 1e-2 for kk, v in out.items()
                    if isinstance(v, float) and kk != "eager_bf16_vs_eager_fp32")
    out["ms"] = {name: ms(fn) for name, fn in timed.items()}
    out["ms"]["shape"] = f"batch {batch} x seq {seq} x {heads} heads x {hd}, bf16, documents of 1000 tokens"
    return out


def loss_check(tokens: int = 16384, d: int = 2048, vocab: int = 32768, device: str = "cuda",
               dtype=torch.bfloat16, repeats: int = 5) -> dict:
    """Distillation loss (lambda=1, tau=1, z-loss 1e-4) forward+backward from bf16 hidden states and heads: naive
    autograd (log_softmax + KL on fp32 logits), our single pass on materialised logits (the trainer's default) and
    our chunked fused-linear loss; median ms and peak allocated GiB above the inputs."""
    import torch.nn.functional as F

    from megadistill.parallel.fused_loss import fused_linear_distill_loss, logits_distill_loss

    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, d, device=device, generator=g).to(dtype).requires_grad_()
    h_t = torch.randn(tokens, d, device=device, generator=g).to(dtype)
    w = (torch.randn(vocab, d, device=device, generator=g) * d ** -0.5 * 4).to(dtype).requires_grad_()
    w_t = (torch.randn(vocab, d, device=device, generator=g) * d ** -0.5 * 4).to(dtype)
    y = torch.randint(0, vocab, (tokens,), device=device, generator=g)

    def naive():
        z = (h @ w.t()).float()
        with torch.no_grad():
            zt = (h_t @ w_t.t()).float()
        lse = torch.logsumexp(z, -1)
        kl = F.kl_div(F.log_softmax(z, -1), F.log_softmax(zt, -1), log_target=True, reduction="sum") / tokens
        return kl + 1e-4 * (lse ** 2).mean()

    def logits():
        with torch.no_grad():
            zt = h_t @ w_t.t()
        return logits_distill_loss(h @ w.t(), zt, y, kd_weight=1.0, z_loss=1e-4, inplace=True)[0]

    def fused():
        return fused_linear_distill_loss(h, w, h_t, w_t, y, kd_weight=1.0, z_loss=1e-4)[0]

    cuda = device == "cuda"
    out = {"tokens": tokens, "d": d, "vocab": vocab, "dtype": str(dtype)}
    losses = {}
    for name, fn in (("naive", naive), ("logits", logits), ("fused", fused)):
        times = []
        for i in range(repeats + 1):
            h.grad = w.grad = None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            loss = fn()
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
        losses[name] = loss.item()
        out[f"{name}_ms"] = round(1e3 * statistics.median(times), 2)
        if cuda:
            out[f"{name}_peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 30, 3)
    out["max_loss_rel_diff"] = max(abs(v / losses["naive"] - 1) for v in losses.values())
    return out


# Qwen3-30B-A3B's block (d 2048, 32 query / 4 key-value heads of 128, 128 experts of width 768, top 8): compile_moe
QWEN3_MOE_BLOCK = ["model.d_model=2048", "model.n_heads=32", "model.n_kv_heads=4", "model.head_dim=128",
                   "model.d_ff=768", "model.moe_experts=128", "model.moe_top_k=8"]


def compile_check(size: str = "975M", seq: int = 4096, batch: int = 4, device: str = "cuda",
                  dtype=torch.bfloat16, backend: str = "inductor", extra: Sequence[str] = ()) -> dict:
    """One transformer block of `size` (its width, heads, SwiGLU), compiled as train.compile does (Inductor: Triton
    on GPU) vs eager in the same dtype, forward + backward: the error of the output and of every gradient (input and
    each weight) against an fp32 eager reference, beside eager-in-dtype's own error (the floor). A compiled graph that
    drops or corrupts a gradient (torch 2.11's dynamo did, for two of our autograd Functions) fails here, before
    any MFU figure is read. The default shape is the trainer runs' micro-batch (4 x 4096), so that Inductor's cache can
    serve their bf16 block graph (not checked). `extra`: model.* overrides after the size's (a mixture of experts:
    its routing, dispatch and grouped GEMMs compile into the block graph in bf16)."""
    import torch._dynamo as dynamo

    from megadistill import config
    from megadistill.model.sizes import get_size
    from megadistill.model.transformer import Transformer
    from megadistill.train import compile as compile_mod

    shape = get_size(size)
    cfg = config.load([], [f"model.{k}={shape[k]}" for k in ("d_model", "n_heads", "head_dim", "d_ff")]
                      + ["model.n_layers=1", "model.vocab_size=256", "model.attention=sdpa", "train.steps=1"]
                      + list(extra))
    torch.manual_seed(0)
    base = Transformer(cfg.model).to(device)
    x0 = torch.randn(batch, seq, shape["d_model"], device=device)
    dy = torch.randn(batch, seq, shape["d_model"], device=device)

    def run(dt, compiled):
        model = copy.deepcopy(base).to(dt)
        if compiled:
            dynamo.reset()
            compile_mod.compile_blocks(model, backend)
        block = model.blocks[0]
        x = x0.to(dt, copy=True).requires_grad_()  # a fresh leaf (x0 itself stays as it is)
        cos, sin = model.rope(seq, x.device, x.dtype)
        t = time.perf_counter()
        y = block(x, cos, sin, None)
        y.backward(dy.to(dt))
        first_s = time.perf_counter() - t
        return [y.float(), x.grad.float()] + [p.grad.float() for p in block.parameters()], first_s

    def err(a, b):  # max over the tensors of |a - b| / |b| (Frobenius)
        return max((torch.linalg.vector_norm(u - v) / torch.linalg.vector_norm(v).clamp(min=1e-30)).item()
                   for u, v in zip(a, b))

    ref, _ = run(torch.float32, False)
    eager, _ = run(dtype, False)
    comp, first_s = run(dtype, True)
    out = {"size": size, "extra": list(extra), "seq": seq, "dtype": str(dtype), "backend": backend,
           "eager_vs_fp32": err(eager, ref), "compiled_vs_fp32": err(comp, ref),
           "compiled_vs_eager": err(comp, eager), "compile_first_call_s": round(first_s, 2),
           "zero_grads": sum(int(g.abs().max().item() == 0) for g in comp[1:])}
    out["ok"] = out["zero_grads"] == 0 and out["compiled_vs_fp32"] <= 2 * out["eager_vs_fp32"] + 1e-3
    return out


def _overrides(size: str, run_dir: Path, micro: int, steps: int, seq: int, extra=(), gas: int = 1):
    return [f"model.size={size}", "model.attention=sdpa", f"train.run_dir={run_dir}", f"train.steps={steps}",
            f"train.seq_len={seq}", f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * gas}",
            "train.precision=bf16", "train.eval_tokens=8192", "train.progress=false", "train.save=false",
            "train.log_interval=1", "optim.warmup_steps=2", "zero.stage=1", "data.synthetic_branching=64",
            *extra]


# The trainer runs of the check, in the order they run (most wanted first: a run that would start past the time
# budget is skipped and says so). (name, student size, teacher size or None, variant); variants add overrides.
VARIANTS = {"eager": ["train.compile=false"], "compile": ["train.compile=true"],
            "compile_liger": ["train.compile=true", "model.kernels=liger"],
            "eager_liger": ["train.compile=false", "model.kernels=liger"],
            # one GPU in bf16 runs DeepSpeed's ZeRO-1 optimizer (flat); zero.stage=0 its per-parameter unfused one
            "compile_stage0": ["train.compile=true", "zero.stage=0"],
            # bf16 gradients accumulated in bf16 (the default is fp32: DeepSpeed's BF16_Optimizer): what fp32 costs
            "compile_bf16accum": ["train.compile=true", "train.grad_accum_dtype=bf16"],
            # distillation with the teacher forward in line on the student's stream (no side stream, no look-ahead)
            "compile_noprefetch": ["train.compile=true", "distill.teacher_prefetch=false"],
            # packed documents of 1024 tokens masked from each other: sdpa's dense-mask kernel vs FlexAttention's
            # block-sparse one (model.attention=flex); less attention work than the causal runs, so not an MFU goal
            "compile_docs": ["train.compile=true", "data.document_mask=true", "data.synthetic_doc_len=1024"],
            "compile_docs_flex": ["train.compile=true", "data.document_mask=true", "data.synthetic_doc_len=1024",
                                  "model.attention=flex"]}
# A diagnostic distill variant measured against the supervised run of another one (the same student step; only the
# teacher's scheduling differs); the goals judge the default configuration, so they leave these out.
SUPERVISED_BASELINE = {"compile_noprefetch": "compile"}
# Variants that accumulate gradients in bf16 (the default is fp32, train.grad_accum_dtype): timed, but the MFU goal
# judges the default numerics.
BF16_ACCUMULATION = {"compile_stage0", "compile_bf16accum"}
# Variants whose attention skips the masked-off documents: timed against each other, not judged by the MFU goal.
DOCUMENT_MASKED = {"compile_docs", "compile_docs_flex"}
RUNS = [("supervised_975M", "975M", None, "compile"), ("supervised_975M", "975M", None, "eager"),
        ("supervised_546M", "546M", None, "compile"), ("distill_546M_from_1.82B", "546M", "1.82B", "compile"),
        ("supervised_975M", "975M", None, "compile_stage0"),
        ("supervised_975M", "975M", None, "compile_liger"), ("distill_546M_from_1.82B", "546M", "1.82B", "eager"),
        ("distill_546M_from_1.82B", "546M", "1.82B", "compile_noprefetch"),
        ("supervised_975M", "975M", None, "compile_bf16accum"),
        ("supervised_1.82B", "1.82B", None, "compile"), ("distill_975M_from_4.82B", "975M", "4.82B", "compile"),
        ("supervised_975M", "975M", None, "eager_liger"), ("supervised_546M", "546M", None, "eager"),
        ("supervised_1.82B", "1.82B", None, "eager"), ("distill_975M_from_4.82B", "975M", "4.82B", "eager"),
        ("distill_546M_from_1.82B", "546M", "1.82B", "compile_liger"),
        ("distill_975M_from_4.82B", "975M", "4.82B", "compile_liger"),
        ("supervised_975M", "975M", None, "compile_docs"), ("supervised_975M", "975M", None, "compile_docs_flex")]


def run_overrides(name: str, size: str, teacher: Optional[str], variant: str, root: Path, micro: int, steps: int,
                  seq: int, teacher_dir: Optional[Path] = None, gas: int = 1) -> List[str]:
    """The trainer overrides of one run of RUNS."""
    extra = list(VARIANTS[variant])
    if teacher is not None:
        extra += ["train.mode=distill", f"distill.teacher={teacher_dir or root / ('teacher_' + teacher)}",
                  "distill.teacher_dtype=bf16", "data.split=student"]
    return _overrides(size, root / f"{name}_{variant}", micro, steps, seq, extra, gas)


def _liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
        return True
    except ImportError:
        return False


def distill_overheads(results: Dict[str, dict]) -> Dict[str, dict]:
    """Per distill run: step overhead over the same student's supervised step (same variant, or the one
    SUPERVISED_BASELINE names), against the teacher forward's share of the FLOPs at the supervised run's throughput
    (goal: ratio <= 1.10)."""
    from megadistill import config
    from megadistill.model.sizes import params_of
    from megadistill.laws.flops import forward_flops_per_token
    out = {}
    for key, kd in results.items():
        if not key.startswith("distill_") or "step_time_s" not in kd:
            continue
        name, variant = key.rsplit("@", 1)
        student_name = name[len("distill_"):].split("_from_")[0]
        baseline = f"supervised_{student_name}@{SUPERVISED_BASELINE.get(variant, variant)}"
        sup = results.get(baseline, {})
        if "step_time_s" not in sup:
            out[key] = {"skipped": f"no {baseline} run to compare with"}
            continue
        student, teacher = kd["size"], kd["teacher_size"]  # the sizes run (--tiny: not the names' sizes)

        def f(size):
            m = config.load([], [f"model.size={size}", "train.steps=1"]).model
            n, _ = params_of(m)
            return forward_flops_per_token(n, n_ctx=4096, n_vocab=m.vocab_size, rho=m.d_model / m.n_layers)
        f_t, f_s = f(teacher), f(student)
        overhead = kd["step_time_s"] - sup["step_time_s"]
        teacher_fwd = sup["step_time_s"] * f_t / (3 * f_s)  # the teacher forward at the student's FLOP rate
        out[key] = {"overhead_s": overhead, "teacher_forward_at_student_rate_s": teacher_fwd,
                    "overhead_over_teacher_forward": overhead / teacher_fwd}
    return out


def goals(result: dict) -> Dict[str, dict]:
    """Issue 11's GPU goals read off one result: 975M supervised MFU >= 45% (PAPER.md F(N), best variant with fp32
    gradient accumulation and attention over whole rows), each distill step's overhead <= 1.10x the teacher forward,
    the compiled fused loss no slower than naive at every shape; "measured": false where the check did not run."""
    runs = result.get("runs", {})
    mfus = {k: v["mfu_paper_flops"] for k, v in runs.items()
            if k.startswith("supervised_975M@") and k.rsplit("@", 1)[1] not in BF16_ACCUMULATION | DOCUMENT_MASKED
            and isinstance(v.get("mfu_paper_flops"), float)
            and v["mfu_paper_flops"] == v["mfu_paper_flops"]}
    out = {"mfu_975M_supervised_ge_0.45": {"measured": bool(mfus)}}
    if mfus:
        best = max(mfus, key=mfus.get)
        out["mfu_975M_supervised_ge_0.45"].update(best_run=best, mfu=mfus[best], met=mfus[best] >= 0.45)
    over = {k: v["overhead_over_teacher_forward"] for k, v in result.get("distill_overhead", {}).items()
            if "overhead_over_teacher_forward" in v and k.rsplit("@", 1)[-1] not in SUPERVISED_BASELINE}
    out["distill_overhead_le_1.10"] = {"measured": bool(over), "ratios": over,
                                       "met": bool(over) and all(r <= 1.10 for r in over.values())}
    ratios = result.get("loss_kernels", {}).get("ratios", {}) if isinstance(result.get("loss_kernels"), dict) else {}
    per_shape = {n: r.get("fused_compiled_time_over_naive") for n, r in ratios.items()}
    out["fused_loss_no_slower_than_naive"] = {
        "measured": bool(per_shape) and all(v is not None for v in per_shape.values()),
        "compiled_time_over_naive": per_shape,
        "met": bool(per_shape) and all(v is not None and v <= 1.0 for v in per_shape.values())}
    comp = result.get("compile", {})  # not a goal of the issue: the precondition of reading the compiled figures
    out["compiled_block_matches_eager"] = {"measured": "ok" in comp, "met": bool(comp.get("ok"))}
    return out


def _step_shape(cfg) -> dict:
    """Tokens and micro-batches per optimizer step of one run (one DP rank)."""
    return {"tokens_per_step": cfg.train.global_batch_size * cfg.train.seq_len,
            "micro_batches_per_step": cfg.train.global_batch_size // cfg.train.micro_batch_size}


def fresh_compile() -> None:
    """Forget the graphs of earlier runs, as a job of its own would start: every Block of every size shares one code
    object, whose graphs count against torch._dynamo.config.recompile_limit (8) -- past it a later run's blocks would
    silently run eager. Inductor's on-disk caches still serve a shape compiled before."""
    import torch._dynamo
    torch._dynamo.reset()


def _run(overrides) -> dict:
    from megadistill import config
    from megadistill.laws.flops import forward_flops_per_token
    from megadistill.model.sizes import params_of
    from megadistill.train.trainer import train

    cfg = config.load([], overrides)
    fresh_compile()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.time()
    train(cfg)
    wall = time.time() - t0
    rows = [json.loads(line) for line in open(Path(cfg.train.run_dir) / "train.jsonl")]
    step_s = statistics.median(r["step_time_s"] for r in rows[2:])
    shape = _step_shape(cfg)
    tokens = shape["tokens_per_step"]
    n, n_total = params_of(cfg.model)
    out = {"size": cfg.model.size, **shape, "step_time_s": step_s, "tokens_per_s": tokens / step_s,
           "mfu_paper_flops": statistics.median([r["mfu"] for r in rows[2:] if r["mfu"] is not None] or [math.nan]),
           "mfu_6N_total": 6 * n_total * tokens / step_s / 989e12,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
           # what the caching allocator held: with the teacher on its own stream, blocks cached by that stream are
           # not reused by the student's, so reserved can exceed allocated by the teacher's working memory
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
           "leftover_before_run_gib": base / 2**30 if torch.cuda.is_available() else None,
           "wall_s": wall,
           "final_loss": rows[-1]["loss"], "F_N_per_token": forward_flops_per_token(
               n, n_ctx=cfg.train.seq_len, n_vocab=cfg.model.vocab_size, rho=cfg.model.d_model / cfg.model.n_layers)}
    try:
        from megadistill.train.memory import estimate
        est = estimate(cfg, 1)
        out["planner_estimate_gib"] = est["total"] / 2**30
        out["planner_modeled_gib"] = est["modeled"] / 2**30
        out["planner_terms_gib"] = {k: v / 2**30 for k, v in est.items()
                                    if isinstance(v, (int, float)) and k not in ("total", "modeled")}
        if out["peak_mem_gib"]:
            out["measured_over_estimate"] = out["peak_mem_gib"] / out["planner_estimate_gib"]
            out["reserved_over_estimate"] = out["peak_reserved_gib"] / out["planner_estimate_gib"]
    except Exception as e:  # the planner is optional for this check; report why it was not compared
        out["planner_estimate"] = f"unavailable: {type(e).__name__}: {e}"
    return out


# Where a step's time goes, by kernel name (CUDA kernels on a GPU, aten ops on CPU): first matching category wins.
CATEGORIES = (("communication", ("nccl", "all_reduce", "allreduce", "all_gather", "reduce_scatter", "gloo")),
              ("optimizer", ("adam", "multi_tensor", "foreach")),
              ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
              ("matmul", ("gemm", "matmul", "aten::mm", "aten::bmm", "aten::addmm", "cutlass", "nvjet", "sm90_xmma",
                          "sm80_xmma", "cublas", "aten::linear")),
              ("copy", ("memcpy", "memset", "copy_", "aten::cat", "aten::to", "_to_copy")),
              ("fused_elementwise", ("triton", "cpp_fused", "liger")))


def _category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profile_run(overrides, warmup: int = 3, steps: int = 2, top: int = 15) -> dict:
    """One trainer run of `overrides` built in this process, `warmup` steps, then `steps` steps under torch.profiler:
    the top kernels by self time and each category's share (matmul, attention, fused elementwise, communication,
    optimizer, copies, other), so the next MFU step is aimed where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    from megadistill import config
    from megadistill.parallel.init import init_distributed
    from megadistill.train.trainer import build, release, train_step

    cuda = torch.cuda.is_available()
    fresh_compile()
    live = build(config.load([], overrides), init_distributed("auto"))
    try:
        live.engine.train()
        for _ in range(warmup):
            train_step(live)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(steps):
                train_step(live)
            if cuda:
                torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    finally:
        release(live)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages()  # on a GPU the kernels themselves (their CPU launchers left out)
              if getattr(e, attr, 0) > 0 and (not cuda or str(e.device_type).endswith("CUDA"))]
    total = sum(getattr(e, attr) for e in events) or 1.0
    shares: Dict[str, float] = {}
    for e in events:
        c = _category(e.key)
        shares[c] = shares.get(c, 0.0) + getattr(e, attr) / total
    rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    return {"timer": "cuda kernels" if cuda else "cpu ops (self time)", "profiled_steps": steps,
            "step_wall_s_under_profiler": wall, "busy_s_per_step": total / 1e6 / steps,
            "shares": {k: round(v, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
            "top": [{"name": e.key[:120], "category": _category(e.key), "share": round(getattr(e, attr) / total, 4),
                     "calls_per_step": e.count / steps} for e in rows]}


def make_teacher(size: str, out_dir: Path) -> Path:
    """Consolidated weights of a randomly initialised teacher (speed does not depend on its quality)."""
    from safetensors.torch import save_file

    from megadistill import config
    from megadistill.model.transformer import Transformer

    from megadistill.parallel.layers import LayerFactory

    cfg = config.load([], [f"model.size={size}", "train.steps=1", "train.seq_len=4096"])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer(cfg.model, LayerFactory(None, device=device))  # initialised on the GPU: seconds, not minutes
    out_dir.mkdir(parents=True, exist_ok=True)
    # stored in bf16, the runs' distill.teacher_dtype: half the bytes to write and read (4.82B: 9.6 GB, not 19)
    save_file({k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()},
              str(out_dir / "model.safetensors"))
    (out_dir / "config.yaml").write_text(config.to_yaml(cfg))
    (out_dir / "meta.json").write_text(json.dumps({"run": f"random-{size}", "tokens": 0}))
    del model
    return out_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--gas", type=int, default=4,
                    help="micro-batches per optimizer step (a sweep accumulates many: the optimizer step's cost is "
                         "shared by them, as in training; 1 gives the optimizer-per-micro-batch figure)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no trainer run after this many seconds (the rest are listed as skipped)")
    ap.add_argument("--runs", default="all", help="comma-separated run names (e.g. supervised_975M) or 'all'")
    ap.add_argument("--variants", default="all", help=f"comma-separated variants of {list(VARIANTS)} or 'all'")
    ap.add_argument("--skip-kernels", action="store_true",
                    help="skip the attention / loss / Liger op checks (and the mixture-of-experts ones)")
    ap.add_argument("--skip-moe", action="store_true", help="skip the mixture-of-experts checks (run after the runs)")
    ap.add_argument("--moe-by-s", type=float, default=480.0,
                    help="start the flex and mixture-of-experts checks only before this many seconds ('--runs none' "
                         "runs them alone)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the run matrix, run nothing (CPU ok)")
    ap.add_argument("--tiny", action="store_true",
                    help="the same runs at tiny sizes (students tiny-0.5M, teachers tiny-1M), on CPU if there is no "
                         "GPU: the script's trainer path end to end (no kernel checks; figures not meaningful)")
    ap.add_argument("--profile", default="supervised_975M@compile",
                    help="RUN@VARIANT profiled (torch.profiler, after its timed run) for the time per kernel "
                         "category; 'none' to skip")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    wanted = None if args.runs == "all" else set(args.runs.split(","))
    variants = None if args.variants == "all" else set(args.variants.split(","))
    runs = [r for r in RUNS if (wanted is None or r[0] in wanted) and (variants is None or r[3] in variants)]
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if args.dry_run:
        from megadistill import config
        plan = []
        for name, size, teacher, variant in runs:
            over = run_overrides(name, size, teacher, variant, tmp, args.micro, args.steps, args.seq, gas=args.gas)
            cfg = config.load([], over)
            plan.append({"run": f"{name}@{variant}", "student": cfg.model.size, "teacher": teacher,
                         "compile": cfg.train.compile, "kernels": getattr(cfg.model, "kernels", "torch"),
                         "attention": cfg.model.attention, "document_mask": cfg.data.document_mask,
                         **_step_shape(cfg)})
        print(json.dumps({"dry_run": plan}, indent=1))
        return 0
    if args.tiny:  # every student / teacher size of the matrix becomes a tiny one
        teacher_sizes = {r[2] for r in RUNS if r[2]}
        tiny = {size: ("tiny-1M" if size in teacher_sizes else "tiny-0.5M")
                for r in RUNS for size in (r[1], r[2]) if size}
        runs = [(name, tiny[size], tiny.get(teacher), variant) for name, size, teacher, variant in runs]
        args.skip_kernels, args.seq = True, min(args.seq, 128)
        args.micro = min(args.micro, 2)
    elif not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device (--tiny runs the trainer path at tiny sizes on CPU)"}))
        return 1
    from megadistill.fileio import atomic_write_bytes

    cuda = torch.cuda.is_available()
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "liger": _liger_available() and cuda, "tiny": args.tiny}
    t0 = time.time()
    runs_out: Dict[str, dict] = {}

    def summarise(done: bool) -> str:
        """The report so far: the tables are recomputed from what has run (done=False: a later stage is pending)."""
        result["runs"] = runs_out
        result["mfu_table"] = {k: v.get("mfu_paper_flops") for k, v in runs_out.items()}
        result["distill_overhead"] = distill_overheads(runs_out)
        result["goals"] = goals(result)
        result["wall_s"] = time.time() - t0
        result["complete"] = done
        return json.dumps(result, indent=1,
                          default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x))

    def save(done: bool = False) -> str:  # --out after every stage (atomic): a run killed by the timeout keeps it
        text = summarise(done)
        if args.out:
            atomic_write_bytes(args.out, (text + "\n").encode())
        return text

    def guarded(fn, *a, **kw):  # one failing check is reported, the others still run
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - the report names it
            return {"error": f"{type(e).__name__}: {e}"}

    if not args.skip_kernels:
        result["compile"] = guarded(compile_check)
        save()
        result["attention"] = guarded(attention_check)
        result["loss"] = guarded(loss_check)
        save()
        try:
            from bench_loss import loss_kernel_check
            result["loss_kernels"] = guarded(loss_kernel_check, "cuda", tokens=(8192, 16384, 32768))
        except ImportError as e:
            result["loss_kernels"] = {"error": f"tools/bench_loss.py has no loss_kernel_check: {e}"}
        save()
        if result["liger"]:
            from gpu_kernels import liger_check
            result["liger_ops"] = guarded(liger_check)
            save()
    teachers: Dict[str, Path] = {}
    for name, size, teacher, variant in runs:
        key = f"{name}@{variant}"
        if "liger" in variant and not result["liger"]:
            runs_out[key] = {"skipped": "liger_kernel not installed (pip install .[liger])"}
            continue
        if "model.attention=flex" in VARIANTS[variant] and not cuda:
            runs_out[key] = {"skipped": "model.attention=flex trains on CUDA only (torch has no CPU backward)"}
            continue
        if time.time() - t0 > args.budget_s:
            runs_out[key] = {"skipped": f"time budget {args.budget_s:g} s spent"}
            continue
        if teacher is not None and teacher not in teachers:
            teachers[teacher] = make_teacher(teacher, tmp / f"teacher_{teacher}")
        over = run_overrides(name, size, teacher, variant, tmp, args.micro, args.steps, args.seq,
                             teachers.get(teacher), gas=args.gas)
        runs_out[key] = guarded(_run, over)
        runs_out[key].update(variant=variant, teacher_size=teacher)
        if key == args.profile and "step_time_s" in runs_out[key] and time.time() - t0 <= args.budget_s:
            result["profile"] = dict(guarded(profile_run, run_overrides(name, size, teacher, variant, tmp / "profile",
                                                                        args.micro, 5 + 1, args.seq,
                                                                        teachers.get(teacher), gas=args.gas)), run=key)
        print(json.dumps({key: {k: runs_out[key].get(k) for k in ("step_time_s", "mfu_paper_flops", "peak_mem_gib",
                                                                   "error", "skipped")}}), file=sys.stderr)
        if "skipped" not in runs_out[key]:
            save()
    # FlexAttention (two Triton compiles), then the mixture-of-experts checks (two Inductor compiles of
    # Qwen3-30B-A3B's block) last: the goals' runs go first
    if not args.skip_kernels:
        if time.time() - t0 > args.moe_by_s:
            result["flex"] = {"skipped": f"started only before {args.moe_by_s:g} s (--moe-by-s)"}
        else:
            result["flex"] = guarded(attention_check, flex=True)
        save()
    if not (args.skip_kernels or args.skip_moe):
        from bench_moe import moe_check  # grouped GEMM vs the loop over 128 experts, and compiled
        for key, fn, kw in (("compile_moe", compile_check, dict(batch=1, extra=QWEN3_MOE_BLOCK)),
                            ("moe", moe_check, dict(device="cuda", dtype=torch.bfloat16, tokens=4096, d=2048,
                                                    experts=128, d_ff=768, top_k=8, iters=5,
                                                    compile_backend="inductor"))):
            if time.time() - t0 > args.moe_by_s:
                result[key] = {"skipped": f"started only before {args.moe_by_s:g} s (--moe-by-s)"}
                continue
            result[key] = guarded(fn, **kw)
            save()
    print(save(done=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
