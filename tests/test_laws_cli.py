"""End-to-end entry tests of the scaling-law verbs (aggregate, fit, predict, plan, sweep, plot) and their errors."""
import json

import numpy as np
import pytest

from megadistill.cli import main
from megadistill.laws.fit import FitResult
from megadistill.laws.records import append_record, make_record, read_table, write_table
from megadistill.laws.simulate import simulate


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("laws") / "sim.csv"
    rows = simulate(teacher_params=[3e8, 1e9, 3e9, 1e10], student_params=[1e8, 2e8, 4e8, 8e8],
                    student_ratios=(20, 80, 320), seed=4)
    write_table(rows, path)
    return path


def _grid_file(tmp_path):
    # A small distillation grid around sensible values keeps the CLI test fast (the paper grid is tested elsewhere).
    path = tmp_path / "grid.yaml"
    path.write_text("log_A: [5, 10]\nlog_B: [5, 10]\nalpha: [0.5]\nbeta: [0.5]\ngamma: [0.5, 1]\n"
                    "c0: [1, 2]\nc1: [0.5, 1.5]\nf1: [0.5]\nd1: [1.0, 1.5]\n")
    return path


def test_aggregate_verb(tmp_path, capsys):
    for run, losses in (("a", (3.1, 2.9)), ("b", (2.7,))):
        for step, loss in enumerate(losses):
            append_record(tmp_path / run, make_record(run, "supervised", step, 1000 * (step + 1), 5000, 6000, 1e12,
                                                      loss, 512))
    with open(tmp_path / "b" / "eval.jsonl", "a") as fh:
        fh.write("{truncated\n")
    assert main(["aggregate", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr()
    assert "skipped 1 malformed lines" in out.err and "wrote 2 rows" in out.out
    rows = {r["run"]: r for r in read_table(tmp_path / "t.csv")}
    assert rows["a"]["eval_loss"] == 2.9 and rows["b"]["eval_loss"] == 2.7
    assert main(["aggregate", str(tmp_path / "[ab]"), "--all-steps", "-o", str(tmp_path / "all.csv")]) == 0
    assert len(read_table(tmp_path / "all.csv")) == 3


def test_fit_predict_plan_verbs(table, tmp_path, capsys):
    sup, dist = tmp_path / "sup.json", tmp_path / "dist.json"
    assert main(["fit", "--law", "supervised", "--in", str(table), "-o", str(sup), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "in-sample relative error: mean" in out and "E =" in out
    assert FitResult.load(sup).residuals["mean_rel_error"] < 0.01
    assert main(["fit", "--law", "distillation", "--in", str(table), "-o", str(dist), "--supervised-fit", str(sup),
                 "--grid", str(_grid_file(tmp_path)), "--workers", "1", "--fix", "f1=0.09"]) == 0
    fit = FitResult.load(dist)
    assert fit.grid == "custom" and fit.fixed == {"f1": 0.09} and fit.supervised == FitResult.load(sup).coefficients
    capsys.readouterr()
    assert main(["predict", "--fit", str(dist), "--in", str(table)]) == 0
    out = capsys.readouterr().out
    assert "48 rows: mean relative error" in out  # 4 students x 3 ratios x 4 teachers
    mean = float(out.strip().splitlines()[-1].split("mean relative error ")[1].split("%")[0])
    assert mean < 1.0
    assert main(["predict", "--fit", str(sup), "--in", str(table), "-o", str(tmp_path / "p.csv")]) == 0
    pred = read_table(tmp_path / "p.csv")
    assert len(pred) == 4 + 12
    capsys.readouterr()
    assert main(["plan", "--compute", "1e21", "--student-params", "1e9", "--answer"]) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and line.split()[0] in ("distil", "supervise")
    float(line.split()[1])
    assert main(["plan", "--compute", "1e21", "--scenario", "teacher-inference", "--fit", str(dist), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["scenario"] == "teacher-inference" and plan["flops"] == pytest.approx(1e21, rel=1e-5)


def test_sweep_verb(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "configs/sweeps/tiny.yaml", "-o", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    names = [x["run"] for x in lines]
    students = [x for x in lines if x["mode"] == "distill"]
    assert len(students) == 4 and all(x["depends_on"] == [x["teacher"]] for x in students)
    assert all(names.index(x["teacher"]) < names.index(x["run"]) for x in students)  # teachers first
    from megadistill.config import load
    cfg = load([students[0]["config"]])
    assert cfg.train.mode == "distill" and cfg.data.split == "student" and cfg.train.tokens == students[0]["tokens"]
    assert cfg.distill.teacher.endswith(students[0]["teacher"])
    teacher = load([lines[names.index(students[0]["teacher"])]["config"]])
    assert teacher.data.split == "teacher" and teacher.train.mode == "supervised"
    iso = [x for x in lines if "-C1e12-" in x["run"]]
    assert len(iso) == 3 and all(x["flops"] == pytest.approx(1e12, rel=1e-4) for x in iso)
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers: {sizes: [tiny-1M]}\nstudentz: {}\n")
    assert main(["sweep", str(bad), "-o", str(tmp_path / "x")]) == 2
    assert "unknown sweep key(s) ['studentz']" in capsys.readouterr().err


def test_plot_verb(table, tmp_path):
    sup = tmp_path / "sup.json"
    assert main(["fit", "--law", "supervised", "--in", str(table), "-o", str(sup), "--workers", "1"]) == 0
    iso = tmp_path / "iso.csv"
    rows = []
    for c in (1e19, 1e20):
        for n in np.geomspace(5e7, 2e9, 6):
            d = c / (6 * n)
            rows.append({"run": f"{c}-{n}", "mode": "supervised", "params": n, "tokens": d, "flops": c,
                         "eval_loss": 1.22 + (3355 / n ** 0.408 + 18186 / d ** 0.431) ** 0.452})
    write_table(rows, iso)
    cases = [["fit", "--in", str(table), "--fit", str(sup)], ["isoflop", "--in", str(iso), "--fit", str(sup)],
             ["capacity-gap", "--in", str(table)],
             ["allocation", "--scenario", "best-case", "teacher-inference", "--student-params", "1e9", "--points", "3",
              "--compute-range", "1e20", "1e22"],
             ["crossover", "--student-params", "1e9", "3e9", "--points", "4", "--compute-range", "1e20", "1e25"]]
    for args in cases:
        png = tmp_path / f"{args[0]}.png"
        assert main(["plot", *args, "-o", str(png)]) == 0, args
        assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_user_errors_exit_2_without_traceback(table, tmp_path, capsys):
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("params,tokens,loss\n1e8,2e9,3.0\n2e8,4e9,2.8\n4e8,8e9,2.6\n")
    cases = [
        (["fit", "--law", "supervised", "--in", str(tiny), "-o", str(tmp_path / "f.json")],
         "6 free coefficients and needs at least 6 points; got 3"),
        (["fit", "--law", "supervised", "--in", str(tmp_path / "none.csv"), "-o", str(tmp_path / "f.json")],
         "no such file"),
        (["fit", "--law", "supervised", "--in", str(table), "-o", str(tmp_path / "f.json"), "--fix", "gamma"],
         "not NAME=VALUE"),
        (["fit", "--law", "distillation", "--in", str(tiny), "-o", str(tmp_path / "f.json")], "no distillation rows"),
        (["predict", "--fit", str(tmp_path / "none.json"), "--in", str(table)], "no such fit file"),
        (["plan", "--compute", "1e10", "--student-params", "1e9"], "too small"),
        (["plot", "isoflop", "--in", str(tiny), "-o", str(tmp_path / "x.png")], "no compute level"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
