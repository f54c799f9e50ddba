"""Entry tests of the trainer verbs (train, eval, export) through the real CLI, plus a golden-loss drift check."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "assets" / "golden_tiny.json"
TINY = ["train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=4", "train.eval_tokens=512",
        "train.progress=false", "optim.warmup_steps=2", "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
        "model.head_dim=16", "model.ff_multiple=32", "model.vocab_size=64", "data.synthetic_branching=4",
        "train.log_interval=1", "zero.stage=0", "model.size=null"]  # the shape above, not a YAML's named size


def cli(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "megadistill.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"megadistill {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "teacher"
    cli("train", "configs/tiny/teacher.yaml", *TINY, "train.steps=6", f"train.run_dir={run}")
    return run


def test_train_writes_run_dir(trained):
    for f in ("config.yaml", "train.jsonl", "eval.jsonl", "DONE", "model/model.safetensors", "model/meta.json"):
        assert (trained / f).exists(), f
    steps = [json.loads(line) for line in open(trained / "train.jsonl")]
    assert [s["step"] for s in steps] == list(range(1, 7))
    assert all(s["tokens_per_s"] > 0 and s["lr"] > 0 for s in steps)


def test_golden_losses(trained):
    """The tiny run's loss curve must not drift silently (fp32, CPU; regenerate on purpose with UPDATE_GOLDEN=1)."""
    losses = [json.loads(line)["loss"] for line in open(trained / "train.jsonl")]
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"overrides": TINY + ["train.steps=6"], "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(golden), atol=2e-4, rtol=0)


def test_rerun_of_finished_run_is_skipped(trained):
    before = (trained / "train.jsonl").read_text()
    proc = cli("train", "configs/tiny/teacher.yaml", *TINY, "train.steps=6", f"train.run_dir={trained}")
    assert "skipping" in proc.stderr and "differs" not in proc.stderr
    assert (trained / "train.jsonl").read_text() == before


def test_rerun_of_finished_run_with_another_config_says_what_differs(trained):
    """Still skipped (a sweep's rerun is a no-op), but an edited config is named, not silently ignored."""
    before = (trained / "train.jsonl").read_text()
    proc = cli("train", "configs/tiny/teacher.yaml", *TINY, "train.steps=8", "optim.lr=0.02", "train.eval_interval=2",
               f"train.run_dir={trained}")
    assert "skipping" in proc.stderr and "differs from the one it was trained with in 2 key(s)" in proc.stderr
    assert "optim.lr: trained with 0.01, now 0.02; train.steps: trained with 6, now 8" in proc.stderr, proc.stderr
    assert "eval_interval" not in proc.stderr.split("differs")[1]  # reporting keys may differ
    assert (trained / "train.jsonl").read_text() == before


def test_eval_appends_record(trained):
    n_before = len((trained / "eval.jsonl").read_text().splitlines())
    proc = cli("eval", str(trained), "--eval-tokens", "256")
    assert "eval_loss" in proc.stdout
    lines = (trained / "eval.jsonl").read_text().splitlines()
    assert len(lines) == n_before + 1
    rec = json.loads(lines[-1])
    assert rec["source"] == "megadistill eval" and rec["eval_tokens"] == 256 and rec["step"] == 6


def test_export_matches_final_weights(trained, tmp_path):
    from safetensors.torch import load_file
    cli("export", str(trained), "-o", str(tmp_path / "exp"))
    a = load_file(str(tmp_path / "exp" / "model.safetensors"))
    b = load_file(str(trained / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert (tmp_path / "exp" / "config.yaml").is_file()


def test_config_errors_name_the_key(tmp_path):
    proc = cli("train", "configs/tiny/teacher.yaml", "train.stepz=3", check=False)
    assert proc.returncode == 2
    assert "train.stepz" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("train", "configs/tiny/distill.yaml", f"distill.teacher={tmp_path / 'nowhere'}",
               f"train.run_dir={tmp_path / 'kd'}", check=False)
    assert proc.returncode == 2 and "no consolidated weights" in proc.stderr and "Traceback" not in proc.stderr


def test_existing_checkpoints_need_resume(trained, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    (run / "DONE").unlink()
    proc = cli("train", "configs/tiny/teacher.yaml", *TINY, "train.steps=8", f"train.run_dir={run}", check=False)
    assert proc.returncode == 2 and "train.resume=true" in proc.stderr


def test_eval_of_a_distill_run_keeps_its_teacher(trained, tmp_path):
    """`megadistill eval` on a distilled run must still aggregate as a distillation point (teacher block, FLOPs)."""
    run = tmp_path / "kd"
    cli("train", "configs/tiny/distill.yaml", *TINY, "train.steps=3",
        f"distill.teacher={trained}", f"train.run_dir={run}")
    cli("eval", str(run), "--eval-tokens", "256")
    trained_rec, evaluated = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()][-2:]
    assert evaluated["source"] == "megadistill eval"
    assert evaluated["teacher"] == trained_rec["teacher"]
    assert evaluated["flops"] == pytest.approx(trained_rec["flops"])


def test_teacher_loads_exactly_the_exported_weights(trained):
    """The teacher is built on the meta device and materialised by the load: every weight is the exported one, in the
    requested dtype, frozen, with its TP / µP tags intact."""
    from safetensors.torch import load_file

    from megadistill import config
    from megadistill.parallel.groups import ParallelGroups
    from megadistill.train import checkpoint
    from megadistill.train.teacher import load_teacher
    exported = load_file(str(trained / checkpoint.MODEL_DIR / checkpoint.WEIGHTS))
    for dtype in ("bf16", "fp32"):
        cfg = config.load(["configs/tiny/distill.yaml"], TINY + [f"distill.teacher={trained}",
                                                                  f"distill.teacher_dtype={dtype}"])
        teacher = load_teacher(cfg, ParallelGroups.single(), torch.device("cpu"))
        want = torch.bfloat16 if dtype == "bf16" else torch.float32
        params = dict(teacher.module.named_parameters())
        assert set(params) == set(exported)
        for name, p in params.items():
            assert p.dtype == want and not p.requires_grad and p.device.type == "cpu", name
            assert torch.equal(p, exported[name].to(want)), name
        wq = teacher.module.blocks[0].attn.wq.weight
        assert wq.tensor_model_parallel and wq.partition_dim == 0 and wq.mup_role == "hidden"
        assert not teacher.module.training


def test_teacher_cache_verb_and_cached_student(trained, tmp_path):
    """`megadistill teacher-cache` writes a complete cache; a student trains from it; its records say so."""
    cache, run = tmp_path / "cache", tmp_path / "student"
    student = ["configs/tiny/distill.yaml", *TINY, "train.steps=2"]
    proc = cli("teacher-cache", str(trained), "--data", *student, "-o", str(cache), "--top-k", "16", "--bf16")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["k"] == 16 and manifest["teacher_dtype"] == "bf16"
    assert manifest["tokens"] >= 2 * 4 * 32
    assert manifest["teacher"]["eval_loss"] > 0 and "bytes/token" in proc.stdout
    cli("train", *student, f"distill.teacher=cache:{cache}", f"train.run_dir={run}")
    rec = [json.loads(line) for line in open(run / "eval.jsonl")][-1]
    assert rec["teacher"]["cache"] == str(cache) and rec["teacher"]["cache_k"] == 16
    assert rec["flops_teacher_inference"] == 0.0 and rec["teacher"]["eval_loss"] == manifest["teacher"]["eval_loss"]
    bad = cli("train", *student, f"distill.teacher=cache:{cache}", "train.seq_len=16", f"train.run_dir={run}2",
              check=False)
    assert bad.returncode == 2 and "does not match this run" in bad.stderr
    assert not (run.parent / "student2" / "train.jsonl").exists()  # refused before any step


@pytest.mark.slow  # ~30 s; test_teacher_cache.py covers a stopped writer with torn temp files in the default run
def test_teacher_cache_survives_a_kill(trained, tmp_path):
    """SIGKILL the writer mid-way: the cache refuses to serve; the same command continues it to a valid cache."""
    import signal
    import time
    from megadistill.train import teacher_cache as tc
    N_SHARDS = 200  # one window each: many small atomic writes, so the kill lands between the first and the last
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "megadistill.cli", "teacher-cache", str(trained), "--data",
            "configs/tiny/distill.yaml", *TINY, "train.steps=2", "-o", str(cache), "--top-k", "8",
            "--shard-windows", "1", "--tokens", str(N_SHARDS * 32)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(cache.glob("stream*.safetensors"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list(cache.glob("stream*.safetensors")))
    assert 3 <= n_before < N_SHARDS, n_before  # killed part-way
    with pytest.raises(tc.CacheError, match="incomplete"):
        tc.TeacherCache(str(cache))
    cli(*args[3:])
    m = json.loads((cache / "manifest.json").read_text())
    assert m["complete"] and len(list(cache.glob("stream*.safetensors"))) == N_SHARDS
    for i in range(N_SHARDS):  # every shard, the ones before the kill included, reads back and checks its digest
        assert tc.read_shard(tc.shard_path(cache, 0, i), m["data_hash"])["ids"].shape == (1, 32, 8)
