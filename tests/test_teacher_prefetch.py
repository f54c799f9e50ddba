"""distill.teacher_prefetch: teacher(i+1) issued before student backward(i), the same numbers as without prefetch.

One 1-process gloo worker runs everything (shared runs across the assertions): a tiny teacher, distillation with
prefetch on / off (4 micro-batches per step, evals and checkpoints between steps), both again with packed documents
masked (data.document_mask), a stop + resume with prefetch on,
the cached teacher with its reader thread on / off, and the call order of the real teacher forward and student
backward inside train_step, recorded by hooks on the modules of a built run.
"""
import json
from pathlib import Path

import pytest
import torch

from dist_harness import run_distributed
from tiny_runs import tiny_overrides

pytestmark = pytest.mark.multiproc

STEPS = 4
GAS = 4  # tiny_overrides: global batch 8 = micro-batch 2 x 4 accumulation steps on one process


def _cfg(overrides):
    from megadistill import config
    return config.load([], overrides)


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def _weights(run_dir):
    from safetensors.torch import load_file
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


def _order(cfg):
    """Events of 2 train_steps of a built run: T = teacher forward, F = student forward, B = student backward (the
    student head's gradient is being formed: the first parameter gradient of its backward)."""
    from megadistill.parallel.init import init_distributed
    from megadistill.train.trainer import build, release, train_step
    live = build(cfg, init_distributed("gloo"))
    events = []
    live.teacher.module.register_forward_pre_hook(lambda m, a: events.append("T"))
    live.student.register_forward_pre_hook(lambda m, a: events.append("F"))
    live.student.head.weight.register_hook(lambda g: events.append("B"))
    live.engine.train()
    train_step(live)  # prefetches the next step's first micro-batch
    train_step(live, prefetch_next_step=False)  # a run's last step
    release(live)
    return "".join(events)


def _worker(rank, world, root):
    from megadistill.train import teacher_cache as tc
    from megadistill.train.trainer import train
    root = Path(root)
    teacher = root / "teacher"
    train(_cfg(tiny_overrides(teacher, "supervised", ["train.steps=3", "train.eval_tokens=256"])))

    def student(name, extra=()):
        return tiny_overrides(root / name, "distill", [f"train.steps={STEPS}", "train.eval_tokens=256",
                                                       "train.eval_interval=2", "train.checkpoint_interval=2",
                                                       f"distill.teacher={teacher}"] + list(extra))

    out = {}
    train(_cfg(student("on")))
    train(_cfg(student("off", ["distill.teacher_prefetch=false"])))
    # packed documents of 12 tokens masked: the ids stay on the host, each forward builds its mask from them
    docs = ["data.document_mask=true", "data.synthetic_doc_len=12"]
    train(_cfg(student("docs_on", docs)))
    train(_cfg(student("docs_off", docs + ["distill.teacher_prefetch=false"])))
    train(_cfg(student("docs_unmasked", ["data.synthetic_doc_len=12"])))
    # stop after step 1 (a checkpoint taken while step 2's first micro-batch is prefetched), resume with prefetch on
    train(_cfg(student("resumed", ["train.stop_after_steps=1"])))
    train(_cfg(student("resumed", ["train.resume=true"])))
    # the cached teacher: shards read ahead on a thread (on) vs inline (off)
    tc.write_cache(_cfg(student("w")), str(teacher), str(root / "cache"), top_k=8, shard_windows=16)
    cache = [f"distill.teacher=cache:{root / 'cache'}", "distill.top_k=8"]
    train(_cfg(student("cache_on", cache)))
    train(_cfg(student("cache_off", cache + ["distill.teacher_prefetch=false"])))
    for name in ("on", "off", "docs_on", "docs_off", "docs_unmasked", "resumed", "cache_on", "cache_off"):
        out[name] = {"train": _jsonl(root / name / "train.jsonl"), "eval": _jsonl(root / name / "eval.jsonl"),
                     "weights": _weights(root / name)}
    out["order_on"] = _order(_cfg(student("order_on")))
    out["order_off"] = _order(_cfg(student("order_off", ["distill.teacher_prefetch=false"])))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_worker, 1, str(tmp_path_factory.mktemp("prefetch")), timeout=600)[0]


def _same_numbers(a, b):
    """train.jsonl loss terms, lr and grad norm bit-identical; eval losses identical; final weights bit-identical."""
    keys = ("step", "tokens", "loss", "ntp", "kd", "z", "lr", "grad_norm")
    assert len(a["train"]) == len(b["train"]) == STEPS
    for ra, rb in zip(a["train"], b["train"]):
        assert "kd" in ra and {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, (ra, rb)
    assert [r["eval_loss"] for r in a["eval"]] == [r["eval_loss"] for r in b["eval"]]
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k


def test_prefetch_on_off_bit_identical(runs):
    _same_numbers(runs["on"], runs["off"])
    assert len(runs["on"]["eval"]) == 2  # the mid-run eval (step 2, a prefetch pending) and the final one
    assert runs["on"]["train"][-1]["loss"] < runs["on"]["train"][0]["loss"]


def test_document_masked_distillation_prefetch_on_off_bit_identical(runs):
    _same_numbers(runs["docs_on"], runs["docs_off"])
    # the masks reached the models: other numbers than the same data's unmasked run from the first step on
    assert runs["docs_on"]["train"][0]["loss"] != runs["docs_unmasked"]["train"][0]["loss"]


def test_resume_with_prefetch_exact(runs):
    _same_numbers(runs["resumed"], runs["on"])


def test_cached_teacher_read_ahead_bit_identical(runs):
    _same_numbers(runs["cache_on"], runs["cache_off"])


def test_teacher_next_issued_before_student_backward(runs):
    on, off = runs["order_on"], runs["order_off"]
    assert off == "TFB" * (2 * GAS)  # the old order: each teacher forward right before its student forward
    # prefetch: teacher(0) first; then per micro-batch forward(i), teacher(i+1), backward(i); across the step boundary
    # too; nothing prefetched after the last step's last micro-batch
    assert on == "T" + "FTB" * (2 * GAS - 1) + "FB"
    for i in range(2 * GAS - 1):  # the same, by position: teacher forward i+1 comes before student backward i
        assert [j for j, e in enumerate(on) if e == "T"][i + 1] < [j for j, e in enumerate(on) if e == "B"][i]


def test_config_key_validated():
    from megadistill.config import ConfigError, load
    from megadistill.errors import UserError
    base = ["train.mode=distill", "distill.teacher=x", "train.steps=1"]
    assert load([], base).distill.teacher_prefetch is True
    assert load([], base + ["distill.teacher_prefetch=false"]).distill.teacher_prefetch is False
    with pytest.raises((ConfigError, UserError), match="teacher_prefetch"):
        load([], base + ["distill.teacher_prefetch=maybe"])
    cfg = load([], base)
    cfg.distill.teacher_prefetch = "yes"  # set in code past omegaconf's type check
    with pytest.raises(ConfigError, match=r"distill\.teacher_prefetch='yes' must be true or false"):
        cfg.validate()


def test_labels_checked_on_the_host_before_the_teacher_runs(tmp_path):
    """A label outside the vocabulary is a named error when the micro-batch is made, on the host, before its copies
    and the teacher forward (on a GPU the loss's own check is asynchronous: vocab_parallel.check_targets)."""
    from megadistill import config
    from megadistill.errors import UserError
    from megadistill.train.teacher_prefetch import TeacherFeed
    cfg = config.load([], tiny_overrides(tmp_path, "distill", ["distill.teacher=x", "train.steps=1"]))
    v = cfg.model.vocab_size
    batches = iter([{"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.full((2, 8), v)}])

    class Loader:
        def __next__(self):
            return next(batches)

        def state_dict(self):
            return {}

    class Teacher:  # not reached: the labels are checked first
        module = engine = None

    with pytest.raises(UserError, match=rf"targets must lie in \[0, {v}\).*found {v}: check the tokenizer"):
        TeacherFeed(Loader(), cfg, torch.device("cpu"), Teacher(), prefetch=False).next()


@pytest.mark.gpu
def test_teacher_forward_on_its_own_stream_gpu(tmp_path):
    """CUDA events: while the student's stream is held busy, the prefetched teacher forward completes on the side
    stream (it does not wait on it); the student's stream then waits on the event and reads the same logits."""
    from megadistill import config
    from megadistill.data import build_train_loader
    from megadistill.model.transformer import Transformer
    from megadistill.train.objective import teacher_outputs
    from megadistill.train.teacher import Teacher
    from megadistill.train.teacher_prefetch import TeacherFeed
    cfg = config.load([], tiny_overrides(tmp_path, "distill", ["distill.teacher=x", "train.steps=1"]))
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(dev).eval().requires_grad_(False)
    teacher = Teacher(module=model, engine=None, model_cfg=cfg.model, run="t", params=0, tokens=0, eval_loss=None,
                      weights_dir=tmp_path)
    t = cfg.train
    loader = build_train_loader(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=t.seq_len,
                                micro_batch_size=t.micro_batch_size, dp_rank=0, dp_size=1, seed=t.seed)
    feed = TeacherFeed(loader, cfg, dev, teacher, prefetch=True)
    main = torch.cuda.current_stream(dev)
    assert feed.stream is not None and feed.stream != main
    feed.next().wait()  # the first issue waits once for the student's stream (weights); later ones never do
    torch.cuda.synchronize()
    for _ in range(3):
        torch.cuda._sleep(1_000_000_000)  # ~0.5-1 s of work queued on the student's stream
        busy = torch.cuda.Event()
        busy.record(main)
        feed.issue()
        ready = feed._pending.ready
        ready.synchronize()  # the teacher's copies and forward are done ...
        assert not busy.query()  # ... while the student's stream is still busy: they did not serialize behind it
        mb = feed.next()
        mb.wait()
        assert mb.ready is None
        ref = teacher_outputs(model, cfg, mb.ids, None)["teacher_logits"]  # on the student's stream, after the wait
        torch.testing.assert_close(mb.extra["teacher_logits"], ref, rtol=0, atol=0)
        torch.cuda.synchronize()
    feed.close()
