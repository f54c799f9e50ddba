"""CLI verbs of the trainer: train, eval, export, import, teacher-cache, plan-memory (in megadistill.train.memory)."""
from __future__ import annotations

import argparse
import logging
from typing import List, Tuple

from megadistill.train import memory

log = logging.getLogger(__name__)


def split_args(items: List[str]) -> Tuple[List[str], List[str]]:
    """`a.yaml b.yaml key=value ...` -> (yaml paths, dotlist overrides)."""
    paths = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return paths, overrides


def _train(args) -> int:
    from megadistill import config
    from megadistill.train.trainer import train

    paths, overrides = split_args(args.items)
    cfg = config.load(paths, overrides)
    result = train(cfg)
    if result.eval is not None or result.status != "finished":
        msg = f"{result.status}: {result.run_dir} at step {result.step} ({result.tokens} tokens)"
        if result.eval:
            msg += f", eval_loss {result.eval['eval_loss']:.4f}"
        log.info(msg)
    return 0


def _eval(args) -> int:
    from megadistill.train.offline import evaluate_run

    ev = evaluate_run(args.run_dir, args.overrides, eval_tokens=args.eval_tokens, step=args.step)
    print(f"eval_loss {ev['eval_loss']:.6f} over {ev['eval_tokens']} tokens (record appended to "
          f"{args.run_dir}/eval.jsonl)")
    return 0


def _export(args) -> int:
    if args.format == "hf":
        from megadistill.hf.convert import export_hf
        out = export_hf(args.run_dir, args.out, step=args.step)
        print(f"wrote {out}/config.json and {out}/model.safetensors (transformers AutoModelForCausalLM loads it)")
        return 0
    from megadistill.train.offline import export_run

    out = export_run(args.run_dir, args.out, step=args.step)
    print(f"wrote {out}/model.safetensors and {out}/config.yaml")
    return 0


def _import(args) -> int:
    from megadistill.hf.convert import import_hf

    out = import_hf(args.source, args.out, args.dtype)
    print(f"wrote {out}/model.safetensors and {out}/config.yaml (use it as distill.teacher={out})")
    return 0


def _teacher_cache(args) -> int:
    from megadistill import config
    from megadistill.train.teacher_cache import write_cache

    paths, overrides = split_args(args.data + list(args.overrides))
    overrides = overrides + [f"distill.teacher={args.teacher}", "train.mode=distill"]
    if args.tp:
        overrides.append(f"parallel.tp_size={args.tp}")
    if args.bf16:
        overrides.append("distill.teacher_dtype=bf16")
    cfg = config.load(paths, overrides)
    m = write_cache(cfg, args.teacher, args.out, top_k=args.top_k, tokens=args.tokens, student_dp=args.student_dp,
                    shard_windows=args.shard_windows, max_shards=args.max_shards)
    state = "complete" if m["complete"] else f"partial ({m.get('missing_shards')} shards to go: re-run to continue)"
    print(f"teacher cache {args.out}: {m['tokens']} tokens, k={m['k']}, {m['k'] * 8 + 4} bytes/token, {state}; "
          f"train from it with distill.teacher=cache:{args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (supervised or distill) from YAML configs + key=value overrides",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: megadistill train configs/tiny/teacher.yaml train.steps=50 "
                              "train.run_dir=runs/t1\nresume after a crash or preemption: add train.resume=true")
    p.add_argument("items", nargs="+", metavar="CONFIG.yaml|key=value")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a run's latest checkpoint on held-out data and append an eval record",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: megadistill eval runs/t1 data.eval_fraction=0.05\n"
                              "any number of processes: a finished run's consolidated model/ weights, an unfinished\n"
                              "run's checkpoint shards (TP, ZeRO-3) consolidated, split over this launch's TP size")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.* overrides to evaluate elsewhere")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default: the run's)")
    p.add_argument("--step", type=int, default=None, help="the kept checkpoint of this step (default: the latest)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="write a run's consolidated weights as safetensors + config.yaml, or as a "
                                      "Hugging Face folder (--format hf)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples: megadistill export runs/t1 -o exports/t1\n"
                              "          megadistill export runs/t1 --format hf -o exports/t1-hf\n"
                              "          megadistill export runs/t1 --step 2000 -o teachers/t1-2000\n"
                              "any layout on any number of processes, finished or not (the checkpoint consolidated)")
    p.add_argument("run_dir")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--step", type=int, default=None, help="the kept checkpoint of this step (default: the latest; "
                   "an intermediate teacher, say)")
    p.add_argument("--format", choices=("megadistill", "hf"), default="megadistill",
                   help="hf: config.json + safetensors with HF names (Qwen3ForCausalLM / Qwen2ForCausalLM / "
                   "LlamaForCausalLM)")
    p.set_defaults(func=_export)

    p = sub.add_parser("import", help="convert a local Hugging Face folder (Qwen3, Qwen2, Llama, Mistral, Phi-3, "
                       "OLMo 2, Gemma 2 / 3, SmolLM3) to a megadistill model dir",
                       epilog="example: megadistill import hf:/models/Qwen3-1.7B -o teachers/qwen3-1.7b")
    p.add_argument("source", metavar="hf:PATH")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="weights' dtype in the model dir (auto: as stored, bit-exact)")
    p.set_defaults(func=_import)

    p = sub.add_parser("teacher-cache", help="run a teacher once over the student split and write its top-k logits",
                       epilog="example: megadistill teacher-cache runs/tiny/teacher --data configs/tiny/distill.yaml "
                              "-o caches/tiny --top-k 128; then train with distill.teacher=cache:caches/tiny. "
                              "Re-running on the same -o continues a killed write.")
    p.add_argument("teacher", help="teacher run dir, export dir or any spec distill.teacher accepts")
    p.add_argument("--data", nargs="+", required=True, metavar="CONFIG.yaml",
                   help="the student's config(s): data.*, train.seq_len / seed / batch, model.vocab_size")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the student config")
    p.add_argument("-o", "--out", required=True, help="cache directory")
    p.add_argument("--top-k", type=int, default=128, help="teacher tokens kept per position (default 128)")
    p.add_argument("--tokens", type=int, default=None, help="tokens to cover (default: the student's training tokens)")
    p.add_argument("--tp", type=int, default=0, help="tensor-parallel size of the teacher (world = tp x dp)")
    p.add_argument("--bf16", action="store_true", help="run the teacher in bf16")
    p.add_argument("--student-dp", type=int, default=1, help="text data: the student's dp_size (one stream per rank)")
    p.add_argument("--shard-windows", type=int, default=64, help="windows (sequences) per shard file")
    p.add_argument("--max-shards", type=int, default=0, help="stop after this many new shards per rank (0: all)")
    p.set_defaults(func=_teacher_cache)

    memory.register(sub)
