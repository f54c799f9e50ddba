"""SLURM scripts: syntax, dry-run commands (nodes, ranks, rendezvous, resume, dependencies, skips), requeue logic
with fake srun/scontrol, and signal forwarding through slurm/node.sh to a torchrun worker."""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megadistill import config

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
SCRIPTS = [SLURM / "train.sbatch", SLURM / "sweep.sbatch", SLURM / "submit_sweep.sh", SLURM / "node.sh",
           ROOT / "launch" / "train.sh"]
TINY = ["train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8", "model.n_layers=2",
        "model.d_model=64", "model.n_heads=4", "model.head_dim=16", "model.ff_multiple=64", "model.vocab_size=128",
        "data.synthetic_branching=4", "train.steps=4"]

FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
if [ "$1" = show ] && [ "$2" = hostnames ]; then
  if [[ $3 =~ ^([^\[]+)\[([0-9]+)-([0-9]+)\]$ ]]; then
    a=${BASH_REMATCH[2]}; b=${BASH_REMATCH[3]}
    for ((i = 10#$a; i <= 10#$b; i++)); do printf "%s%0${#a}d\n" "${BASH_REMATCH[1]}" "$i"; done
  else
    tr ',' '\n' <<<"$3"
  fi
  exit 0
fi
exit "${FAKE_REQUEUE_RC:-0}"
"""
FAKE_SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG"
if [ -n "${FAKE_DONE:-}" ]; then mkdir -p "$FAKE_DONE" && touch "$FAKE_DONE/DONE"; fi
exit "${FAKE_SRUN_RC:-0}"
"""


@pytest.fixture
def fake(tmp_path):
    """Environment with fake scontrol / srun on PATH, no inherited SLURM_* variables, logs under tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(tmp_path / "calls.log"), PYTHON=sys.executable,
               NPROC="1", LOG_ROOT=str(tmp_path / "logs"), SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="4242",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_NAME="md")
    env.pop("DRY_RUN", None)
    return env


def _run(cmd, env, cwd=None, **extra):
    out = subprocess.run(["bash", *map(str, cmd)], env={**env, **extra}, cwd=cwd, capture_output=True, text=True,
                         timeout=120)
    return out


def _commands(stdout):
    return [shlex.split(ln) for ln in stdout.splitlines() if ln.strip() and not ln.startswith("#")]


def _opt(argv, flag):
    return argv[argv.index(flag) + 1]


def _calls(env):
    p = Path(env["FAKE_LOG"])
    return p.read_text().splitlines() if p.exists() else []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_train_sbatch_dry_run(fake, tmp_path):
    run_dir = tmp_path / "runs" / "t1"
    out = _run([SLURM / "train.sbatch", "configs/tiny/teacher.yaml", f"train.run_dir={run_dir}"], fake, cwd=ROOT,
               DRY_RUN="1")
    assert out.returncode == 0, out.stderr
    srun, *torchruns = _commands(out.stdout)
    assert srun[0] == "srun" and "--nodes=2" in srun and "--ntasks-per-node=1" in srun
    assert "--kill-on-bad-exit=1" in srun and str(SLURM / "node.sh") in srun
    assert any(a.startswith(f"--output={tmp_path}/logs/md-4242/attempt-0/") for a in srun)
    assert srun[-3:] == ["configs/tiny/teacher.yaml", f"train.run_dir={run_dir}", "train.resume=true"]
    assert len(torchruns) == 2
    for rank, argv in enumerate(torchruns):
        assert argv[1:3] == ["-m", "torch.distributed.run"]
        assert _opt(argv, "--nnodes") == "2" and _opt(argv, "--node-rank") == str(rank)
        assert _opt(argv, "--nproc-per-node") == "1"
        assert _opt(argv, "--rdzv-backend") == "c10d" and _opt(argv, "--rdzv-id") == "4242"
        assert _opt(argv, "--rdzv-endpoint") == f"gpu01:{20000 + 4242 % 20000}"  # first host of the allocation
        assert _opt(argv, "--rdzv-conf") == f"is_host={int(rank == 0)}"
        assert argv[-6:] == ["-m", "megadistill.cli", "train", "configs/tiny/teacher.yaml",
                             f"train.run_dir={run_dir}", "train.resume=true"]
    assert f"# run dir {run_dir};" in out.stdout and "scontrol requeue 4242" in out.stdout


def test_train_sbatch_dry_run_skips_finished_run(fake, tmp_path):
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    (run_dir / "DONE").write_text("{}\n")
    out = _run([SLURM / "train.sbatch", "configs/tiny/teacher.yaml", f"train.run_dir={run_dir}"], fake, cwd=ROOT,
               DRY_RUN="1")
    assert out.returncode == 0 and "# skip:" in out.stdout and not _commands(out.stdout)


def test_train_sbatch_reports_config_errors(fake):
    out = _run([SLURM / "train.sbatch", "configs/tiny/teacher.yaml", "train.stepz=1"], fake, cwd=ROOT, DRY_RUN="1")
    assert out.returncode != 0 and "train.stepz" in out.stderr
    # 2 nodes x 3 GPUs: 16 sequences do not split over 6 ranks of 8 (configs/tiny/teacher.yaml)
    out = _run([SLURM / "train.sbatch", "configs/tiny/teacher.yaml"], fake, cwd=ROOT, DRY_RUN="1", NPROC="3")
    assert out.returncode != 0 and "train.global_batch_size=16" in out.stderr and "on 6 processes" in out.stderr
    assert not _commands(out.stdout)


@pytest.mark.parametrize("case,extra,rc,requeued", [
    ("preempted: clean exit, no DONE", {}, 0, True),
    ("finished", {"FAKE_DONE": "RUN"}, 0, False),
    ("crashed", {"FAKE_SRUN_RC": "3"}, 3, False),
    ("requeue refused", {"FAKE_REQUEUE_RC": "1"}, 1, True),
    ("too many requeues", {"SLURM_RESTART_COUNT": "2", "MAX_REQUEUES": "2"}, 1, False),
])
def test_train_sbatch_requeues_unfinished_runs(fake, tmp_path, case, extra, rc, requeued):
    run_dir = tmp_path / "run"
    extra = {k: (str(run_dir) if v == "RUN" else v) for k, v in extra.items()}
    out = _run([SLURM / "train.sbatch", "configs/tiny/teacher.yaml", f"train.run_dir={run_dir}"], fake, cwd=ROOT,
               **extra)
    assert out.returncode == rc, (case, out.stdout, out.stderr)
    calls = _calls(fake)
    srun = [c for c in calls if c.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith("train.resume=true")
    assert ("scontrol requeue 4242" in calls) == requeued, calls
    attempt = extra.get("SLURM_RESTART_COUNT", "0")
    log = (tmp_path / "logs" / "md-4242" / f"attempt-{attempt}" / "batch.log").read_text()
    assert "srun --nodes=2" in log and str(run_dir) in log


def test_train_sbatch_skips_finished_run_without_srun(fake, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "DONE").write_text("{}\n")
    out = _run([SLURM / "train.sbatch", "configs/tiny/teacher.yaml", f"train.run_dir={run_dir}"], fake, cwd=ROOT)
    assert out.returncode == 0 and "nothing to do" in out.stdout
    assert not [c for c in _calls(fake) if c.startswith(("srun", "scontrol requeue"))]


# ---- sweeps -----------------------------------------------------------------------------------------------------

def _write_manifest(root: Path, runs):
    """A manifest in `megadistill sweep`'s format: (name, mode, teacher or None, size, done) per run."""
    sweep = root / "sweep"
    sweep.mkdir(parents=True)
    lines = []
    for name, mode, teacher, size, done in runs:
        over = TINY + [f"train.run_dir={root / 'runs' / name}", f"train.mode={mode}", f"train.run_name={name}",
                       f"data.split={'teacher' if mode == 'supervised' and name.startswith('t') else 'student'}"]
        if teacher:
            over.append(f"distill.teacher={root / 'runs' / teacher}")
        (sweep / f"{name}.yaml").write_text(config.to_yaml(config.load([], over)))
        if done:
            (root / "runs" / name).mkdir(parents=True)
            (root / "runs" / name / "DONE").write_text("{}\n")
        lines.append({"run": name, "config": str(Path("sweep") / f"{name}.yaml"), "mode": mode, "teacher": teacher,
                      "depends_on": [teacher] if teacher else [], "size": size, "params": 1, "tokens": 1,
                      "flops": 1.0})
    (sweep / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return sweep


RUNS = [("tA", "supervised", None, "tiny-1M", False), ("tB", "supervised", None, "tiny-1M", True),
        ("sA1", "distill", "tA", "tiny-0.5M", False), ("sA2", "distill", "tA", "tiny-0.5M", False),
        ("sB1", "distill", "tB", "tiny-0.5M", False), ("sup", "supervised", None, "tiny-0.5M", False),
        ("sA3", "distill", "tA", "tiny-0.5M", True)]


def _arrays(stdout):
    """{run: (sbatch argv, fake job id)} from a dry-run submission."""
    out, argv = {}, None
    for ln in stdout.splitlines():
        if ln.startswith("sbatch "):
            argv = shlex.split(ln)
        elif ln.startswith("# -> job "):
            job, runs = ln[len("# -> job "):].split(" (dry run): ")
            out.update({r: (argv, job) for r in runs.split(",")})
    return out


def test_submit_sweep_dry_run(fake, tmp_path):
    sweep = _write_manifest(tmp_path, RUNS)
    out = _run([SLURM / "submit_sweep.sh", "sweep", "model.attention=eager"], fake, cwd=tmp_path, DRY_RUN="1",
               NODES_MAP="tiny-1M=2", GPUS_PER_NODE="2")
    assert out.returncode == 0, out.stderr
    assert "# skip tB: finished" in out.stdout and "# skip sA3: finished" in out.stdout
    arrays = _arrays(out.stdout)
    assert set(arrays) == {"tA", "sA1", "sA2", "sB1", "sup"}
    t_argv, t_job = arrays["tA"]
    assert "--nodes=2" in t_argv and "--array=0" in t_argv and not any("--dependency" in a for a in t_argv)
    s_argv, s_job = arrays["sA1"]
    assert arrays["sA2"][1] == s_job and "--array=2,3" in s_argv and "--nodes=1" in s_argv
    assert f"--dependency=afterok:{t_job}_0" in s_argv and "--kill-on-invalid-dep=yes" in s_argv
    b_argv, _ = arrays["sB1"]  # tB is finished: no dependency; shares an array with the supervised baseline
    assert arrays["sup"][1] == arrays["sB1"][1] and "--array=4,5" in b_argv
    assert not any("--dependency" in a for a in b_argv)
    for argv, _ in arrays.values():
        assert argv[:2] == ["sbatch", "--parsable"] and "--gpus-per-node=2" in argv
        assert argv[-3:] == [str(SLURM / "sweep.sbatch"), str(sweep), "model.attention=eager"]
        assert f"--export=ALL,MEGADISTILL_ROOT={ROOT}" in argv
    # resubmitting after the teacher finished: its students no longer wait for anything
    (tmp_path / "runs" / "tA").mkdir()
    (tmp_path / "runs" / "tA" / "DONE").write_text("{}\n")
    again = _arrays(_run([SLURM / "submit_sweep.sh", "sweep"], fake, cwd=tmp_path, DRY_RUN="1",
                         NODES_MAP="tiny-1M=2", GPUS_PER_NODE="2").stdout)
    assert set(again) == {"sA1", "sA2", "sB1", "sup"} and len({job for _, job in again.values()}) == 1
    assert "--array=2,3,4,5" in again["sA1"][0] and not any("--dependency" in a for a in again["sA1"][0])


def test_submit_sweep_checks_layouts_before_submitting(fake, tmp_path):
    _write_manifest(tmp_path, RUNS)
    out = _run([SLURM / "submit_sweep.sh", "sweep"], fake, cwd=tmp_path, DRY_RUN="1", GPUS_PER_NODE="3")
    assert out.returncode == 2 and "train.global_batch_size=8" in out.stderr and "on 3 GPUs" in out.stderr
    assert "sbatch" not in out.stdout


def test_sweep_sbatch_task(fake, tmp_path):
    sweep = _write_manifest(tmp_path, RUNS)
    out = _run([SLURM / "sweep.sbatch", sweep, "model.attention=eager"], fake, cwd=tmp_path, DRY_RUN="1",
               SLURM_ARRAY_TASK_ID="2", SLURM_JOB_ID="5000")
    assert out.returncode == 0, out.stderr
    srun, *torchruns = _commands(out.stdout)
    cfg = str(sweep / "sA1.yaml")
    assert srun[-3:] == [cfg, "model.attention=eager", "train.resume=true"] and len(torchruns) == 2
    assert all(a[-3:] == srun[-3:] and _opt(a, "--rdzv-id") == "5000" for a in torchruns)
    assert f"{tmp_path}/logs/sA1-5000/attempt-0" in out.stdout  # per-run, per-job log directory
    skipped = _run([SLURM / "sweep.sbatch", sweep], fake, cwd=tmp_path, DRY_RUN="1", SLURM_ARRAY_TASK_ID="1")
    assert skipped.returncode == 0 and "# skip:" in skipped.stdout and not _commands(skipped.stdout)
    # outside a dry run, a student whose teacher has not finished refuses to start
    early = _run([SLURM / "sweep.sbatch", sweep], fake, cwd=tmp_path, SLURM_ARRAY_TASK_ID="2")
    assert early.returncode == 1 and "needs its teacher" in early.stderr
    assert not [c for c in _calls(fake) if c.startswith("srun")]


def test_submit_sweep_on_a_real_sweep_manifest(fake, tmp_path):
    sweep_mod = pytest.importorskip("megadistill.laws.sweep")
    base = {"model": {"attention": "sdpa"}, "train": {"seq_len": 32, "micro_batch_size": 2, "global_batch_size": 8}}
    spec = {"name": "mini", "run_root": str(tmp_path / "runs"), "base": base,
            "teachers": {"sizes": ["tiny-1M"], "tokens_per_param": 20},
            "students": {"sizes": ["tiny-0.5M"], "tokens_per_param": [5, 10]}}
    lines = sweep_mod.write_sweep(spec, tmp_path / "mini")
    out = _run([SLURM / "submit_sweep.sh", tmp_path / "mini"], fake, cwd=tmp_path, DRY_RUN="1", GPUS_PER_NODE="2")
    assert out.returncode == 0, out.stderr
    arrays = _arrays(out.stdout)
    teacher = next(ln["run"] for ln in lines if ln["mode"] == "supervised")
    students = [ln["run"] for ln in lines if ln["mode"] == "distill"]
    assert len(students) == 2 and set(arrays) == {teacher, *students}
    t_job = arrays[teacher][1]
    t_index = next(i for i, ln in enumerate(lines) if ln["run"] == teacher)
    for s in students:
        assert f"--dependency=afterok:{t_job}_{t_index}" in arrays[s][0]


# ---- signal forwarding ------------------------------------------------------------------------------------------

WORKER = r"""
import os, signal, sys, time
out, delay = sys.argv[1], float(sys.argv[2])
open(os.path.join(out, "started"), "w").write(str(os.getpid()))
time.sleep(delay)  # like a trainer still loading: the signal is ignored (inherited) until the handler is installed
got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(n))
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
open(os.path.join(out, "got"), "w").write(signal.Signals(got[0]).name if got else "none")
sys.exit(0 if got else 1)
"""
LAUNCHER = r"""#!/usr/bin/env bash
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node 1 --node-rank "$NODE_RANK" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-conf is_host=1 --max-restarts 0 \
  "$WORKER" "$@"
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiproc
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_node_sh_hands_signals_to_torchrun_workers(tmp_path, sig):
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "launcher.sh").write_text(LAUNCHER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, WORKER=str(tmp_path / "worker.py"), LAUNCHER=str(tmp_path / "launcher.sh"),
               SLURM_NODEID="0", NNODES="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               FORWARD_INTERVAL="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(["bash", str(SLURM / "node.sh"), str(tmp_path), "1.5"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "started").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.05)
        os.kill(proc.pid, sig)  # only the wrapper: SLURM may signal just the task's process group
        log, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # torchrun ignored the signal and returned its worker's status; the worker got the signal once it listened
    assert proc.returncode == 0, log
    assert (tmp_path / "got").read_text() == sig.name
    assert log.count(f"SIG{sig.name[3:]} -> trainer processes") >= 2, log  # the first one was ignored: re-sent
