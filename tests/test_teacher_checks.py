"""Reliability catalogue, teacher problems (docs/RELIABILITY.md): a missing teacher dir, a teacher trained on the
student's documents (the split hashes overlap), a teacher that did not finish: named errors or stated warnings, all
before any compute. (Teacher vocab != student vocab: tests/test_configs.py::test_teacher_student_vocab_mismatch.)"""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megadistill import config
from megadistill.errors import UserError
from megadistill.train.teacher_checks import check_teacher, split_overlap
from tiny_runs import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _teacher(out_dir: Path, extra=(), run_dir: bool = False, done: bool = True, step=None) -> Path:
    """Real (untrained) teacher weights + config as `megadistill export` / a finished run writes them."""
    from megadistill.model.transformer import Transformer
    from megadistill.parallel.groups import ParallelGroups
    from megadistill.train import checkpoint
    tcfg = config.load([], tiny_overrides(out_dir, "supervised", ["train.steps=10", *extra]))
    torch.manual_seed(0)
    model = Transformer(tcfg.model, ParallelGroups.single().factory(device=torch.device("cpu")))
    weights = out_dir / "model" if run_dir else out_dir
    checkpoint.write_weights({k: v.detach().clone() for k, v in model.state_dict().items()}, weights,
                             config.to_yaml(tcfg))
    (weights / "meta.json").write_text(json.dumps({"run": out_dir.name, "tokens": 2560, "step": step or 10}))
    if run_dir:
        (out_dir / "config.yaml").write_text(config.to_yaml(tcfg))
        if done:
            (out_dir / "DONE").write_text("{}\n")
    return out_dir


def _student(teacher, extra=()):
    return config.load([], tiny_overrides(teacher.parent / "student", "distill",
                                          ["train.steps=2", f"distill.teacher={teacher}", *extra]))


def test_missing_teacher_dir_is_named(tmp_path):
    for ref in (tmp_path / "nope", f"hf:{tmp_path / 'nope_hf'}"):
        with pytest.raises(UserError, match=r"distill.teacher=.*nope.*: no such directory"):
            check_teacher(config.load([], tiny_overrides(
                tmp_path / "s", "distill", ["train.steps=2", f"distill.teacher={ref}"])))


def test_teacher_on_the_student_split_is_a_data_leak(tmp_path, caplog):
    ok = _teacher(tmp_path / "ok")  # the teacher split, the student's hash_seed and fractions: disjoint
    check_teacher(_student(ok))
    same_split = _teacher(tmp_path / "on_student", ["data.split=student"])
    with pytest.raises(UserError) as e:
        check_teacher(_student(same_split))
    msg = str(e.value)
    assert msg.startswith("data leak: teacher") and "data.split='student'" in msg, msg
    assert "its training documents (48% of the corpus)" in msg and "held-out eval" not in msg, msg
    assert "distill.allow_data_overlap=true" in msg
    # another salt re-deals every document: about half the teacher's half lands in the student's splits
    salted = _teacher(tmp_path / "salted", ["data.hash_seed=7"])
    msg = str(pytest.raises(UserError, check_teacher, _student(salted)).value)
    assert "training documents (24% of the corpus) and its held-out eval documents (1% of the corpus)" in msg, msg
    # a student on the teacher's own split
    msg = str(pytest.raises(UserError, check_teacher, _student(ok, ["data.split=teacher"])).value)
    assert "its training documents (50% of the corpus)" in msg, msg
    # another corpus (another synthetic language): no shared documents, nothing to report
    other = _teacher(tmp_path / "other_lang", ["data.split=student", "data.synthetic_seed=99"])
    assert split_overlap(config.load([], tiny_overrides(other, "supervised", ["train.steps=2", "data.split=student",
                                                                          "data.synthetic_seed=99"])),
                         _student(other)) == []
    check_teacher(_student(other))
    # accepted on request, stated as a warning
    caplog.set_level(logging.WARNING, logger="megadistill.train.teacher_checks")
    check_teacher(_student(same_split, ["distill.allow_data_overlap=true"]))
    assert "data leak: teacher" in caplog.text and "accepted: distill.allow_data_overlap=true" in caplog.text


def test_unfinished_teacher_is_stated(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="megadistill.train.teacher_checks")
    check_teacher(_student(_teacher(tmp_path / "done", run_dir=True)))
    check_teacher(_student(_teacher(tmp_path / "export_final")))
    assert caplog.text == ""
    check_teacher(_student(_teacher(tmp_path / "running", run_dir=True, done=False)))
    assert "is not a finished run: its run dir" in caplog.text and "has no DONE marker" in caplog.text
    caplog.clear()
    check_teacher(_student(_teacher(tmp_path / "export_mid", step=3)))
    assert "it was exported at step 3 of its 10 (mid-training)" in caplog.text


def test_leaking_teacher_stops_train_before_any_compute(tmp_path):
    teacher = _teacher(tmp_path / "leaky", ["data.split=student"], run_dir=True)
    student = tmp_path / "student"
    proc = subprocess.run([sys.executable, "-m", "megadistill.cli", "train", *tiny_overrides(
        student, "distill", ["train.steps=2", f"distill.teacher={teacher}"])], cwd=ROOT, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 2 and "data leak: teacher" in proc.stderr, proc.stderr[-3000:]
    assert not (student / "train.jsonl").exists() and not (student / "checkpoints").exists()
