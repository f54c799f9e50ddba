"""The teacher forward runs under torch.inference_mode: its outputs are inference tensors without an autograd graph,
and every loss that reads them (single-pass on logits, in place or not, fp32 or bf16; fused hidden + head weight) gives
the same value and student gradient as with ordinary teacher tensors; ZeRO-3 (partitioned) teacher included."""
import json
from pathlib import Path

import pytest
import torch

from dist_harness import run_distributed
from megadistill import config
from megadistill.model.transformer import Transformer
from megadistill.parallel.fused_loss import fused_linear_distill_loss, logits_distill_loss
from megadistill.train.objective import teacher_outputs
from tiny_runs import tiny_overrides

SHAPE = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.vocab_size=96",
         "model.ff_multiple=32", "train.steps=1", "distill.chunk_tokens=7", "distill.temperature=2.0"]


def _setup(fused: bool, dtype=torch.float32):
    cfg = config.load([], SHAPE + [f"distill.fused={str(fused).lower()}"])
    torch.manual_seed(0)
    student = Transformer(cfg.model)
    teacher = Transformer(cfg.model).to(dtype).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 16), generator=g)
    labels = torch.randint(0, 96, (2, 16), generator=g)
    labels[0, :3] = -100
    return cfg, student, teacher, ids, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [True, False])
def test_logits_loss_reads_inference_teacher_logits(dtype, inplace):
    cfg, student, teacher, ids, labels = _setup(False, dtype)
    out = teacher_outputs(teacher, cfg, ids, None)
    t = out["teacher_logits"]
    assert t.is_inference() and t.grad_fn is None and not t.requires_grad and t.dtype == dtype
    kept = t.clone()  # an inference tensor too: the loss may not overwrite t, and this checks that it did not
    with torch.no_grad():
        ref_t = teacher(ids).clone()  # the former no_grad forward: an ordinary tensor
    assert not ref_t.is_inference()
    torch.testing.assert_close(t, ref_t, rtol=0, atol=0)
    grads, losses = [], []
    for teacher_logits in (t, ref_t):
        student.zero_grad()
        loss, st = logits_distill_loss(student(ids), teacher_logits, labels, kd_weight=0.5, temperature=2.0,
                                       z_loss=1e-4, chunk_tokens=7, inplace=inplace)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in student.parameters()])
        assert float(st["kd"]) > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(t, kept, rtol=0, atol=0)  # the inference tensor was read, never written


def test_fused_loss_reads_inference_teacher_hidden():
    cfg, student, teacher, ids, labels = _setup(True)
    out = teacher_outputs(teacher, cfg, ids, None)
    h_t, w_t = out["teacher_hidden"], out["teacher_weight"]
    assert h_t.is_inference() and h_t.grad_fn is None and not h_t.requires_grad
    assert w_t is teacher.output_weight and not w_t.is_inference()  # the parameter itself (ZeRO-3 gathers it)
    with torch.no_grad():
        ref_h = teacher.hidden_states(ids).clone()
    torch.testing.assert_close(h_t, ref_h, rtol=0, atol=0)
    results = []
    for th in (h_t, ref_h):
        student.zero_grad()
        h = student.hidden_states(ids)
        loss, _ = fused_linear_distill_loss(h.reshape(-1, 32), student.output_weight, th.reshape(-1, 32), w_t,
                                            labels.reshape(-1), kd_weight=0.5, temperature=2.0, chunk_tokens=7)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _zero3_teacher(rank, world, root):
    from megadistill.train.trainer import train
    root = Path(root)
    train(config.load([], tiny_overrides(root / "teacher", "supervised", ["train.steps=4", "zero.stage=1"])))
    curves = {}
    for fused in ("false", "true"):
        for z3 in ("false", "true"):
            name = f"fused{fused}_z3{z3}"
            over = tiny_overrides(root / name, "distill", [
                "train.steps=3", f"distill.teacher={root / 'teacher'}", "zero.stage=1", f"distill.fused={fused}",
                f"distill.teacher_zero3={z3}", "distill.chunk_tokens=24", "train.eval_interval=2",
                "train.eval_tokens=160"])
            train(config.load([], over))
            curves[name] = ([json.loads(x)["loss"] for x in open(root / name / "train.jsonl")],
                            [json.loads(x)["teacher_student_kl"] for x in open(root / name / "eval.jsonl")])
    return curves


@pytest.mark.multiproc
def test_zero3_teacher_under_inference_mode(tmp_path):
    """ZeRO-3's parameter hooks gather the partitioned teacher inside inference_mode (and, fused, its head weight
    outside it): the distillation curve and eval KL equal the replicated teacher's (DP=2, gloo)."""
    curves = run_distributed(_zero3_teacher, 2, str(tmp_path), timeout=600)[0]
    for fused in ("false", "true"):
        rep, z3 = curves[f"fused{fused}_z3false"], curves[f"fused{fused}_z3true"]
        assert len(rep[0]) == 3 and len(rep[1]) >= 1
        torch.testing.assert_close(torch.tensor(z3[0]), torch.tensor(rep[0]), rtol=0, atol=2e-5)
        torch.testing.assert_close(torch.tensor(z3[1]), torch.tensor(rep[1]), rtol=0, atol=2e-5)
