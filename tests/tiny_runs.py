"""Shared tiny trainer overrides for the multi-process and launcher tests (fast on CPU, shapes divisible by tp 2/4)."""


def tiny_overrides(run_dir, mode, extra=()):
    """key=value overrides of a tiny run in `mode` (supervised on the teacher split, distill on the student split)."""
    base = [
        f"train.run_dir={run_dir}", f"train.mode={mode}", "train.seq_len=32", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.eval_tokens=1024", "train.progress=false", "optim.warmup_steps=2",
        "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.head_dim=16", "model.ff_multiple=64",
        "model.vocab_size=128", "data.synthetic_branching=4",
    ]
    return base + [f"data.split={'teacher' if mode == 'supervised' else 'student'}"] + list(extra)
