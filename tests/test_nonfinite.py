"""Reliability catalogue, non-finite training (docs/RELIABILITY.md): a NaN in one micro-batch on one rank of a 2-process
run, with ZeRO (DeepSpeed's overflow check drops the step) and without (the trainer's pre-step hook drops it):
train.nonfinite=skip skips exactly that step (no update, counted in train.jsonl) and training goes on finite;
train.nonfinite=stop stops with an error naming the step, the micro-batch and the last good checkpoint."""
import json
from pathlib import Path

import pytest

from dist_harness import run_distributed
from tiny_runs import tiny_overrides

pytestmark = pytest.mark.multiproc

STEPS = 5
BAD_CALL = 5  # the student's 5th training forward on rank 1: step 3 (2 micro-batches per step per rank), micro-batch 1


def _inject_nan(rank):
    """A NaN in the student's logits of one micro-batch on rank 1 (fault injection through torch's global hook)."""
    import torch
    from megadistill.model.transformer import Transformer
    calls = [0]

    def hook(module, args, out):
        if isinstance(module, Transformer) and module.training and torch.is_grad_enabled():
            calls[0] += 1
            if rank == 1 and calls[0] == BAD_CALL:
                return out * float("nan")
        return out

    return torch.nn.modules.module.register_module_forward_hook(hook)


def _params(ckpt):
    import torch
    from megadistill.train.checkpoint import safe_torch_load
    return {k: v.clone() for k, v in safe_torch_load(Path(ckpt) / "mp_rank_00_model_states.pt")["module"].items()
            if isinstance(v, torch.Tensor)}


def _nonfinite_runs(rank, world, root):
    import torch
    from megadistill import config
    from megadistill.errors import UserError
    from megadistill.train.trainer import train
    root = Path(root)
    out = {}
    base = [f"train.steps={STEPS}", "train.checkpoint_interval=1", "train.keep_checkpoints=10", "train.eval_tokens=256"]
    for name, extra in {"zero1_skip": ["zero.stage=1", "train.nonfinite=skip"],
                        "zero0_skip": ["zero.stage=0", "train.nonfinite=skip"],
                        # bf16: DeepSpeed's ZeRO-1 optimizer, and its unfused bf16 wrapper without ZeRO
                        "zero1_bf16_skip": ["zero.stage=1", "train.precision=bf16", "train.nonfinite=skip"],
                        "zero0_bf16_skip": ["zero.stage=0", "train.precision=bf16", "train.nonfinite=skip"],
                        "zero1_stop": ["zero.stage=1"],  # the default: stop
                        "zero0_stop": ["zero.stage=0", "train.nonfinite=stop"]}.items():
        run = root / name
        handle = _inject_nan(rank)
        try:
            res = train(config.load([], tiny_overrides(run, "supervised", base + extra), world_size=world))
            out[name] = {"status": res.status, "step": res.step}
        except UserError as e:
            out[name] = {"error": f"{type(e).__name__}: {e}", "run": str(run)}
        finally:
            handle.remove()
        if rank == 0:
            out[name]["log"] = [json.loads(line) for line in open(run / "train.jsonl")]
            ck = run / "checkpoints"
            steps = sorted(p.name for p in ck.iterdir() if p.name.startswith("step_"))
            out[name]["checkpoints"] = steps
            if "error" not in out[name]:
                p2, p3, p5 = (_params(ck / f"step_{s:08d}") for s in (2, 3, 5))
                out[name]["step3_applied"] = any(not torch.equal(p2[k], p3[k]) for k in p2)
                out[name]["finite_at_end"] = all(bool(v.isfinite().all()) for v in p5.values())
                out[name]["step4_applied"] = any(not torch.equal(p3[k], _params(ck / "step_00000004")[k]) for k in p3)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_nonfinite_runs, 2, str(tmp_path_factory.mktemp("nonfinite")), timeout=600)


@pytest.mark.parametrize("name", ["zero1_skip", "zero0_skip", "zero1_bf16_skip", "zero0_bf16_skip"])
def test_skip_drops_exactly_the_nonfinite_step_and_counts_it(runs, name):
    r = runs[0][name]
    assert r["status"] == "finished" and r["step"] == STEPS, r
    log = {rec["step"]: rec for rec in r["log"]}
    assert [s for s, rec in log.items() if rec["loss"] != rec["loss"]] == [3]  # the NaN step is logged as it was
    assert "skipped_steps" not in log[2] and all(log[s]["skipped_steps"] == 1 for s in (3, 4, 5))
    assert all(log[s]["loss"] < log[1]["loss"] for s in (4, 5))  # training went on, finite and learning
    assert not r["step3_applied"] and r["step4_applied"] and r["finite_at_end"]


@pytest.mark.parametrize("name", ["zero1_stop", "zero0_stop"])
def test_stop_names_step_micro_batch_and_last_good_checkpoint(runs, name):
    for rank_out in runs:  # every rank stops with the same error (no rank left waiting in a collective)
        err = rank_out[name]["error"]
        assert err.startswith("NonFiniteError: non-finite training at step 3"), err
        assert "first in micro-batch 1 of 2 (rank 1)" in err and "the step was not applied" in err, err
        assert f"Last good checkpoint: {rank_out[name]['run']}/checkpoints/step_00000002." in err, err
        assert "train.nonfinite=skip" in err, err
    r = runs[0][name]
    assert [rec["step"] for rec in r["log"]] == [1, 2]  # the NaN step is not logged as a training step
    assert r["checkpoints"] == ["step_00000001", "step_00000002"]  # nothing written after the fault


def test_nonfinite_keys_are_validated():
    from megadistill import config
    from megadistill.config import ConfigError
    with pytest.raises(ConfigError, match=r"train.nonfinite='ignore' is not one of \['stop', 'skip'\]"):
        config.load([], ["train.nonfinite=ignore"])
    with pytest.raises(ConfigError, match=r"train.nonfinite_max_skips=-1 must be >= 0"):
        config.load([], ["train.nonfinite_max_skips=-1"])
    with pytest.raises(ConfigError, match=r"train.resume='maybe' is not one of \['true', 'false', 'latest_valid'\]"):
        config.load([], ["train.resume=maybe"])
