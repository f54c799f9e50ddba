"""Consecutive runs in one process (the demo, sweeps of small runs) must free each run's engine, model and optimizer."""
import gc
import weakref

import pytest

from dist_harness import run_distributed

pytestmark = pytest.mark.multiproc


def _runs_release_everything(rank, world, root):
    from megadistill import config
    from megadistill.train.trainer import train

    tiny = ["train.steps=2", "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.eval_tokens=64", "train.progress=false", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
            "model.head_dim=16", "model.vocab_size=64", "model.ff_multiple=32"]
    # 2 ranks = DP 2, so every stage really partitions (with one DP rank the engine runs stage 0); the last run
    # distils from the first with a ZeRO-3 student and a ZeRO-3-partitioned teacher
    runs = {f"zero{stage}": [f"zero.stage={stage}"] for stage in (0, 1, 2, 3)}
    runs["distill-zero3-teacher-zero3"] = ["zero.stage=3", "train.mode=distill", f"distill.teacher={root}/zero0",
                                           "distill.teacher_zero3=true", "data.split=student"]
    out = {}
    for name, extra in runs.items():
        refs = {}

        def grab(objs):
            refs.update(student=weakref.ref(objs["student"]), engine=weakref.ref(objs["engine"]),
                        optimizer=weakref.ref(objs["engine"].optimizer))
            if objs["teacher"] is not None:
                refs["teacher"] = weakref.ref(objs["teacher"].module)

        train(config.load([], tiny + extra + [f"train.run_dir={root}/{name}"]), inspect=grab)
        gc.collect()
        out[name] = {"alive": sorted(k for k, r in refs.items() if r() is not None), "gc_enabled": gc.isenabled(),
                     "tracked": sorted(refs)}
    return out


def test_consecutive_runs_free_engine_model_and_optimizer(tmp_path):
    for res in run_distributed(_runs_release_everything, 2, str(tmp_path), timeout=400):
        assert "teacher" in res["distill-zero3-teacher-zero3"]["tracked"]
        for name, r in res.items():
            assert r["alive"] == [], (name, r)
            assert r["gc_enabled"], f"Python's GC still disabled after the {name} run"
