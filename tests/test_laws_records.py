"""Eval-record schema v1: build / validate / append / read, bad-input handling, aggregation into loss tables."""
import json
import logging
import math

import pytest

from megadistill.errors import UserError
from megadistill.laws.flops import training_flops
from megadistill.laws.records import (aggregate, append_record, make_record, read_records, read_table,
                                      validate_record, write_table)


def _rec(run="r1", step=10, loss=3.0, mode="supervised", teacher=None, tokens=1000, params=5000):
    return make_record(run=run, mode=mode, step=step, tokens=tokens, params=params, params_total=6000,
                       flops=training_flops(params, tokens), eval_loss=loss, eval_tokens=256, teacher=teacher,
                       config={"model": {"size": "tiny-1M"}}, time="2025-01-01T00:00:00+00:00")


def test_make_record_schema_and_validation():
    rec = _rec()
    assert rec["version"] == 1 and rec["split"] == "student_val" and rec["teacher"] is None
    assert validate_record(rec) == []
    assert json.loads(json.dumps(rec)) == rec
    bad = dict(rec, step=-1, mode="kd")
    del bad["params"]
    problems = validate_record(bad)
    assert any("'step'" in p for p in problems) and any("'mode'" in p for p in problems)
    assert any("missing field 'params'" in p for p in problems)
    with pytest.raises(UserError, match="teacher"):
        _rec(mode="distill")  # a distill record needs its teacher block
    t = {"run": "t", "params": 9000, "tokens": 20, "eval_loss": 2.5}
    assert validate_record(_rec(mode="distill", teacher=t)) == []
    assert any("teacher.eval_loss" in p for p in validate_record(dict(rec, mode="distill", teacher={"run": "t",
                                                                       "params": 1, "tokens": 2})))
    # Non-strict validation (the reader's) only needs what aggregation uses.
    slim = {k: rec[k] for k in ("run", "mode", "step", "tokens", "params", "eval_loss")}
    assert validate_record(slim, strict=False) == [] and validate_record(slim)


def test_append_and_read_back(tmp_path):
    for step, loss in ((10, 3.0), (20, 2.5)):
        append_record(tmp_path / "run", _rec(step=step, loss=loss))
    recs, n_bad = read_records(tmp_path / "run" / "eval.jsonl")
    assert n_bad == 0 and [r["eval_loss"] for r in recs] == [3.0, 2.5]
    with pytest.raises(UserError, match="step"):
        append_record(tmp_path / "run", dict(_rec(), step="x"))


def test_bad_lines_are_counted_named_and_skipped(tmp_path, caplog):
    path = tmp_path / "eval.jsonl"
    good = _rec(step=5, loss=2.0)
    missing = dict(good)
    del missing["eval_loss"]
    nan = dict(good, step=6, eval_loss=float("nan"))
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps(missing), json.dumps(nan),
                               "[1, 2]", ""]) + "\n")
    with caplog.at_level(logging.WARNING, logger="megadistill.laws.records"):
        stats = {}
        recs, n_bad = read_records(path, stats)
    assert [r["step"] for r in recs] == [5]
    assert n_bad == 4 and stats["n_bad"] == 3 and stats["n_nonfinite"] == 1
    text = caplog.text
    assert f"{path}:2: malformed JSON" in text
    assert f"{path}:3: record skipped: missing field 'eval_loss'" in text
    assert f"{path}:4: non-finite loss" in text
    # An unreadable file counts as bad, it does not raise.
    assert read_records(tmp_path / "nope.jsonl") == ([], 1)


def test_aggregate_last_step_all_steps_and_teacher(tmp_path):
    t = {"run": "teach", "params": 9000, "tokens": 180000, "eval_loss": 2.2}
    for step, loss in ((10, 3.0), (30, 2.6), (20, 2.8)):
        append_record(tmp_path / "a", _rec(run="a", step=step, loss=loss))
    append_record(tmp_path / "b", _rec(run="b", step=7, loss=2.4, mode="distill", teacher=t))
    rows = aggregate([str(tmp_path / "a"), str(tmp_path / "b" / "eval.jsonl")])
    by = {r["run"]: r for r in rows}
    assert by["a"]["step"] == 30 and by["a"]["eval_loss"] == 2.6
    assert by["b"]["teacher_loss"] == 2.2 and by["b"]["teacher_params"] == 9000 and by["b"]["mode"] == "distill"
    assert len(aggregate([str(tmp_path / "*")], all_steps=True)) == 4
    assert len(aggregate([str(tmp_path)])) == 2  # a directory of run dirs: every eval.jsonl below
    with pytest.raises(UserError, match="no such file"):
        aggregate([str(tmp_path / "missing")])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "eval.jsonl").write_text("garbage\n")
    with pytest.raises(UserError, match="no usable eval records"):
        aggregate([str(tmp_path / "c")])


def test_tables_roundtrip_and_short_csv(tmp_path):
    rows = [{"run": "x", "mode": "supervised", "step": 3, "params": 1e6, "tokens": 2e7, "flops": 1.5e14,
             "eval_loss": 3.25, "teacher_run": None, "teacher_params": None, "teacher_tokens": None,
             "teacher_loss": None}]
    write_table(rows, tmp_path / "t.csv")
    back = read_table(tmp_path / "t.csv")
    assert back[0]["eval_loss"] == 3.25 and back[0]["teacher_loss"] is None and back[0]["step"] == 3
    short = tmp_path / "short.csv"
    short.write_text("params,tokens,loss,teacher_loss\n1e8,2e9,3.1,\n1e8,2e9,2.9,2.5\n2e8,4e9,inf,\n")
    got = read_table(short)
    assert [r["mode"] for r in got] == ["supervised", "distill"]  # the inf row is dropped
    assert math.isclose(got[0]["flops"], training_flops(1e8, 2e9))
    (tmp_path / "bad.csv").write_text("params,tokens,loss\n1e8,abc,3\n")
    with pytest.raises(UserError, match=r"bad.csv:2: column 'tokens'"):
        read_table(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("n,d,l\n1,2,3\n")
    with pytest.raises(UserError, match="lacks column"):
        read_table(tmp_path / "cols.csv")


def test_requeued_duplicates_and_mixed_versions(tmp_path, caplog):
    """A requeued job re-evaluates steps (same run, same step twice): counted once, the latest line wins, with a
    warning; a record of another schema version is skipped and counted, the good ones kept."""
    for step, loss in ((10, 3.0), (20, 2.8), (20, 2.7), (30, 2.6), (30, 2.5)):
        append_record(tmp_path / "a", _rec(run="a", step=step, loss=loss))
    with open(tmp_path / "a" / "eval.jsonl", "a") as fh:
        fh.write(json.dumps(dict(_rec(run="a", step=40, loss=1.0), version=2)) + "\n")
    stats = {}
    with caplog.at_level(logging.WARNING, logger="megadistill.laws.records"):
        rows = aggregate([str(tmp_path / "a")], all_steps=True, stats=stats)
    assert sorted((r["step"], r["eval_loss"]) for r in rows) == [(10, 3.0), (20, 2.7), (30, 2.5)]
    assert stats["n_duplicate"] == 2 and stats["n_bad"] == 1
    assert "2 records repeat a (run, step)" in caplog.text
    last = aggregate([str(tmp_path / "a")])
    assert [(r["step"], r["eval_loss"]) for r in last] == [(30, 2.5)]


def test_a_copied_run_dir_counts_once(tmp_path, caplog):
    """A run dir copied under the aggregated tree (a backup) holds identical records: counted once, with a warning;
    two runs that merely share a name (other losses / times) both count."""
    import shutil
    for step, loss in ((10, 3.0), (20, 2.8)):
        append_record(tmp_path / "sweep" / "a", _rec(run="a", step=step, loss=loss))
    shutil.copytree(tmp_path / "sweep" / "a", tmp_path / "sweep" / "backup" / "a")
    append_record(tmp_path / "other" / "a", dict(_rec(run="a", step=20, loss=2.9), time="2026-12-04T00:00:00"))
    stats = {}
    with caplog.at_level(logging.WARNING, logger="megadistill.laws.records"):
        rows = aggregate([str(tmp_path / "sweep"), str(tmp_path / "other")], all_steps=True, stats=stats)
    assert sorted((r["step"], r["eval_loss"]) for r in rows) == [(10, 3.0), (20, 2.8), (20, 2.9)]
    assert stats["n_copied"] == 2 and "2 records are identical to records of" in caplog.text
