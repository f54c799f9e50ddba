"""Shared tiny trainer overrides for the multi-process and launcher tests (fast on CPU, shapes divisible by tp 2/4),
and edits of a run's saved files as another writer (an older version) would have left them."""
import json
import re
import zlib
from pathlib import Path


def tiny_overrides(run_dir, mode, extra=()):
    """key=value overrides of a tiny run in `mode` (supervised on the teacher split, distill on the student split)."""
    base = [
        f"train.run_dir={run_dir}", f"train.mode={mode}", "train.seq_len=32", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.eval_tokens=1024", "train.progress=false", "optim.warmup_steps=2",
        "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.head_dim=16", "model.ff_multiple=64",
        "model.vocab_size=128", "data.synthetic_branching=4",
    ]
    return base + [f"data.split={'teacher' if mode == 'supervised' else 'student'}"] + list(extra)


def set_manifest_entry(ckpt: Path, name: str) -> None:
    """Record `name`'s current size and CRC in checkpoint `ckpt`'s manifest, as a writer of a foreign checkpoint
    would."""
    m = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / name).read_bytes()
    m["files"][name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    (ckpt / "manifest.json").write_text(json.dumps(m))


def rewrite_saved_configs(run: Path, pattern: str, repl: str) -> None:
    """re.sub(pattern, repl) over the run dir's config.yaml and every checkpoint's copy (their manifests follow), as
    an older version of megadistill wrote them."""
    for cfg_file in [run / "config.yaml", *run.glob("checkpoints/step_*/config.yaml")]:
        cfg_file.write_text(re.sub(pattern, repl, cfg_file.read_text()))
        if (cfg_file.parent / "manifest.json").is_file():
            set_manifest_entry(cfg_file.parent, "config.yaml")
