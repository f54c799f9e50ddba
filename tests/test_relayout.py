"""A run's checkpoint on another number of processes than wrote it: `eval` and `export` of a finished run work at any
world size (its consolidated weights, split over the launch's TP size), and where only the writers' layout can load the
checkpoint (an unfinished TP or ZeRO-3 run; any resume) the error says how many processes to launch."""
import json
import shutil
from pathlib import Path

import pytest

from dist_harness import run_distributed
from tiny_runs import tiny_overrides

pytestmark = pytest.mark.multiproc

RUNS = {"tp2": ["parallel.tp_size=2", "zero.stage=1"],  # TP=2 x DP=1: a TP shard per rank
        "z3": ["zero.stage=3"]}  # DP=2 under ZeRO-3: its parameters partitioned over both ranks
COMMON = ["train.steps=4", "train.eval_tokens=512"]


def _overrides(root, name, extra=()):
    return tiny_overrides(Path(root) / name, "supervised", COMMON + RUNS[name] + list(extra))


def _error(fn):
    from megadistill.errors import UserError
    try:
        fn()
    except UserError as e:
        return str(e)
    return None


def _on_two(rank, world, root):
    from megadistill import config
    from megadistill.train.offline import evaluate_run
    from megadistill.train.trainer import train
    for name in RUNS:
        train(config.load([], _overrides(root, name)))
    # the writers' world size at another TP size: the TP=2 run at TP=1 x DP=2, from its consolidated weights; and the
    # ZeRO-3 run as written (its DeepSpeed partitions, loaded module-only)
    return {"tp2_at_tp1_dp2": evaluate_run(str(Path(root) / "tp2"), ["parallel.tp_size=1"])["eval_loss"],
            "z3_as_written": evaluate_run(str(Path(root) / "z3"))["eval_loss"]}


def _on_one(rank, world, root):
    from safetensors.torch import load_file
    from megadistill import config
    from megadistill.train.offline import evaluate_run, export_run
    from megadistill.train.trainer import train
    root = Path(root)
    out = {f"{name}_eval": evaluate_run(str(root / name))["eval_loss"] for name in RUNS}
    export_run(str(root / "tp2"), str(root / "tp2_export"))
    a = load_file(str(root / "tp2_export" / "model.safetensors"))
    b = load_file(str(root / "tp2" / "model" / "model.safetensors"))
    out["export_same_names"] = a.keys() == b.keys()
    out["export_max_diff"] = max(float((a[k] - b[k]).abs().max()) for k in b)
    # the same runs unfinished (killed after their last checkpoint: no model/, no DONE)
    for name in RUNS:
        run = root / f"{name}_unfinished"
        shutil.copytree(root / name, run)
        shutil.rmtree(run / "model")
        (run / "DONE").unlink()
        out[f"{name}_eval_error"] = _error(lambda: evaluate_run(str(run)))
        out[f"{name}_export_error"] = _error(lambda: export_run(str(run), str(root / "never")))
    resumed = _overrides(root, "z3", [f"train.run_dir={root / 'z3_unfinished'}", "train.resume=true"])
    out["z3_resume_error"] = _error(lambda: train(config.load([], resumed)))
    out["never_written"] = (root / "never").exists()
    out["records"] = {name: [json.loads(line) for line in open(root / name / "eval.jsonl")] for name in RUNS}
    return out


@pytest.fixture(scope="module")
def relayout(tmp_path_factory):
    root = tmp_path_factory.mktemp("relayout")
    two = run_distributed(_on_two, 2, str(root), timeout=600)[0]
    return {**two, **run_distributed(_on_one, 1, str(root), timeout=600)[0]}


def test_finished_runs_evaluate_and_export_on_one_process(relayout):
    recs = relayout["records"]
    # the run's own final eval (2 processes) against the same weights on 1; fp32, measured 3e-8 apart at TP 2 -> 1
    # (the head's reductions split otherwise), equal under ZeRO-3 DP 2 -> 1
    for name in RUNS:
        trained, offline = recs[name][0], recs[name][-1]  # (z3: its 2-process offline eval in between)
        assert offline["source"] == "megadistill eval" and offline["step"] == trained["step"] == 4, offline
        assert abs(offline["eval_loss"] - trained["eval_loss"]) < 1e-6, (name, trained, offline)
        assert relayout[f"{name}_eval"] == offline["eval_loss"]
    assert abs(relayout["tp2_at_tp1_dp2"] - recs["tp2"][0]["eval_loss"]) < 1e-6
    assert abs(relayout["z3_as_written"] - recs["z3"][0]["eval_loss"]) < 1e-6
    assert relayout["export_same_names"] and relayout["export_max_diff"] == 0.0


def test_unfinished_runs_name_the_processes_to_launch(relayout):
    for name, why in (("tp2", "written by 2 processes at parallel.tp_size=2"), ("z3", "under ZeRO-3")):
        for verb in ("eval", "export"):
            err = relayout[f"{name}_{verb}_error"]
            assert err is not None and why in err and "no consolidated weights of that step" in err, err
            assert f"--nproc-per-node 2 -m megadistill.cli {verb}" in err, err
    assert not relayout["never_written"]


def test_resume_on_another_world_size_is_refused_by_name(relayout):
    err = relayout["z3_resume_error"]  # before this check: DeepSpeed's bare AssertionError deep in its loader
    assert err is not None and "was written by 2 processes and this run has 1" in err, err
    assert "Relaunch on 2 processes" in err
