"""Held-out evaluation against a dense reference: CE, teacher CE and teacher-student KL, with ignored labels and
an eval set that does not split evenly over the DP ranks."""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_harness import run_distributed
from megadistill import config
from megadistill.model.transformer import Transformer
from megadistill.train.evaluate import evaluate

SHAPE = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.vocab_size=96",
         "model.ff_multiple=32", "train.steps=1", "distill.chunk_tokens=7"]


def _setup():
    cfg = config.load([], SHAPE)
    torch.manual_seed(0)
    student, teacher = Transformer(cfg.model), Transformer(cfg.model).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):  # 3 batches: DP 2 gives rank 1 a padding forward
        ids = torch.randint(0, 96, (2, 16), generator=g)
        labels = torch.randint(0, 96, (2, 16), generator=g)
        labels[0, :5] = -100
        batches.append({"input_ids": ids, "labels": labels})
    return cfg, student, teacher, batches


def _reference(student, teacher, batches):
    ce = kl = tce = n = 0.0
    with torch.no_grad():
        for b in batches:
            z, zt, y = student(b["input_ids"]).flatten(0, 1), teacher(b["input_ids"]).flatten(0, 1), b["labels"].flatten()
            valid = y != -100
            ce += F.cross_entropy(z, y, reduction="sum").item()
            tce += F.cross_entropy(zt, y, reduction="sum").item()
            kl += F.kl_div(F.log_softmax(z, -1), F.log_softmax(zt, -1), log_target=True,
                           reduction="none").sum(-1)[valid].sum().item()
            n += valid.sum().item()
    return {"eval_loss": ce / n, "teacher_eval_loss": tce / n, "teacher_student_kl": kl / n, "eval_tokens": int(n)}


def _check(got, ref):
    assert got["eval_tokens"] == ref["eval_tokens"]
    for k in ("eval_loss", "teacher_eval_loss", "teacher_student_kl"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5), k


def test_evaluate_matches_dense_reference():
    cfg, student, teacher, batches = _setup()
    groups = SimpleNamespace(dp_size=1, dp_rank=0, tp_group=None, dp_group=None)
    got = evaluate(student, batches, groups, cfg, torch.device("cpu"), teacher=teacher, with_teacher_loss=True)
    _check(got, _reference(student, teacher, batches))
    alone = evaluate(student, batches, groups, cfg, torch.device("cpu"))
    assert set(alone) == {"eval_loss", "eval_tokens"} and alone["eval_loss"] == pytest.approx(got["eval_loss"])
    assert student.training  # evaluate restores the mode it found


def _dp_worker(rank, world):
    torch.set_num_threads(1)
    cfg, student, teacher, batches = _setup()
    groups = SimpleNamespace(dp_size=world, dp_rank=rank, tp_group=None, dp_group=dist.group.WORLD)
    got = evaluate(student, batches, groups, cfg, torch.device("cpu"), teacher=teacher, with_teacher_loss=True)
    return got, _reference(student, teacher, batches)


@pytest.mark.multiproc
def test_evaluate_dp2_counts_each_batch_once():
    for got, ref in run_distributed(_dp_worker, 2):
        _check(got, ref)


def test_partial_last_batch_is_padded_to_one_shape_and_counted_once():
    """eval_tokens not a multiple of micro-batch x seq_len leaves a short last batch: evaluate fills it with ignored
    rows, so compiled blocks see one shape (one graph, no compile for the eval's last batch) and the losses are
    still the dense reference's over the real rows."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    from megadistill.train.compile import compile_blocks

    cfg, student, teacher, batches = _setup()
    batches[-1] = {k: v[:1] for k, v in batches[-1].items()}  # rows 2, 2, 1
    ref = _reference(student, teacher, batches)
    groups = SimpleNamespace(dp_size=1, dp_rank=0, tp_group=None, dp_group=None)
    dynamo.reset()
    counters.clear()
    compile_blocks(student, backend="eager")
    compile_blocks(teacher, backend="eager")
    got = evaluate(student, batches, groups, cfg, torch.device("cpu"), teacher=teacher, with_teacher_loss=True)
    _check(got, ref)
    assert counters["stats"]["unique_graphs"] == 2  # one block graph each for student and teacher, not 4
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]  # the caller's batches are left as they were
    dynamo.reset()
