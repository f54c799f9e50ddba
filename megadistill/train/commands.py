"""CLI verbs of the trainer: train, eval, export, import, and plan-memory (defined in megadistill.train.memory)."""
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

    ev = evaluate_run(args.run_dir, args.overrides, eval_tokens=args.eval_tokens)
    print(f"eval_loss {ev['eval_loss']:.6f} over {ev['eval_tokens']} tokens (record appended to "
          f"{args.run_dir}/eval.jsonl)")
    return 0


def _export(args) -> int:
    if args.format == "hf":
        from megadistill.hf.convert import export_hf
        out = export_hf(args.run_dir, args.out)
        print(f"wrote {out}/config.json and {out}/model.safetensors (transformers AutoModelForCausalLM loads it)")
        return 0
    from megadistill.train.offline import export_run

    out = export_run(args.run_dir, args.out)
    print(f"wrote {out}/model.safetensors and {out}/config.yaml")
    return 0


def _import(args) -> int:
    from megadistill.hf.convert import import_hf

    out = import_hf(args.source, args.out, args.dtype)
    print(f"wrote {out}/model.safetensors and {out}/config.yaml (use it as distill.teacher={out})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (supervised or distill) from YAML configs + key=value overrides",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: megadistill train configs/tiny/teacher.yaml train.steps=50 "
                              "train.run_dir=runs/t1\nresume after a crash or preemption: add train.resume=true")
    p.add_argument("items", nargs="+", metavar="CONFIG.yaml|key=value")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a run's latest checkpoint on held-out data and append an eval record",
                       epilog="example: megadistill eval runs/t1 data.eval_fraction=0.05")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.* overrides to evaluate elsewhere")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default: the run's)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="write a run's consolidated weights as safetensors + config.yaml, or as a "
                                      "Hugging Face folder (--format hf)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples: megadistill export runs/t1 -o exports/t1\n"
                              "          megadistill export runs/t1 --format hf -o exports/t1-hf")
    p.add_argument("run_dir")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--format", choices=("megadistill", "hf"), default="megadistill",
                   help="hf: config.json + safetensors with HF names (Qwen3ForCausalLM / LlamaForCausalLM)")
    p.set_defaults(func=_export)

    p = sub.add_parser("import", help="convert a local Hugging Face Qwen3 / Llama folder to a megadistill model dir",
                       epilog="example: megadistill import hf:/models/Qwen3-1.7B -o teachers/qwen3-1.7b")
    p.add_argument("source", metavar="hf:PATH")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="weights' dtype in the model dir (auto: as stored, bit-exact)")
    p.set_defaults(func=_import)

    memory.register(sub)
