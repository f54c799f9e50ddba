"""Packing, DP-sharded loaders (layout invariance, exact resume, epochs) and the fixed eval batches."""
import copy
import json
import math

import numpy as np
import pytest
import torch

from megadistill.config import DataConfig
from megadistill.data import build_eval_batches, build_train_loader
from megadistill.data.loader import SHUFFLE_BLOCK
from megadistill.data.packing import StreamPacker, doc_ids_of, make_batch
from megadistill.data.synthetic import EOS
from megadistill.data.tokenizer import train_bpe
from megadistill.errors import UserError
from dist_harness import run_distributed
from test_data_sources import write_corpus


class ListStream:
    """A restartable document stream over fixed token lists (state = document index)."""

    def __init__(self, docs, wrap=False):
        self.docs, self.wrap, self.i = docs, wrap, 0

    def restart(self, state):
        self.i = state["i"]

    def __iter__(self):
        return self

    def __next__(self):
        if self.i >= len(self.docs):
            if not self.wrap:
                raise StopIteration
            self.i = 0
        self.i += 1
        return {"i": self.i - 1}, np.asarray(self.docs[self.i - 1] + [EOS], dtype=np.int64)


def _take(loader, n):
    return [loader.__next__() for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


def test_packer_cuts_overlapping_windows_and_resumes_mid_document():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 50, size=rng.integers(1, 12))) for _ in range(40)]
    stream = np.concatenate([d + [EOS] for d in docs])
    packer = StreamPacker(ListStream(docs), seq_len=6)
    windows, states = [], []
    while True:
        states.append(packer.state_dict())
        w = packer.next_window()
        if w is None:
            break
        windows.append(w)
    windows = np.stack(windows)
    assert len(windows) == (len(stream) - 1) // 6
    np.testing.assert_array_equal(windows, np.stack([stream[6 * i: 6 * i + 7] for i in range(len(windows))]))
    for i in (1, 5, 17, len(windows) - 1):  # restore from each recorded state: same remaining windows
        again = StreamPacker(ListStream(docs), seq_len=6)
        again.load_state_dict(json.loads(json.dumps(states[i])))
        np.testing.assert_array_equal(again.next_window(), windows[i])
    batch = make_batch(windows[:4], EOS)
    torch.testing.assert_close(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    for row_in, row_doc in zip(batch["input_ids"].tolist(), batch["doc_ids"].tolist()):
        want = [sum(t == EOS for t in row_in[:p]) for p in range(len(row_in))]  # EOS strictly before p
        assert row_doc == want


def test_doc_ids_number_documents_within_the_window():
    inputs = np.array([[5, 6, 0, 7, 0, 0, 8], [0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(doc_ids_of(inputs, 0), [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]])


SYN = DataConfig(synthetic_doc_len=50, synthetic_order=2)


def _syn(dp_rank, dp_size, mb, seed=0, cfg=SYN, seq_len=32):
    return build_train_loader(cfg, vocab_size=128, seq_len=seq_len, micro_batch_size=mb, dp_rank=dp_rank,
                              dp_size=dp_size, seed=seed)


def test_synthetic_loader_is_layout_invariant_and_rank_disjoint():
    """Per optimizer step, dp=1 x mb=8, dp=2 x mb=4 and dp=2 x mb=2 x accumulation 2 serve the same windows."""
    ref = _take(_syn(0, 1, 8), 12)  # 12 steps of global batch 8
    two = [_take(_syn(r, 2, 4), 12) for r in range(2)]
    acc = [_take(_syn(r, 2, 2), 24) for r in range(2)]
    for step in range(12):
        want = ref[step]["input_ids"]
        torch.testing.assert_close(torch.cat([two[0][step]["input_ids"], two[1][step]["input_ids"]]), want)
        micro = [acc[r][2 * step + a]["input_ids"] for a in range(2) for r in range(2)]
        assert sorted(map(tuple, torch.cat(micro).tolist())) == sorted(map(tuple, want.tolist()))
    rows = [tuple(r) for b in two[0] + two[1] for r in b["input_ids"].tolist()]
    assert len(set(rows)) == len(rows)  # no window served twice, across ranks or steps
    tokens = torch.stack([b["input_ids"] for b in ref])
    assert tokens.min() >= 0 and tokens.max() < 128 and (tokens == EOS).any()
    n_steps = 2 * SHUFFLE_BLOCK // 8  # two whole shuffle blocks
    base, other = _take(_syn(0, 1, 8), n_steps), _take(_syn(0, 1, 8, seed=1), n_steps)
    assert sorted(map(tuple, torch.cat([b["input_ids"] for b in other]).tolist())) == \
        sorted(map(tuple, torch.cat([b["input_ids"] for b in base]).tolist()))  # the same windows...
    assert not torch.equal(other[0]["input_ids"], ref[0]["input_ids"])  # ...in another seed's order
    assert _syn(0, 1, 8).tokens_per_batch == 8 * 32


def test_synthetic_resume_is_exact_and_may_change_layout():
    full = _take(_syn(1, 2, 3), 10)
    first = _syn(1, 2, 3)
    _take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _syn(1, 2, 3)
    resumed.load_state_dict(state)
    _same(_take(resumed, 6), full[4:])
    ref = _take(_syn(0, 1, 6), 10)  # the same global stream served by one rank with a double micro-batch
    single = _syn(0, 1, 6)
    single.load_state_dict(state)
    _same(_take(single, 6), ref[4:])
    with pytest.raises(UserError, match="multiple"):
        _syn(0, 4, 4).load_state_dict(state)  # 24 windows consumed is not a whole step of 16
    with pytest.raises(UserError, match="different data settings"):
        _syn(1, 2, 3, seed=5).load_state_dict(state)


@pytest.fixture(scope="module")
def text_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    _, paths = write_corpus(tmp, n=120, seed=3)
    train_bpe([paths["jsonl"]], str(tmp / "tok"), 300)
    return DataConfig(source="files", files=[paths["parquet"], paths["txt"]], tokenizer=str(tmp / "tok"),
                      split="student", student_fraction=0.6, eval_fraction=0.1)


def _text(cfg, dp_rank=1, dp_size=2, mb=5, seed=0):
    return build_train_loader(cfg, vocab_size=320, seq_len=48, micro_batch_size=mb, dp_rank=dp_rank,
                              dp_size=dp_size, seed=seed)


def test_text_loader_resumes_exactly_across_blocks_and_epochs(text_cfg, caplog):
    steps = 3 * SHUFFLE_BLOCK // 5 + 2  # several shuffle blocks; the small split wraps around twice
    with caplog.at_level("INFO", logger="megadistill.data.packing"):
        loader = _text(text_cfg)
        full, states = [], []
        for _ in range(steps):
            states.append(json.loads(json.dumps(loader.state_dict())))
            full.append(loader.__next__())
    assert loader.epoch >= 1 and "starting epoch 2" in caplog.text
    for at in (0, 1, 12, SHUFFLE_BLOCK // 5 + 1, steps - 3):
        resumed = _text(text_cfg)
        resumed.load_state_dict(states[at])
        _same(_take(resumed, 3), full[at: at + 3])
    stale = copy.deepcopy(states[20])
    stale["packer"]["doc"]["resume"] = None  # no datasets iterator state: restart by skipping rows
    resumed = _text(text_cfg)
    resumed.load_state_dict(stale)
    _same(_take(resumed, 2), full[20:22])
    with pytest.raises(UserError, match="different data settings"):
        _text(text_cfg, dp_rank=0).load_state_dict(states[5])


def test_text_loader_is_deterministic_and_ranks_serve_different_documents(text_cfg):
    a, b = _take(_text(text_cfg), 8), _take(_text(text_cfg), 8)
    _same(a, b)
    other_rank = _take(_text(text_cfg, dp_rank=0), 8)
    rows = {tuple(r) for x in a for r in x["input_ids"].tolist()}
    assert not rows & {tuple(r) for x in other_rank for r in x["input_ids"].tolist()}
    reseeded = _take(_text(text_cfg, seed=7), 8)
    assert not torch.equal(reseeded[0]["input_ids"], a[0]["input_ids"])
    batch = a[0]
    assert batch["input_ids"].shape == (5, 48) and batch["input_ids"].dtype == torch.long
    torch.testing.assert_close(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    with pytest.raises(UserError, match="model.vocab_size=256"):
        build_train_loader(text_cfg, vocab_size=256, seq_len=48, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)


@pytest.mark.parametrize("source", ["synthetic", "files"])
def test_eval_batches_are_fixed_and_independent_of_split_and_seed(text_cfg, source):
    cfg = SYN if source == "synthetic" else text_cfg
    vocab = 128 if source == "synthetic" else 320
    n_tokens, seq_len = 700, 32
    first = build_eval_batches(cfg, vocab_size=vocab, seq_len=seq_len, n_tokens=n_tokens, batch_size=8)
    flipped = copy.deepcopy(cfg)
    flipped.split = "teacher" if cfg.split == "student" else "student"
    _same(first, build_eval_batches(flipped, vocab_size=vocab, seq_len=seq_len, n_tokens=n_tokens, batch_size=8))
    n = sum(b["input_ids"].shape[0] for b in first)
    assert n == math.ceil(n_tokens / seq_len) and first[-1]["input_ids"].shape[0] == n - 8 * (len(first) - 1)
    ids = torch.cat([b["input_ids"] for b in first])
    labels = torch.cat([b["labels"] for b in first])
    torch.testing.assert_close(ids[1:, 0], labels[:-1, -1])  # contiguous windows of the eval stream
    train = torch.cat([b["input_ids"] for b in _take(build_train_loader(
        cfg, vocab_size=vocab, seq_len=seq_len, micro_batch_size=8, dp_rank=0, dp_size=1, seed=0), 6)])
    assert not {tuple(r) for r in ids.tolist()} & {tuple(r) for r in train.tolist()}


def _dist_loaders(rank, world_size, cfg_dict):
    """Each rank builds its loaders, checkpoints their states on rank 0 (all_gather), resumes and continues."""
    import torch.distributed as dist

    cfg = DataConfig(**cfg_dict)
    out = {}
    for name, c, vocab in (("syn", SYN, 128), ("text", cfg, 320)):
        loader = build_train_loader(c, vocab_size=vocab, seq_len=32, micro_batch_size=4, dp_rank=rank,
                                    dp_size=world_size, seed=3)
        head = [loader.__next__()["input_ids"] for _ in range(3)]
        states = [None] * world_size
        dist.all_gather_object(states, json.dumps(loader.state_dict()))
        tail = [loader.__next__()["input_ids"] for _ in range(3)]
        again = build_train_loader(c, vocab_size=vocab, seq_len=32, micro_batch_size=4, dp_rank=rank,
                                   dp_size=world_size, seed=3)
        again.load_state_dict(json.loads(states[rank]))
        resumed = [again.__next__()["input_ids"] for _ in range(3)]
        out[name] = (torch.stack(head + tail).numpy(), torch.stack(resumed).numpy())
    evals = build_eval_batches(cfg, vocab_size=320, seq_len=32, n_tokens=200, batch_size=4)
    out["eval"] = torch.cat([b["input_ids"] for b in evals]).numpy()
    return out  # numpy, not tensors: tensors would travel as shared memory that dies with the worker


@pytest.mark.multiproc
def test_loaders_in_separate_processes_match_and_resume(text_cfg):
    cfg_dict = {k: getattr(text_cfg, k) for k in ("source", "files", "tokenizer", "split", "student_fraction",
                                                  "eval_fraction")}
    res = run_distributed(_dist_loaders, 2, cfg_dict)
    for rank in range(2):
        for name, c, vocab in (("syn", SYN, 128), ("text", text_cfg, 320)):
            seq, resumed = map(torch.from_numpy, res[rank][name])
            torch.testing.assert_close(resumed, seq[3:], rtol=0, atol=0)
            local = build_train_loader(c, vocab_size=vocab, seq_len=32, micro_batch_size=4, dp_rank=rank,
                                       dp_size=2, seed=3)
            torch.testing.assert_close(torch.stack([local.__next__()["input_ids"] for _ in range(6)]), seq,
                                       rtol=0, atol=0)
    np.testing.assert_array_equal(res[0]["eval"], res[1]["eval"])
    assert not {tuple(r) for r in res[0]["text"][0].reshape(-1, 32).tolist()} & \
        {tuple(r) for r in res[1]["text"][0].reshape(-1, 32).tolist()}
