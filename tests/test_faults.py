"""Reliability catalogue, checkpoints and resume (docs/RELIABILITY.md): a kill during a checkpoint write, truncated /
corrupt / missing shards, `latest` pointing nowhere, `train.resume=latest_valid`, a crafted pickle in a checkpoint,
and a resumed config that changes the maths. Every fault is real (a SIGKILL mid-write, bytes cut or flipped on disk);
each check says what the user sees and that nothing written before is lost."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dist_harness import run_distributed
from tiny_runs import rewrite_saved_configs, set_manifest_entry, tiny_overrides

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# ZeRO-1 with the optimizer offloaded keeps stage 1 on one process: a checkpoint is 2 DeepSpeed shards (model states,
# optimizer states) + the trainer state, so a kill can land between shard writes
BASE = [f"train.steps={STEPS}", "train.checkpoint_interval=2", "zero.stage=1", "zero.offload_optimizer=cpu",
        "train.eval_tokens=256", "parallel.backend=gloo"]

# the killed job: a real training process that SIGKILLs itself right after the first shard of the step-4 checkpoint
KILL_CHILD = textwrap.dedent("""
    import os, signal, sys
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    write = TorchCheckpointEngine.save
    def save(self, state_dict, path):
        write(self, state_dict, path)
        if "step_00000004.tmp" in path:
            os.kill(os.getpid(), signal.SIGKILL)
    TorchCheckpointEngine.save = save
    from megadistill import config
    from megadistill.train.trainer import train
    train(config.load([], sys.argv[1:]))
""")

# disk full during a checkpoint: after step 3 the kernel refuses any file past 60 kB (RLIMIT_FSIZE, as a full disk
# refuses bytes), so the step-4 checkpoint's shards cannot be written; the logs' small appends still can
DISK_FULL_CHILD = textwrap.dedent("""
    import resource, signal, sys
    from megadistill import config
    from megadistill.errors import UserError
    from megadistill.train.trainer import train
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of being killed
    def progress(step, total):
        if step == 3:
            resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
    try:
        train(config.load([], sys.argv[1:]), progress=progress)
    except UserError as e:
        print(f"{type(e).__name__}: {e}")
        sys.exit(2)
""")


def _by_step(run_dir):
    """step -> loss of train.jsonl; steps re-run after a resume were logged twice: the last line wins."""
    out = {}
    for line in open(Path(run_dir) / "train.jsonl"):
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def _copy_unfinished(src: Path, dst: Path) -> Path:
    """A copy of a finished run as it was before its end (checkpoints, logs), so it can be resumed."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("DONE", "model"))
    return dst


def _snapshot(run: Path) -> dict:
    """The logs' bytes and every checkpoint file's bytes (config.yaml is rewritten by each start, by design)."""
    files = [run / "train.jsonl", run / "eval.jsonl", *sorted((run / "checkpoints").rglob("*"))]
    return {str(p): p.read_bytes() for p in files if p.is_file()}


class _Exec:
    """Unpickling this runs code: the payload of a crafted checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _error(fn):
    from megadistill.errors import UserError
    try:
        fn()
    except UserError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _checkpoint_faults(rank, world, root):
    import torch
    from megadistill import config
    from megadistill.train import checkpoint
    from megadistill.train.offline import export_run
    from megadistill.train.trainer import train
    root = Path(root)
    out = {}
    ref = root / "ref"
    train(config.load([], tiny_overrides(ref, "supervised", BASE)))
    out["ref"] = _by_step(ref)

    # 1) the killed run: latest is still step 2, the partial step-4 write is removed on resume, the curve is exact
    killed = root / "killed"
    ck = killed / "checkpoints"
    out["killed_latest"] = (ck / "latest").read_text().strip()
    out["killed_partial"] = sorted(p.name for p in (ck / "step_00000004.tmp").iterdir())
    out["killed_point"] = checkpoint.resume_point(killed, "true").name
    out["killed_partial_left"] = (ck / "step_00000004.tmp").exists()
    res = train(config.load([], tiny_overrides(killed, "supervised", BASE + ["train.resume=true"])))
    out["killed_resumed"] = (res.status, res.step, _by_step(killed))
    out["killed_ckpts"] = sorted(p.name for p in ck.iterdir() if p.is_dir())

    # 1b) disk full mid-checkpoint: the logs hold whole lines only, latest is step 2 and verifies, resume is exact
    full = root / "diskfull"
    from megadistill.laws.records import read_records
    recs, bad = read_records(full / "eval.jsonl")
    out["diskfull_eval"] = ([r["step"] for r in recs], bad)
    out["diskfull_train_steps"] = sorted(_by_step(full))
    out["diskfull_latest"] = (full / "checkpoints" / "latest").read_text().strip()
    out["diskfull_point"] = checkpoint.resume_point(full, "true").name
    res = train(config.load([], tiny_overrides(full, "supervised", BASE + ["train.resume=true"])))
    out["diskfull_resumed"] = (res.status, res.step, _by_step(full))
    out["diskfull_ckpts"] = sorted(p.name for p in (full / "checkpoints").iterdir() if p.is_dir())

    # 2) damaged checkpoints: the named error offers latest_valid and names the checkpoint it would take
    def damaged(name, fault):
        run = _copy_unfinished(ref, root / name)
        fault(run / "checkpoints", run / "checkpoints" / "step_00000006")
        return run

    def truncate(ck, s6):
        p = s6 / "mp_rank_00_model_states.pt"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    def flip(ck, s6):
        p = s6 / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))

    faults = {"truncated": truncate, "corrupt": flip,
              "missing": lambda ck, s6: (s6 / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(),
              "nowhere": lambda ck, s6: (ck / "latest").write_text("step_00000099\n"),
              "no_pointer": lambda ck, s6: (ck / "latest").unlink(),
              "no_manifest_left": lambda ck, s6: (s6 / "manifest.json").unlink() or truncate(ck, s6)}
    for name, fault in faults.items():
        run = damaged(name, fault)
        out[f"{name}_error"] = _error(lambda: checkpoint.resume_point(run, "true"))
        # and through train(): refused before any step, nothing of the run dir changed
        before = _snapshot(run)
        out[f"{name}_train_error"] = _error(lambda: train(config.load([], tiny_overrides(
            run, "supervised", BASE + ["train.resume=true"]))))
        out[f"{name}_untouched"] = before == _snapshot(run)

    # 3) train.resume=latest_valid after the corrupt newest checkpoint: resumes from step 4, exact; the bad one is set
    # aside (not deleted), `latest` moves
    run = root / "corrupt"
    res = train(config.load([], tiny_overrides(run, "supervised", BASE + ["train.resume=latest_valid"])))
    out["latest_valid"] = (res.status, res.step, _by_step(run))
    out["latest_valid_dirs"] = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    out["latest_valid_pointer"] = (run / "checkpoints" / "latest").read_text().strip()

    # 4) a crafted pickle in a checkpoint dir (manifest updated to match, as a foreign checkpoint's would be): refused
    # by the loader, the payload never runs
    run = _copy_unfinished(ref, root / "crafted")
    s6 = run / "checkpoints" / "step_00000006"
    marker = root / "payload_ran"
    torch.save({"module": _Exec(marker)}, s6 / "mp_rank_00_model_states.pt")
    set_manifest_entry(s6, "mp_rank_00_model_states.pt")
    out["crafted_error"] = _error(lambda: train(config.load([], tiny_overrides(
        run, "supervised", BASE + ["train.resume=true"]))))
    out["crafted_ran"] = marker.exists()
    out["offline_crafted_error"] = _error(lambda: export_run(str(run), str(root / "export")))
    out["crafted_ran_offline"] = marker.exists()

    # 5) a resumed config that changes the maths is refused, listing the keys; reporting keys may change
    run = _copy_unfinished(ref, root / "reconfig")
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    out["math_error"] = _error(lambda: train(config.load([], tiny_overrides(
        run, "supervised", BASE + ["train.resume=true", "model.d_model=96", "model.n_heads=6", "train.seed=1",
                                   "parallel.timeout_s=120"]))))
    res = train(config.load([], tiny_overrides(run, "supervised", BASE + [
        "train.resume=true", "train.eval_interval=1", "train.log_interval=1", "parallel.timeout_s=120"])))
    out["harmless"] = (res.status, res.step, _by_step(run))
    return out


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    killed = root / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_CHILD, *tiny_overrides(killed, "supervised", BASE)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])
    full = subprocess.run([sys.executable, "-c", DISK_FULL_CHILD, *tiny_overrides(
        root / "diskfull", "supervised", BASE + ["train.eval_interval=2"])], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    out = run_distributed(_checkpoint_faults, 1, str(root), timeout=600)[0]
    out["diskfull_child"] = (full.returncode, full.stdout, full.stderr[-3000:])
    return out


def test_kill_during_checkpoint_write_keeps_previous_latest_and_resume_is_exact(faults):
    assert faults["killed_latest"] == "step_00000002"
    # the kill landed between shard writes: the model states are written, the optimizer states and manifest are not
    assert faults["killed_partial"] == ["mp_rank_00_model_states.pt"]
    assert faults["killed_point"] == "step_00000002" and not faults["killed_partial_left"]
    status, step, curve = faults["killed_resumed"]
    assert (status, step) == ("finished", STEPS)
    assert curve == faults["ref"]  # bit-for-bit, step by step, across the kill
    assert faults["killed_ckpts"] == ["step_00000004", "step_00000006"]  # no .tmp left behind


@pytest.mark.parametrize("name,what", [("truncated", "mp_rank_00_model_states.pt is truncated"),
                                       ("corrupt", "zero_pp_rank_0_mp_rank_00_optim_states.pt is corrupt"),
                                       ("missing", "zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"),
                                       ("nowhere", "names checkpoint 'step_00000099', which does not exist"),
                                       ("no_pointer", "latest is missing"),
                                       ("no_manifest_left", "mp_rank_00_model_states.pt cannot be read")])
def test_damaged_checkpoint_is_a_named_error_offering_latest_valid(faults, name, what):
    err = faults[f"{name}_train_error"]
    assert err is not None and err.startswith("CheckpointError") and what in err, err
    if name != "no_manifest_left":  # found by verification before any engine is built, naming the fallback
        assert faults[f"{name}_error"] == err
        # a damaged step 6 falls back to step 4; a bad pointer alone leaves step 6 intact, the fallback
        fallback = "step_00000006" if name in ("nowhere", "no_pointer") else "step_00000004"
        assert f"newest complete checkpoint ({fallback}) with train.resume=latest_valid" in err, err
    else:  # an older checkpoint without a manifest: the loader's read fails, named, with the fallback
        assert faults[f"{name}_error"] is None and "train.resume=latest_valid" in err
    assert faults[f"{name}_untouched"]


def test_resume_latest_valid_falls_back_to_the_last_complete_checkpoint(faults):
    status, step, curve = faults["latest_valid"]
    assert (status, step) == ("finished", STEPS)
    assert curve == faults["ref"]
    # the corrupt checkpoint is set aside, not deleted; `latest` names the new step 6
    assert "step_00000006.bad" in faults["latest_valid_dirs"] and faults["latest_valid_pointer"] == "step_00000006"


def test_crafted_pickle_in_a_checkpoint_is_refused(faults):
    for key in ("crafted_error", "offline_crafted_error"):
        err = faults[key]
        assert err is not None and "pickled code" in err and "refused" in err, err
    assert not faults["crafted_ran"] and not faults["crafted_ran_offline"]


def test_resumed_config_changing_the_maths_is_refused(faults):
    err = faults["math_error"]
    assert err is not None and err.startswith("ConfigError") and "train.resume" in err, err
    for key in ("model.d_model: checkpoint 64, now 96", "model.n_heads", "train.seed: checkpoint 0, now 1"):
        assert key in err, err
    assert "parallel.timeout_s" not in err  # a key that may change is not listed
    status, step, curve = faults["harmless"]
    assert (status, step) == ("finished", STEPS)
    assert curve == faults["ref"]  # eval / log interval changed: same training


def test_disk_full_during_a_checkpoint_is_a_named_error_and_nothing_is_lost(faults):
    rc, stdout, stderr = faults["diskfull_child"]
    assert rc == 2, (rc, stdout, stderr)
    assert "CheckpointError: could not write checkpoint" in stdout and "step_00000004.tmp" in stdout, stdout
    assert "disk full" in stdout and "The previous checkpoint is intact" in stdout, stdout
    # whole lines only; the eval of step 4 came before the failed checkpoint and is complete
    assert faults["diskfull_eval"] == ([2, 4], 0)
    assert faults["diskfull_train_steps"] == [1, 2, 3, 4]
    assert faults["diskfull_latest"] == faults["diskfull_point"] == "step_00000002"
    status, step, curve = faults["diskfull_resumed"]
    assert (status, step) == ("finished", STEPS) and curve == faults["ref"]
    assert faults["diskfull_ckpts"] == ["step_00000004", "step_00000006"]


def _stage0_checkpoint_under_zero1(rank, world, root):
    """A bf16 one-rank run checkpointed at ZeRO stage 0 (as megadistill ran it before it kept ZeRO-1 there), resumed
    by a config saying zero.stage=1: a named error telling how to resume, not DeepSpeed's missing-file failure."""
    from megadistill import config
    from megadistill.errors import UserError
    from megadistill.train.trainer import train
    run = Path(root) / "bf16_z0"
    extra = ["train.steps=3", "train.checkpoint_interval=1", "train.eval_tokens=256", "train.precision=bf16"]
    train(config.load([], tiny_overrides(run, "supervised", extra + ["zero.stage=0", "train.stop_after_steps=1"])))
    rewrite_saved_configs(run, r"(?m)^  stage: 0$", "  stage: 1")  # as the old version wrote them
    try:
        train(config.load([], tiny_overrides(run, "supervised", extra + ["zero.stage=1", "train.resume=true"])))
    except UserError as e:
        return f"{type(e).__name__}: {e}"
    return "resumed"


def test_stage0_checkpoint_resumed_under_zero1_is_a_named_error(tmp_path):
    err = run_distributed(_stage0_checkpoint_under_zero1, 1, str(tmp_path))[0]
    assert err.startswith("CheckpointError:") and "resume it with zero.stage=0" in err, err


def test_stale_extension_build_lock_is_cleared_before_deepspeed_starts(tmp_path, caplog, monkeypatch):
    """A process killed while torch JIT-builds DeepSpeed's op leaves <extensions dir>/<op>/lock, and every later start
    would wait on it forever (seen here: each test of a re-run hung). init_distributed first removes locks older than
    STALE_BUILD_LOCK_S, naming them; a younger one (a build in progress) is kept and named."""
    import logging
    import os
    import time

    from megadistill.parallel.init import STALE_BUILD_LOCK_S, clear_stale_build_locks
    old, young = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock, age in ((old, STALE_BUILD_LOCK_S + 60), (young, 5)):
        lock.parent.mkdir(parents=True)
        lock.touch()
        os.utime(lock, (time.time() - age, time.time() - age))
    (tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"built")
    with caplog.at_level(logging.WARNING, logger="megadistill.parallel.init"):
        assert clear_stale_build_locks(root=str(tmp_path)) == [old]
    assert not old.exists() and young.exists() and (old.parent / "deepspeed_shm_comm.so").exists()
    assert f"removed the build lock {old}" in caplog.text and f"build lock {young} is 5 s old" in caplog.text
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # the root init_distributed uses, as torch does
    os.utime(young, (time.time() - 2 * STALE_BUILD_LOCK_S, time.time() - 2 * STALE_BUILD_LOCK_S))
    assert clear_stale_build_locks() == [young]
