"""Launch paths end to end: a two-"node" torchrun on localhost through launch/train.sh distilling from a tiny
teacher, and SIGUSR1 preemption of a running `megadistill train` followed by an exact resume."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_runs import tiny_overrides

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]
STEPS_PREEMPT = 80  # long enough that the run is still going when the signal lands (~40 ms per step)




def _env(**extra):
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DRY_RUN")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_", "TORCHELASTIC_")) and k not in drop}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable)
    env.update(extra)
    return env


def _train_cmd(items):
    return [sys.executable, "-m", "megadistill.cli", "train", *map(str, items)]


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(Path(run_dir) / "train.jsonl")]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("launch") / "teacher"
    out = subprocess.run(_train_cmd(tiny_overrides(run_dir, "supervised", ["train.steps=8", "model.d_model=96",
                                                                      "model.n_heads=6"])),
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "DONE").is_file() and (run_dir / "model" / "model.safetensors").is_file()
    return run_dir


def test_two_node_torchrun_distillation(teacher, tmp_path):
    run_dir = tmp_path / "kd2"
    items = tiny_overrides(run_dir, "distill", ["train.steps=4", f"distill.teacher={teacher}", "zero.stage=2"])
    port = str(_free_port())
    procs = []
    for rank in (0, 1):  # two "nodes" of one process each; node 0 hosts the c10d rendezvous
        env = _env(NNODES="2", NODE_RANK=str(rank), NPROC="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   RDZV_ID=f"test-{port}")
        procs.append(subprocess.Popen(["bash", str(ROOT / "launch" / "train.sh"), *items], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {rank}:\n{log[-4000:]}"
    assert "world_size=2" in logs[0] and "dp_size 2" in logs[0], logs[0][-3000:]
    assert (run_dir / "DONE").is_file()
    losses = _losses(run_dir)
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)
    recs = [json.loads(line) for line in open(run_dir / "eval.jsonl")]
    rec = recs[-1]
    assert rec["mode"] == "distill" and rec["step"] == 4 and rec["tokens"] == 4 * 8 * 32
    assert rec["teacher"]["run"] == "teacher" and 0 < rec["eval_loss"] < 20
    assert 0 < rec["teacher"]["eval_loss"] < 20


def test_sigusr1_checkpoints_and_resume_is_exact(teacher, tmp_path):
    items = ["train.log_interval=1", f"train.steps={STEPS_PREEMPT}", f"distill.teacher={teacher}"]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "preempted"
    # the uninterrupted reference runs alongside the preempted run (both single-process)
    ref = subprocess.Popen(_train_cmd(tiny_overrides(ref_dir, "distill", items)), env=_env(), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = subprocess.Popen(_train_cmd(tiny_overrides(run_dir, "distill", items)), env=_env(), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not ((run_dir / "train.jsonl").is_file() and (run_dir / "train.jsonl").read_text().strip()):
            assert run.poll() is None, run.stdout.read()[-3000:]
            assert time.time() < deadline, "no training step logged in time"
            time.sleep(0.02)
        run.send_signal(signal.SIGUSR1)
        log = run.communicate(timeout=120)[0]
        ref_log = ref.communicate(timeout=300)[0]
    finally:
        for p in (ref, run):
            if p.poll() is None:
                p.kill()
    assert run.returncode == 0, log[-3000:]
    assert ref.returncode == 0 and (ref_dir / "DONE").is_file(), ref_log[-3000:]
    stopped = _losses(run_dir)
    k = len(stopped)
    assert 1 <= k < STEPS_PREEMPT, f"the run finished ({k} steps) before the signal arrived; raise STEPS_PREEMPT"
    assert not (run_dir / "DONE").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{k:08d}"
    assert f"preempted: {run_dir} at step {k}" in log
    # resume: the requeued job's command line
    resumed = subprocess.run(_train_cmd(tiny_overrides(run_dir, "distill", items + ["train.resume=true"])), env=_env(),
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "DONE").is_file()
    reference = _losses(ref_dir)
    assert len(reference) == STEPS_PREEMPT
    assert _losses(run_dir) == reference  # bit-for-bit, step by step, across the interruption
    assert json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])["eval_loss"] == \
        json.loads((ref_dir / "eval.jsonl").read_text().splitlines()[-1])["eval_loss"]


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _torchrun(items, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           f"--master-port={port}", "-m", "megadistill.cli", "train", *map(str, items)]
    return subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # ~2 min: three 2-process torchrun jobs
def test_kill9_of_one_rank_fails_the_job_and_resume_is_exact(tmp_path):
    """kill -9 of one of 2 ranks mid-run: the job exits non-zero within a bounded time (no hang), and
    train.resume=true continues from the last checkpoint to the same loss curve as an uninterrupted run."""
    steps = 40
    base = ["train.steps=%d" % steps, "train.checkpoint_interval=4", "zero.stage=1", "parallel.timeout_s=60",
            "train.eval_tokens=256"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    run = _torchrun(tiny_overrides(run_dir, "supervised", base), _free_port())
    try:
        deadline = time.time() + 240
        while len((run_dir / "train.jsonl").read_text().splitlines() if (run_dir / "train.jsonl").is_file()
                  else []) < 6:
            assert run.poll() is None, run.stdout.read()[-3000:]
            assert time.time() < deadline, "no training steps logged in time"
            time.sleep(0.05)
        workers = _children(run.pid)  # torchrun's workers are its children
        assert len(workers) >= 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        t0 = time.time()
        log = run.communicate(timeout=120)[0]
        waited = time.time() - t0
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0, log[-3000:]
    assert waited < 90, waited
    print(f"job exited {waited:.1f} s after the kill")
    assert not (run_dir / "DONE").exists()
    killed_at = len(_losses(run_dir))
    assert killed_at < steps
    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
                          f"--master-port={_free_port()}", "-m", "megadistill.cli", "train",
                          *tiny_overrides(ref_dir, "supervised", base)], env=_env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    resumed = _torchrun(tiny_overrides(run_dir, "supervised", base + ["train.resume=true"]), _free_port())
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log[-3000:]
    by_step = {}
    for line in open(run_dir / "train.jsonl"):  # steps after the last checkpoint were logged twice: the last wins
        r = json.loads(line)
        by_step[r["step"]] = r["loss"]
    reference = {json.loads(line)["step"]: json.loads(line)["loss"] for line in open(ref_dir / "train.jsonl")}
    assert by_step == reference


def test_an_existing_process_group_decides_the_backend(tmp_path, monkeypatch):
    """A gloo group made before init_distributed (the test harness's, a notebook's) is used as it is, even where CUDA
    is available: no NCCL device placement on a gloo group; asking for another backend is a named error."""
    import torch
    import torch.distributed as dist

    from megadistill.errors import UserError
    from megadistill.parallel.init import init_distributed
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "set_device", lambda *a: pytest.fail("set_device on a gloo group"))
        info = init_distributed("auto")
        assert (info.backend, info.device.type, info.world_size) == ("gloo", "cpu", 1)
        with pytest.raises(UserError, match="parallel.backend=nccl but torch.distributed already runs gloo"):
            init_distributed("nccl")
    finally:
        dist.destroy_process_group()
