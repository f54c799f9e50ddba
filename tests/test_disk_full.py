"""Disk full while writing eval.jsonl / train.jsonl / an atomic file: a named error, no half-written line, the old
contents intact. The fault is real: the writes run in a child process under RLIMIT_FSIZE, so the kernel refuses
the bytes past the limit (EFBIG), as it refuses them on a full disk (ENOSPC)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    from megadistill.errors import UserError
    from megadistill.fileio import append_line, atomic_write_bytes
    from megadistill.laws.records import append_record
    run = Path(sys.argv[1]); rec = json.loads(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG from write() instead of being killed
    limit = max(p.stat().st_size for p in run.iterdir()) + 40  # room for 40 more bytes in any file
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    out = {}
    for name, fn in (("eval", lambda: append_record(run, rec)),
                     ("train", lambda: append_line(run / "train.jsonl", json.dumps({"pad": "x" * 2000}))),
                     ("atomic", lambda: atomic_write_bytes(run / "config.yaml", b"y" * 5000))):
        try:
            fn()
            out[name] = "written"
        except UserError as e:
            out[name] = str(e)
    print(json.dumps(out))
""")


def _record(step):
    return {"version": 1, "run": "r", "mode": "supervised", "step": step, "tokens": 1000 * step, "params": 10,
            "params_total": 20, "flops": 1e9 * step, "eval_loss": 2.5, "eval_tokens": 64, "split": "student_val",
            "teacher": None, "config": {"pad": "z" * 300}, "time": "2026-12-03T00:00:00"}


def test_full_disk_leaves_no_partial_line(tmp_path):
    from megadistill.laws.records import append_record, read_records
    run = tmp_path / "run"
    append_record(run, _record(1))
    (run / "train.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    (run / "config.yaml").write_text("model: {}\n")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(run), json.dumps(_record(2))], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("eval", "train", "atomic"):
        assert out[name].startswith("could not write") and "disk full" in out[name], out
    # nothing half-written: every file is byte-for-byte what it was, no temp file left behind
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    good, bad = read_records(run / "eval.jsonl")
    assert [r["step"] for r in good] == [1] and bad == 0
    # and the next append after space is back lands as a whole line
    append_record(run, _record(2))
    assert [r["step"] for r in read_records(run / "eval.jsonl")[0]] == [1, 2]
