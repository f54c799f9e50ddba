"""Offline teacher caches: top-k extraction and the cached KD loss vs dense references (TP 1, 2), and end to end:
cache writing (TP / DP layouts, kill + resume, corrupt shards), training from a cache vs the online teacher."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from dist_harness import run_distributed
from test_vocab_parallel import _count_elements
from tiny_runs import tiny_overrides
from megadistill.errors import UserError
from megadistill.parallel import cached_loss as cl
from megadistill.parallel import vocab_parallel as vp

V = 64
N = 12  # tokens


def _inputs(seed, vocab=V):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(N, vocab, generator=g) * 2.0
    zt = torch.randn(N, vocab, generator=g) * 3.0
    return zs, zt


def ref_bucket_kl(zs, zt, k):
    """Dense (k + 1)-bucket KL: teacher top-k tokens plus one bucket for the rest, vs the student's same buckets."""
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    idx = zt.topk(k, dim=-1).indices
    top = torch.zeros_like(zt, dtype=torch.bool).scatter(-1, idx, True)
    p, q = lp.exp(), lq.exp()
    kl = torch.where(top, p * (lp - lq), 0.0).sum(-1)
    pt, qt = torch.where(top, 0.0, p).sum(-1), torch.where(top, 0.0, q).sum(-1)
    return kl + torch.where(pt > 0, pt * (pt.log() - qt.log()), 0.0)


def check_cached_loss(group, rank, world, seed=0, vocab=V):
    """Values and grads on this rank's shard vs dense references; returns the cases checked."""
    zs, zt = _inputs(seed, vocab)
    v_local = vocab // world
    cols = slice(rank * v_local, (rank + 1) * v_local)
    done = []
    for k, top_k in [(vocab, None), (5, None), (min(v_local + 3, vocab - 1), None), (16, 16), (16, 4), (1, None)]:
        ids, lp, tail = cl.top_k_logprobs(zt[:, cols], k, group)
        ref_lp = torch.log_softmax(zt, -1)
        assert_close(ids, zt.topk(k, dim=-1).indices)
        assert_close(lp, ref_lp.gather(-1, ids))
        ref_tail = torch.logsumexp(ref_lp.scatter(-1, ids, -math.inf), dim=-1)  # -inf when k == V
        assert_close(tail, ref_tail, atol=1e-5, rtol=1e-4)
        s_full = zs.clone().requires_grad_(True)
        s_local = zs[:, cols].clone().requires_grad_(True)
        w = torch.rand(N, generator=torch.Generator().manual_seed(seed + k)) + 0.5
        out = cl.cached_kl_div(s_local, ids, lp, tail, group, top_k=top_k)
        if top_k is not None:  # the online distill.top_k loss
            ref = vp.vocab_parallel_kl_div(s_full, zt, top_k=top_k)
        elif k == vocab:  # the full KL
            ref = vp.vocab_parallel_kl_div(s_full, zt)
        else:
            ref = ref_bucket_kl(s_full, zt, k)
        (out * w).sum().backward()
        (ref * w).sum().backward()
        assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert_close(s_local.grad, s_full.grad[:, cols], atol=1e-6, rtol=1e-5)
        done.append((k, top_k))
    return done


def test_cached_loss_tp1():
    assert len(check_cached_loss(None, 0, 1)) == 6
    zs, zt = _inputs(1)
    ids, lp, tail = cl.top_k_logprobs(zt, 8)
    assert (cl.cached_kl_div(zt, ids, lp, tail) .abs() < 1e-5).all()  # student == teacher: 0
    with pytest.raises(UserError, match="exceeds the cache"):
        cl.cached_kl_div(zs, ids, lp, tail, top_k=9)
    with pytest.raises(UserError, match="top-k"):
        cl.top_k_logprobs(zt, V + 1)
    with pytest.raises(UserError, match="temperature"):
        cl.check_cached_options(2.0, None, False)


def _traffic(vocab, group, rank, world, k):
    zs, zt = _inputs(3, vocab)
    v_local = vocab // world
    cols = slice(rank * v_local, (rank + 1) * v_local)
    s = zs[:, cols].clone().requires_grad_(True)

    def run():
        ids, lp, tail = cl.top_k_logprobs(zt[:, cols], k, group)
        cl.cached_kl_div(s, ids, lp, tail, group).sum().backward()
    return _count_elements(run)


def _tp_loss_worker(rank, world):
    group = dist.group.WORLD
    done = check_cached_loss(group, rank, world)
    # no vocab gather: what moves is per-token numbers ([n], [n, k], [n, tp k']), the same for V and 8 V
    moved = [_traffic(v, group, rank, world, k=6) for v in (V, 8 * V)]
    assert moved[0] == moved[1] <= N * (4 + 6 + 2 * 6 * world + 3), moved
    return done, moved


@pytest.mark.multiproc
def test_cached_loss_tp2():
    (done, moved), _ = run_distributed(_tp_loss_worker, 2)
    assert len(done) == 6 and moved[0] > 0


# ------------------------------------------------------------------------------------------------ end to end

def _cfg(overrides):
    from megadistill import config
    return config.load([], overrides)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(Path(run_dir) / "train.jsonl")]


def _e2e_worker(rank, world, root):
    from megadistill.train import teacher_cache as tc
    from megadistill.train.trainer import train
    root = Path(root)
    out = {}
    teacher = root / "teacher"
    train(_cfg(tiny_overrides(teacher, "supervised", ["train.steps=8", "zero.stage=1"])))

    def student(name, extra):
        return tiny_overrides(root / name, "distill", ["train.steps=4", "zero.stage=1", "train.eval_tokens=256"]
                              + list(extra))

    def wcfg(extra):
        return _cfg(student("s", [f"distill.teacher={teacher}"] + extra))

    # caches: k = V written at TP=2, bf16 off; k = 8 written at DP=2 (2 shards of 16 windows cover 4 x 8 windows)
    full = tc.write_cache(wcfg(["parallel.tp_size=2"]), str(teacher), str(root / "cache_full"),
                          top_k=128, shard_windows=16)
    small = tc.write_cache(wcfg([]), str(teacher), str(root / "cache_k8"), top_k=8, shard_windows=16)
    out["manifests"] = (full["complete"], small["complete"], full["tokens"], small["k"])

    # k = V: the cached student's curve equals the online student's; k = 8 with distill.top_k=8 equals online top-k
    runs = {"online": [f"distill.teacher={teacher}"],
            "cached": [f"distill.teacher=cache:{root / 'cache_full'}"],
            "online_k8": [f"distill.teacher={teacher}", "distill.top_k=8"],
            "cached_k8": [f"distill.teacher=cache:{root / 'cache_k8'}", "distill.top_k=8"],
            "cached_tp2": [f"distill.teacher=cache:{root / 'cache_full'}", "parallel.tp_size=2"],
            "cached_tail": [f"distill.teacher=cache:{root / 'cache_k8'}"]}
    for name, extra in runs.items():
        train(_cfg(student(name, extra)))
        out[name] = _losses(root / name)
    # exact resume from a cache: stop after 2 steps, resume, same curve as uninterrupted
    stop = ["train.stop_after_steps=2", "train.checkpoint_interval=2"]
    train(_cfg(student("cached_resume", runs["cached_k8"] + stop)))
    train(_cfg(student("cached_resume", runs["cached_k8"] + ["train.resume=true"])))
    out["cached_resume"] = _losses(root / "cached_resume")
    if rank == 0:
        rec = [json.loads(line) for line in open(root / "cached" / "eval.jsonl")][-1]
        out["record"] = {k: rec["teacher"].get(k) for k in ("cache", "cache_k", "cache_flops", "eval_loss")}
        out["flops_ratio"] = rec["flops"] / [json.loads(x) for x in open(root / "online" / "eval.jsonl")][-1]["flops"]

    # a killed writer: 1 shard per rank written, a torn temp file left behind; the cache refuses to serve, a re-run
    # completes it with the same content as the uninterrupted write
    part = root / "cache_part"
    m = tc.write_cache(wcfg([]), str(teacher), str(part), top_k=8, shard_windows=8, max_shards=1)
    out["partial"] = (m["complete"], m["missing_shards"])
    if rank == 0:
        (part / ".stream000-000003.safetensors.tmp999").write_bytes(b"\x00" * 100)
        try:
            tc.TeacherCache(str(part))
            out["incomplete_error"] = None
        except tc.CacheError as e:
            out["incomplete_error"] = str(e)
    dist.barrier()
    m = tc.write_cache(wcfg([]), str(teacher), str(part), top_k=8, shard_windows=8)
    if rank == 0:
        ref = tc.read_shard
        a = [ref(tc.shard_path(part, 0, i), m["data_hash"]) for i in range(4)]
        b = [ref(tc.shard_path(root / "cache_k8", 0, i // 2), m["data_hash"]) for i in range(4)]
        out["resumed_equal"] = all(torch.equal(x[n], y[n][(i % 2) * 8:(i % 2) * 8 + 8]) for i, (x, y) in
                                   enumerate(zip(a, b)) for n in ("ids", "logprobs", "tail"))
        out["resumed_complete"] = m["complete"]
    dist.barrier()
    return out


def _errors(root):
    """Named errors of a bad cache, before any compute (single process)."""
    from megadistill.parallel.groups import ParallelGroups
    from megadistill.train import teacher_cache as tc
    root = Path(root)
    g = ParallelGroups.single()
    base = tiny_overrides(root / "x", "distill", ["train.steps=4", f"distill.teacher=cache:{root / 'cache_k8'}"])
    errs = {}
    bad = {"seed": ["train.seed=7"], "seq_len": ["train.seq_len=16"], "temperature": ["distill.temperature=2.0"],
           "steps": ["train.steps=400"], "top_k": ["distill.top_k=9"]}
    for name, extra in bad.items():
        with pytest.raises(UserError) as e:
            tc.open_cache(_cfg(base + extra), g)
        errs[name] = str(e.value)
    cache = tc.open_cache(_cfg(base), g).cache
    shard = tc.shard_path(root / "cache_k8", 0, 1)
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(tc.CacheError, match="truncated or corrupt"):
        cache.read(0, [20])
    flipped = bytearray(blob)
    flipped[-5] ^= 0xFF  # a flipped byte in the tensor data
    shard.write_bytes(bytes(flipped))
    with pytest.raises(tc.CacheError, match="digest"):
        cache.read(0, [21])
    return errs


@pytest.mark.multiproc
def test_cache_end_to_end(tmp_path):
    out, _ = run_distributed(_e2e_worker, 2, str(tmp_path))
    assert out["manifests"][:2] == (True, True) and out["manifests"][3] == 8
    assert len(out["online"]) == 4
    assert_close(torch.tensor(out["cached"]), torch.tensor(out["online"]), atol=2e-5, rtol=0)
    assert_close(torch.tensor(out["cached_tp2"]), torch.tensor(out["online"]), atol=2e-5, rtol=0)
    assert_close(torch.tensor(out["cached_k8"]), torch.tensor(out["online_k8"]), atol=2e-5, rtol=0)
    assert out["cached_tail"] != out["cached_k8"]  # the tail term is part of the default cached loss
    assert out["cached_resume"] == out["cached_k8"]
    rec = out["record"]
    assert rec["cache"].endswith("cache_full") and rec["cache_k"] == 128 and rec["cache_flops"] > 0
    assert rec["eval_loss"] is not None and out["flops_ratio"] < 1  # the teacher forward is the cache's, paid once
    assert out["partial"] == (False, 2) and "incomplete" in out["incomplete_error"]
    assert out["resumed_complete"] and out["resumed_equal"]
    errs = _errors(tmp_path)
    assert "data_hash" in errs["seed"] and "seq_len" in errs["seq_len"] and "temperature" in errs["temperature"]
    assert "covers" in errs["steps"] and "top_k" in errs["top_k"]


# ------------------------------------------------------------------------------------------------ text data

def _text_worker(rank, world, root):
    """Text data, one stream per student DP rank: each rank's batches carry exactly the teacher's top-k of their
    own tokens, across shard and shuffle-block boundaries and through a mid-stream resume."""
    from megadistill.data import build_train_loader
    from megadistill.parallel.groups import ParallelGroups
    from megadistill.train import teacher_cache as tc
    from megadistill.train.teacher import load_teacher
    from megadistill.train.trainer import train
    root = Path(root)
    data = ["data.source=files", f"data.files=[{root / 'corpus.jsonl'}]", f"data.tokenizer={root / 'tok'}",
            "model.vocab_size=320", "data.student_fraction=0.6", "data.eval_fraction=0.1"]
    teacher = root / "teacher"
    train(_cfg(tiny_overrides(teacher, "supervised", data + ["train.steps=2", "zero.stage=0"])))
    cfg = _cfg(tiny_overrides(root / "s", "distill", data + ["train.steps=40", "train.global_batch_size=4",
                                                             f"distill.teacher={teacher}"]))
    m = tc.write_cache(cfg, str(teacher), str(root / "cache"), top_k=4, student_dp=2, shard_windows=16)
    t = load_teacher(cfg, ParallelGroups.single(), torch.device("cpu"))
    checked = 0
    for r in range(2):
        def loader():
            return tc.CachedTeacherLoader(build_train_loader(cfg.data, vocab_size=320, seq_len=32, micro_batch_size=2,
                                                             dp_rank=r, dp_size=2, seed=0), tc.TeacherCache(m_dir))
        m_dir = str(root / "cache")
        cur = loader()
        for step in range(40):  # 80 windows of this rank: 5 shards, past the first shuffle block of 64
            if step == 23:
                state = json.loads(json.dumps(cur.state_dict()))
                cur = loader()
                cur.load_state_dict(state)
            b = next(cur)
            with torch.no_grad():
                ids, lp, tail = cl.top_k_logprobs(t.module(b["input_ids"], None), 4)
            assert torch.equal(b["teacher_ids"].reshape(-1, 4).long(), ids), (r, step)
            assert_close(b["teacher_logprobs"].reshape(-1, 4), lp)
            assert_close(b["teacher_tail"].reshape(-1), tail)
            checked += 1
    with pytest.raises(tc.CacheError, match="student-dp 1"):
        tc.TeacherCache(str(root / "cache")).check(cfg, 1)
    return checked, m["streams"], m["windows_per_stream"]


@pytest.mark.multiproc
def test_text_cache_streams_per_dp_rank(tmp_path):
    from megadistill.data.tokenizer import train_bpe
    from test_data_sources import write_corpus
    _, paths = write_corpus(tmp_path, n=120, seed=3)
    (tmp_path / "corpus.jsonl").write_bytes(Path(paths["jsonl"]).read_bytes())
    train_bpe([paths["jsonl"]], str(tmp_path / "tok"), 300)
    (checked, streams, windows), = run_distributed(_text_worker, 1, str(tmp_path))
    assert checked == 80 and streams == 2 and windows == 80
