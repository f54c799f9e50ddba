"""`megadistill demo --quick` end to end: every stage writes its outputs, the report names its figures, fits are finite."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "study"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "megadistill.cli", "demo", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_every_stage_wrote_its_outputs(demo):
    out, proc = demo
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["S-d16-from-T-d24", "S-d16-from-T-d32", "S-d16-supervised", "T-d24", "T-d32"]
    for r in runs:
        for f in ("DONE", "eval.jsonl", "train.jsonl", "config.yaml"):
            assert (out / "runs" / r / f).is_file(), (r, f)
    for f in ("table.csv", "fit_supervised.json", "fit_distillation.json", "summary.json", "REPORT.md"):
        assert (out / f).is_file(), f
    assert "report:" in proc.stdout and "fitted E" in proc.stdout


def test_report_names_existing_figures(demo):
    out, _ = demo
    report = (out / "REPORT.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert len(figures) >= 4
    for f in figures:
        assert (out / f).stat().st_size > 5000, f
    assert "entropy rate" in report and "held-out" in report and "Planner" in report


def test_fits_are_finite(demo):
    out, _ = demo
    s = json.loads((out / "summary.json").read_text())
    for law in ("supervised", "distillation"):
        assert all(math.isfinite(v) for v in s[law]["coefficients"].values()), law
        assert math.isfinite(s[f"{law}_in_sample"]["mean_rel_error"])
        assert math.isfinite(s[f"{law}_held_out"]["mean_rel_error"])
    assert abs(s["entropy_rate"] - 2.2597) < 1e-3  # the language's exact rate (order 1, V=256, b=16, Zipf 1.1)
    assert s["plans"] and all(p["answer"] in ("distil", "supervise") for p in s["plans"])


def test_rerun_skips_finished_runs(demo):
    out, _ = demo
    before = {p: p.stat().st_mtime for p in (out / "runs").glob("*/train.jsonl")}
    proc = subprocess.run([sys.executable, "-m", "megadistill.cli", "demo", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in before} == before
