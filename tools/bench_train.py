#!/usr/bin/env python
"""Trainer throughput on CPU: supervised step, distill step (teacher 2-4x larger), and HF Llama of the same shape; JSON.

The distill step runs with distill.teacher_prefetch on (the default) and off, side by side.

The trainer's own step (train_step on a built run: DeepSpeed engine, loader, loss, optimizer) is timed round-robin
with the teacher's forward, the HF step and our bare model's step, so that machine noise hits all of them alike.
--compile adds the supervised step with train.compile=true (its compilation timed apart, on a first step).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch


def _shape_overrides(prefix: str, d: int, layers: int, heads: int, vocab: int):
    return [f"{prefix}.n_layers={layers}", f"{prefix}.d_model={d}", f"{prefix}.n_heads={heads}",
            f"{prefix}.head_dim={d // heads}", f"{prefix}.ff_multiple=64", f"{prefix}.vocab_size={vocab}"]


def _interleaved(fns: Dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> Dict[str, float]:
    """Median seconds of each fn, measured round-robin (one call of each per round) after `warmup` rounds."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--teacher-d-model", type=int, default=384)
    ap.add_argument("--teacher-layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="measured rounds (after 2 warm-up rounds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true",
                    help="also time the supervised step with train.compile=true, round-robin with the eager one")
    ap.add_argument("--compile-backend", default="inductor", help="train.compile_backend for --compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from megadistill import config
    from megadistill.model.sizes import params_of
    from megadistill.model.transformer import Transformer
    from megadistill.parallel.init import init_distributed
    from megadistill.train.objective import teacher_outputs
    from megadistill.train.trainer import build, release, train, train_step

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    common = [f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.batch}",
              f"train.global_batch_size={args.batch}", "train.eval_tokens=512", "train.progress=false",
              "optim.warmup_steps=1", "zero.stage=1", f"train.steps={args.steps}", "train.checkpoint_interval=0"]
    student = _shape_overrides("model", args.d_model, args.layers, args.heads, args.vocab)
    teacher = _shape_overrides("model", args.teacher_d_model, args.teacher_layers, args.heads, args.vocab)
    tokens = args.batch * args.seq_len

    # teacher weights for the distill step (trained 1 step: the speed does not depend on its quality)
    train(config.load([], common + teacher + [f"train.run_dir={tmp / 'teacher'}", "train.steps=1"]))
    info = init_distributed("gloo")
    sup_cfg = config.load([], common + student + [f"train.run_dir={tmp / 'sup'}"])
    kd_cfg = config.load([], common + student + [f"train.run_dir={tmp / 'kd'}", "train.mode=distill",
                                                 f"distill.teacher={tmp / 'teacher'}", "data.split=student"])
    kd_off_cfg = config.load([], common + student + [f"train.run_dir={tmp / 'kd_off'}", "train.mode=distill",
                                                     f"distill.teacher={tmp / 'teacher'}", "data.split=student",
                                                     "distill.teacher_prefetch=false"])
    sup_run, kd_run, kd_off_run = build(sup_cfg, info), build(kd_cfg, info), build(kd_off_cfg, info)
    runs = [sup_run, kd_run, kd_off_run]
    comp_run = None
    if args.compile:  # same shape, seed and data as sup_run; its blocks compiled (on the first, warm-up, step)
        comp_cfg = config.load([], common + student + [f"train.run_dir={tmp / 'sup_compiled'}", "train.compile=true",
                                                       f"train.compile_backend={args.compile_backend}"])
        comp_run = build(comp_cfg, info)
        runs.append(comp_run)
    for live in runs:
        live.engine.train()
    compile_s = None
    if comp_run is not None:
        t0 = time.perf_counter()
        train_step(comp_run)  # compilation happens here: timed apart from the steps
        compile_s = time.perf_counter() - t0

    # the teacher's forward alone, exactly as the distill step runs it, on a batch of the same shape
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    tmodel = kd_run.teacher.module

    # Hugging Face Llama of the student's shape: forward + backward + AdamW step (what our step does)
    from transformers import LlamaConfig, LlamaForCausalLM
    scfg = sup_cfg.model
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=scfg.d_model, intermediate_size=scfg.d_ff, num_hidden_layers=scfg.n_layers,
        num_attention_heads=scfg.n_heads, num_key_value_heads=scfg.n_heads, max_position_embeddings=args.seq_len,
        rope_theta=scfg.rope_base, tie_word_embeddings=False, attn_implementation="sdpa"))
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, foreach=True)

    def hf_step():
        out = hf(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ours = Transformer(scfg)
    opt2 = torch.optim.AdamW(ours.parameters(), lr=1e-4, foreach=True)

    def ours_raw_step():
        logits = ours(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        opt2.step()
        opt2.zero_grad(set_to_none=True)

    # all five measured round-robin, so machine noise hits them alike; medians over the rounds
    fns = {"supervised": lambda: train_step(sup_run), "distill": lambda: train_step(kd_run),
           "distill_no_prefetch": lambda: train_step(kd_off_run),
           "teacher_forward": lambda: teacher_outputs(tmodel, kd_cfg, ids, None),
           "hf_llama": hf_step, "ours_model_only": ours_raw_step}
    if comp_run is not None:
        fns["supervised_compiled"] = lambda: train_step(comp_run)
    t = _interleaved(fns, rounds=args.steps)
    sup, kd, t_fwd, hf_t, raw_t = (t[k] for k in ("supervised", "distill", "teacher_forward", "hf_llama",
                                                  "ours_model_only"))
    tcfg = kd_run.teacher.model_cfg
    for live in runs:
        release(live)
    result = {
        "device": "cpu", "threads": args.threads, "tokens_per_step": tokens,
        "student_params": params_of(scfg)[0], "teacher_params": params_of(tcfg)[0],
        "supervised_step_s": sup, "supervised_tokens_per_s": tokens / sup,
        "distill_step_s": kd, "distill_tokens_per_s": tokens / kd,
        "teacher_forward_s": t_fwd,
        "distill_overhead_s": kd - sup,
        "distill_overhead_over_teacher_forward": (kd - sup) / t_fwd,
        "goal_distill_overhead_le_teacher_fwd_plus_10pct": (kd - sup) <= 1.1 * t_fwd,
        "distill_no_prefetch_step_s": t["distill_no_prefetch"],
        "distill_no_prefetch_overhead_over_teacher_forward": (t["distill_no_prefetch"] - sup) / t_fwd,
        "hf_llama_step_s": hf_t, "hf_llama_tokens_per_s": tokens / hf_t,
        "ours_model_only_step_s": raw_t,
        "supervised_vs_hf_speed_ratio": hf_t / sup,
        "goal_supervised_at_least_hf_speed": sup <= hf_t,
    }
    if comp_run is not None:
        c = t["supervised_compiled"]
        result.update({
            "compile_backend": args.compile_backend, "compile_first_step_s": compile_s,
            "supervised_compiled_step_s": c, "supervised_compiled_tokens_per_s": tokens / c,
            "compiled_speedup_over_eager": sup / c, "supervised_compiled_vs_hf_speed_ratio": hf_t / c,
            "goal_compiled_supervised_at_least_hf_speed": c <= hf_t,
        })
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
