"""A run's checkpoint on another number of processes than wrote it: `eval` and `export` work at any world size -- a
finished run from its consolidated weights, an unfinished one from its checkpoint's TP / ZeRO-3 shards consolidated
offline (train/consolidate.py) -- split over the launch's TP size; a resume on another world size is refused by name."""
import json
import logging
import shutil
from pathlib import Path

import pytest

from dist_harness import run_distributed
from tiny_runs import tiny_overrides

pytestmark = pytest.mark.multiproc

RUNS = {"tp2": ["parallel.tp_size=2", "zero.stage=1"],  # TP=2 x DP=1: a TP shard per rank
        "z3": ["zero.stage=3", "train.precision=bf16"]}  # DP=2 under ZeRO-3: its parameters partitioned over both ranks
COMMON = ["train.steps=4", "train.eval_tokens=512", "train.checkpoint_interval=2"]  # kept: steps 2 and 4
# consolidated from its checkpoint only: TP=2 with one key/value head (replicated on both ranks), Q / K / V biases, a
# tied head and a mixture of experts (their weights TP-split), under ZeRO-3 over DP=2 on 4 processes
ODD = ["parallel.tp_size=2", "zero.stage=3", "model.n_kv_heads=1", "model.qkv_bias=true", "model.tie_embeddings=true",
       "model.moe_experts=4", "model.moe_top_k=2", "model.d_ff=32", "train.steps=2"]


def _overrides(root, name, extra=()):
    return tiny_overrides(Path(root) / name, "supervised", COMMON + RUNS[name] + list(extra))


def _error(fn):
    from megadistill.errors import UserError
    try:
        fn()
    except UserError as e:
        return str(e)
    return None


def _on_four(rank, world, root):
    from megadistill import config
    from megadistill.train.offline import evaluate_run
    from megadistill.train.trainer import train
    train(config.load([], tiny_overrides(Path(root) / "odd", "supervised", ODD)))
    # the same at ZeRO-1. Both evaluated as written: at ZeRO-1 each rank loads its TP shard from the module states
    # (no engine), at ZeRO-3 its own partitions into a frozen ZeRO-3 engine (no optimizer)
    train(config.load([], tiny_overrides(Path(root) / "odd_z1", "supervised", ODD + ["zero.stage=1"])))
    return {name: evaluate_run(str(Path(root) / name))["eval_loss"] for name in ("odd", "odd_z1")}


def _on_two(rank, world, root):
    from megadistill import config
    from megadistill.train.offline import evaluate_run
    from megadistill.train.trainer import train
    import torch.distributed as dist
    root = Path(root)
    for name in RUNS:
        train(config.load([], _overrides(root, name)))
    if rank == 0:  # the same runs unfinished (killed after their last checkpoint: no model/, no DONE)
        for name in RUNS:
            shutil.copytree(root / name, root / f"{name}_unfinished")
            shutil.rmtree(root / f"{name}_unfinished" / "model")
            (root / f"{name}_unfinished" / "DONE").unlink()
        (root / "tp2_unfinished" / ".step_00000004.consolidated.1").mkdir()  # left by a killed eval
    dist.barrier()
    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("megadistill.train.offline").addHandler(handler)
    # the writers' world size at another TP size: the TP=2 run at TP=1 x DP=2, from its consolidated weights, and
    # unfinished, from its TP shards (rank 0 consolidates them into a scratch dir both ranks read); the ZeRO-3 run as
    # written (its DeepSpeed partitions, loaded module-only)
    return {"tp2_at_tp1_dp2": evaluate_run(str(root / "tp2"), ["parallel.tp_size=1"])["eval_loss"],
            "tp2_unfinished_at_tp1_dp2": evaluate_run(str(root / "tp2_unfinished"),
                                                      ["parallel.tp_size=1"])["eval_loss"],
            "stale_warning": [w for w in warned if "consolidated weights of an eval" in w],
            "z3_as_written": evaluate_run(str(root / "z3"))["eval_loss"],
            "tp2_step2_as_written": evaluate_run(str(root / "tp2"), step=2)["eval_loss"]}  # appends a step-2 record


def _on_one(rank, world, root):
    from safetensors.torch import load_file
    from megadistill import config
    from megadistill.train.consolidate import checkpoint_weights
    from megadistill.train.offline import evaluate_run, export_run, run_config
    from megadistill.train.trainer import train
    root = Path(root)
    out = {f"{name}_eval": evaluate_run(str(root / name))["eval_loss"] for name in RUNS}
    export_run(str(root / "tp2"), str(root / "tp2_export"))
    a = load_file(str(root / "tp2_export" / "model.safetensors"))
    b = load_file(str(root / "tp2" / "model" / "model.safetensors"))
    out["export_same_names"] = a.keys() == b.keys()
    out["export_max_diff"] = max(float((a[k] - b[k]).abs().max()) for k in b)
    # the unfinished copies: their checkpoint's shards consolidated offline, for eval and export
    for name in RUNS:
        run = root / f"{name}_unfinished"
        out[f"{name}_unfinished_eval"] = evaluate_run(str(run))["eval_loss"]
        export_run(str(run), str(root / f"{name}_unfinished_export"))
        c = load_file(str(root / f"{name}_unfinished_export" / "model.safetensors"))
        d = load_file(str(root / name / "model" / "model.safetensors"))
        out[f"{name}_unfinished_export_diff"] = (c.keys() == d.keys()) and max(float((c[k] - d[k]).abs().max())
                                                                                for k in d)
        out[f"{name}_unfinished_export_meta"] = json.loads((root / f"{name}_unfinished_export" / "meta.json")
                                                           .read_text())
        out[f"{name}_scratch_left"] = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    # an earlier kept checkpoint (an intermediate teacher, say): eval and export of step 2 on 1 process, from its
    # shards (the run's model/ is step 4's)
    out["tp2_step2_eval"] = evaluate_run(str(root / "tp2"), step=2)["eval_loss"]
    evaluate_run(str(root / "tp2"), ["data.synthetic_seed=99"], step=2)  # other data: not the export's eval_loss
    export_run(str(root / "tp2"), str(root / "tp2_step2"), step=2)
    e = load_file(str(root / "tp2_step2" / "model.safetensors"))
    out["tp2_step2_export_differs"] = max(float((e[k] - b[k]).abs().max()) for k in b)
    out["tp2_step2_meta"] = json.loads((root / "tp2_step2" / "meta.json").read_text())
    out["step3_error"] = _error(lambda: evaluate_run(str(root / "tp2"), step=3))
    odd = checkpoint_weights(root / "odd" / "checkpoints" / "step_00000002", run_config(root / "odd"))
    want = load_file(str(root / "odd" / "model" / "model.safetensors"))
    out["odd_names"] = sorted(odd) == sorted(want)
    out["odd_diff"] = max(float((odd[k] - want[k]).abs().max()) for k in want)
    # a checkpoint read with a config that did not write it: named, not a shape error deep in a cat
    ckpt = root / "tp2" / "checkpoints" / "step_00000004"
    for key, over in (("layers", ["model.n_layers=3"]), ("tp", ["parallel.tp_size=1"])):
        out[f"mismatch_{key}"] = _error(lambda: checkpoint_weights(ckpt, run_config(root / "tp2", over)))
    resumed = _overrides(root, "z3", [f"train.run_dir={root / 'z3_unfinished'}", "train.resume=true"])
    out["z3_resume_error"] = _error(lambda: train(config.load([], resumed)))
    out["records"] = {name: [json.loads(line) for line in open(root / name / "eval.jsonl")]
                      for name in [*RUNS, "odd", "odd_z1"]}
    return out


@pytest.fixture(scope="module")
def relayout(tmp_path_factory):
    root = tmp_path_factory.mktemp("relayout")
    four = run_distributed(_on_four, 4, str(root), timeout=600)[0]
    two = run_distributed(_on_two, 2, str(root), timeout=600)[0]
    return {**two, **run_distributed(_on_one, 1, str(root), timeout=600)[0], "as_written_on_four": four}


def test_finished_runs_evaluate_and_export_on_one_process(relayout):
    recs = relayout["records"]
    # the run's own final eval (2 processes) against the same weights on 1; fp32, measured 3e-8 apart at TP 2 -> 1
    # (the head's reductions split otherwise), equal under ZeRO-3 DP 2 -> 1
    for name in RUNS:
        # (in between: 2-process offline evals; tp2 ends with its step-2 evals)
        trained, offline = recs[name][0], [r for r in recs[name] if r["step"] == 4][-1]
        assert offline["source"] == "megadistill eval" and offline["step"] == trained["step"] == 4, offline
        assert abs(offline["eval_loss"] - trained["eval_loss"]) < 1e-6, (name, trained, offline)
        assert relayout[f"{name}_eval"] == offline["eval_loss"]
    assert abs(relayout["tp2_at_tp1_dp2"] - recs["tp2"][0]["eval_loss"]) < 1e-6
    assert abs(relayout["z3_as_written"] - recs["z3"][0]["eval_loss"]) < 1e-6
    assert relayout["export_same_names"] and relayout["export_max_diff"] == 0.0


def test_unfinished_runs_evaluate_and_export_from_their_shards(relayout):
    recs = relayout["records"]
    # the checkpoint holds the final step's weights: the same loss as the finished run's own eval, and the same
    # exported tensors as its model/ (bit-equal: the TP shards and ZeRO-3 fp32 partitions are the weights it trained)
    for name in RUNS:
        assert abs(relayout[f"{name}_unfinished_eval"] - recs[name][0]["eval_loss"]) < 1e-6, name
        assert relayout[f"{name}_unfinished_export_diff"] == 0.0, name
        meta = relayout[f"{name}_unfinished_export_meta"]
        # its loss: the newest record of that step (here the offline eval just run on the copy)
        assert meta["step"] == 4 and meta["eval_loss"] == relayout[f"{name}_unfinished_eval"], meta
        # the scratch copies of the 2-process eval (above) and none of the 1-process ones (in memory) are left; a
        # killed eval's is named in a warning and left alone
        left = [".step_00000004.consolidated.1"] if name == "tp2" else []
        assert relayout[f"{name}_scratch_left"] == left, relayout[f"{name}_scratch_left"]
    # 2 processes at TP=1 reading the TP=2 run's shards that rank 0 consolidated
    assert abs(relayout["tp2_unfinished_at_tp1_dp2"] - recs["tp2"][0]["eval_loss"]) < 1e-6
    [warning] = relayout["stale_warning"]
    assert ".step_00000004.consolidated.1: consolidated weights of an eval still running, or of one killed" in warning


def test_an_earlier_kept_checkpoint_evaluates_and_exports(relayout):
    step2 = [r for r in relayout["records"]["tp2"] if r["step"] == 2 and r["config"]["data"]["synthetic_seed"] != 99]
    [other] = [r for r in relayout["records"]["tp2"] if r["config"]["data"]["synthetic_seed"] == 99]
    assert other["step"] == 2 and abs(other["eval_loss"] - step2[-1]["eval_loss"]) > 1e-4
    final = relayout["records"]["tp2"][0]["eval_loss"]
    # as written on 2 processes, and on 1 from its shards: the same weights; not the final ones
    assert [r["eval_loss"] for r in step2] == [relayout["tp2_step2_as_written"], relayout["tp2_step2_eval"]]
    assert abs(relayout["tp2_step2_eval"] - relayout["tp2_step2_as_written"]) < 1e-6
    assert abs(relayout["tp2_step2_eval"] - final) > 1e-3
    meta = relayout["tp2_step2_meta"]
    assert meta["step"] == 2 and meta["tokens"] == step2[0]["tokens"] and meta["eval_loss"] == step2[-1]["eval_loss"]
    assert relayout["tp2_step2_export_differs"] > 1e-4  # step 2's weights, not model/ (step 4's)
    err = relayout["step3_error"]
    assert err is not None and "has no checkpoint of step 3; it keeps steps [2, 4]" in err, err


def test_replicated_heads_biases_tied_head_and_experts_consolidate_exactly(relayout):
    assert relayout["odd_names"] and relayout["odd_diff"] == 0.0, relayout["odd_diff"]
    # read as written on 4 processes (TP=2 x DP=2; ZeRO-1 with no engine, ZeRO-3 into a frozen engine): the loss of
    # the run's own final eval
    for name in ("odd", "odd_z1"):
        trained = relayout["records"][name][0]
        assert trained["step"] == 2, trained
        assert relayout["as_written_on_four"][name] == pytest.approx(trained["eval_loss"], abs=1e-6), name


def test_a_checkpoint_read_with_another_config_is_named(relayout):
    err = relayout["mismatch_layers"]
    assert err is not None and "'blocks.2." in err and "not written by a run of this config" in err, err
    err = relayout["mismatch_tp"]
    assert err is not None and "no 1/1 split of its full shape" in err, err


def test_resume_on_another_world_size_is_refused_by_name(relayout):
    err = relayout["z3_resume_error"]  # before this check: DeepSpeed's bare AssertionError deep in its loader
    assert err is not None and "was written by 2 processes and this run has 1" in err, err
    assert "Relaunch on 2 processes" in err
