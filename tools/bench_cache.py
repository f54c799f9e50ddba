#!/usr/bin/env python
"""Offline teacher cache vs co-resident teacher on CPU: wall time of distilling S students online vs one cache pass
plus S cached students, and the cache's bytes per token; JSON on stdout.

Every run goes through the real trainer (train()) and the real cache writer (write_cache), one process, world 1.
The teacher is a 1-step-trained model of the given size (its quality does not change the timing).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch


def _shape(d: int, layers: int, heads: int, vocab: int):
    return ["model.size=null", f"model.n_layers={layers}", f"model.d_model={d}", f"model.n_heads={heads}",
            f"model.head_dim={d // heads}", "model.ff_multiple=64", f"model.vocab_size={vocab}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--teacher", nargs=3, type=int, default=[384, 6, 12], metavar=("D", "LAYERS", "HEADS"),
                    help="teacher shape (default ~10.6M non-embedding params)")
    ap.add_argument("--student", nargs=3, type=int, default=[192, 6, 6], metavar=("D", "LAYERS", "HEADS"),
                    help="student shape (default ~2.7M)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--students", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per student")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (micro = global batch)")
    ap.add_argument("--top-k", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)

    from megadistill import config
    from megadistill.model.sizes import params_of
    from megadistill.train.teacher_cache import write_cache
    from megadistill.train.trainer import train

    common = [f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.batch}",
              f"train.global_batch_size={args.batch}", "train.eval_tokens=1024", "train.progress=false",
              "optim.warmup_steps=2", "zero.stage=0", "data.synthetic_branching=8"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t_over = common + _shape(*args.teacher, args.vocab) + [
            "train.mode=supervised", "data.split=teacher", "train.steps=1", f"train.run_dir={root / 'teacher'}"]
        tcfg = config.load([], t_over)
        train(tcfg)

        def curve(name):
            return [json.loads(line)["loss"] for line in open(root / name / "train.jsonl")]

        # a sweep's students: one data order (train.seed is part of the cache's data hash), widths growing by 8 per
        # head (head_dim + 8 i), so each is a different model reading the same cache
        d0, heads = args.student[0], args.student[2]
        widths = [(d0 // heads + 8 * i) * heads for i in range(args.students)]
        names = [f"s{i}" for i in range(args.students)]

        def student_i(i, teacher, tag):
            over = common + _shape(widths[i], args.student[1], args.student[2], args.vocab) + [
                "train.mode=distill", "data.split=student", f"train.steps={args.steps}", "train.save=false",
                f"distill.teacher={teacher}", f"train.run_dir={root / (tag + names[i])}"]
            return config.load([], over)

        t0 = time.perf_counter()
        for i in range(args.students):
            train(student_i(i, root / "teacher", "online_"))
        out["online_students_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        m = write_cache(student_i(0, root / "teacher", "w_"), str(root / "teacher"), str(root / "cache"),
                        top_k=args.top_k, shard_windows=min(64, args.steps * args.batch))
        out["cache_write_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(args.students):
            train(student_i(i, f"cache:{root / 'cache'}", "cached_"))
        out["cached_students_s"] = time.perf_counter() - t0

        shard_bytes = sum(p.stat().st_size for p in (root / "cache").glob("stream*.safetensors"))
        out.update({
            "cache_total_s": out["cache_write_s"] + out["cached_students_s"],
            "speedup_online_over_cache": out["online_students_s"] / (out["cache_write_s"] + out["cached_students_s"]),
            "students": args.students, "steps_per_student": args.steps,
            "tokens_per_student": args.steps * args.batch * args.seq_len, "cache_tokens": m["tokens"],
            "top_k": args.top_k, "vocab": args.vocab,
            "bytes_per_token": args.top_k * 8 + 4, "bytes_per_token_on_disk": shard_bytes / m["tokens"],
            "full_logits_bytes_per_token_fp32": 4 * args.vocab,
            "teacher_params": params_of(tcfg.model)[0],
            "student_params": [params_of(student_i(i, "x", "p_").model)[0] for i in range(args.students)],
            "final_loss_online": [curve("online_" + n)[-1] for n in names],
            "final_loss_cached": [curve("cached_" + n)[-1] for n in names],
        })
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
