"""Disjoint teacher / student / eval splits: no document in two splits, fractions right, stable across processes."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from megadistill.config import DataConfig
from megadistill.data import build_eval_batches, build_train_loader
from megadistill.data.loader import SyntheticWindows, language_of
from megadistill.data.packing import TokenizedDocStream
from megadistill.data.sources import TextSource
from megadistill.data.split import EVAL, STUDENT, TEACHER, SplitIndex, Splitter, key_score, text_key
from megadistill.data.tokenizer import load_tokenizer, train_bpe
from megadistill.errors import UserError
from test_data_sources import corpus_texts, write_corpus

MARK = re.compile(r"<<ID(\d{5})>>")


def test_every_key_lands_in_exactly_one_split_with_the_right_fractions():
    sp = Splitter(student_fraction=0.4, eval_fraction=0.05, hash_seed=3)
    n = 40_000
    codes = sp.split_of_indices(np.arange(n))
    texts = [f"document number {i}" for i in range(n // 4)]
    tcodes = np.array([sp.code_of_scores(key_score(text_key(t), 3)) for t in texts])
    for c, m in ((codes, n), (tcodes, n // 4)):
        assert set(np.unique(c)) == {TEACHER, STUDENT, EVAL}
        for code, frac in ((TEACHER, 0.6), (STUDENT, 0.35), (EVAL, 0.05)):
            got = (c == code).mean()
            assert abs(got - frac) < 4 * np.sqrt(frac * (1 - frac) / m), (code, got, frac)
    other = Splitter(0.4, 0.05, hash_seed=4).split_of_indices(np.arange(n))
    assert (other != codes).mean() > 0.3  # the salt reshuffles the assignment
    with pytest.raises(UserError, match="eval_fraction"):
        Splitter(0.3, 0.3)


def test_split_index_matches_brute_force_enumeration():
    sp = Splitter(0.5, 0.02, hash_seed=1)
    n = 3 * SplitIndex.CHUNK + 17
    codes = sp.split_of_indices(np.arange(n))
    for split, code in (("teacher", TEACHER), ("eval", EVAL)):
        members = np.flatnonzero(codes == code)
        idx = SplitIndex(sp, split, cache_chunks=1)
        ords = np.array([len(members) - 1, 0, 5, len(members) // 2, len(members) // 3])
        np.testing.assert_array_equal(idx.lookup(ords), members[ords])


_CHILD = """
import json, sys
import numpy as np
from megadistill.data.split import Splitter, key_score, text_key
sp = Splitter(0.5, 0.1, hash_seed=9)
texts = [f"t{i}" for i in range(300)]
print(json.dumps({"ints": sp.split_of_indices(np.arange(2000)).tolist(),
                  "texts": [sp.split_of_key(text_key(t)) for t in texts]}))
"""


def test_assignment_is_stable_across_processes():
    """Fresh interpreters with different hash randomisation assign every key to the same split."""
    sp = Splitter(0.5, 0.1, hash_seed=9)
    want = {"ints": sp.split_of_indices(np.arange(2000)).tolist(),
            "texts": [sp.split_of_key(text_key(f"t{i}")) for i in range(300)]}
    for hashseed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == want


def test_synthetic_teacher_student_and_eval_documents_are_disjoint():
    cfg = DataConfig(synthetic_doc_len=16)
    sp = Splitter.from_config(cfg)
    keys = {s: set(SplitIndex(sp, s).lookup(np.arange(3000)).tolist()) for s in ("teacher", "student", "eval")}
    assert not keys["teacher"] & keys["student"] and not keys["eval"] & (keys["teacher"] | keys["student"])
    # the windows a loader serves are built from its split's documents only
    win = SyntheticWindows(language_of(cfg, 64), sp, "student", 40)
    ids = np.arange(200)
    pos = ids[:, None] * 40 + np.arange(41)
    used = set(win.index.lookup(np.unique(pos // 17)).tolist())
    assert used <= set(SplitIndex(sp, "student").lookup(np.arange(len(used) + 10)).tolist())
    assert (Splitter.from_config(cfg).split_of_indices(sorted(used)) == STUDENT).all()


def test_no_student_document_reaches_the_teacher_loader(tmp_path):
    """Decode everything each loader serves over more than an epoch: the document markers never overlap."""
    texts, paths = write_corpus(tmp_path, n=300, seed=1)
    tok_dir = str(tmp_path / "tok")
    train_bpe([paths["jsonl"]], tok_dir, 300)
    tok = load_tokenizer(tok_dir)
    base = dict(source="files", files=[paths["jsonl"]], tokenizer=tok_dir, student_fraction=0.45,
                eval_fraction=0.1, hash_seed=5)
    seen = {}
    for split in ("teacher", "student"):
        ids = set()
        for rank in range(2):
            loader = build_train_loader(DataConfig(split=split, **base), vocab_size=300, seq_len=64,
                                        micro_batch_size=8, dp_rank=rank, dp_size=2, seed=0)
            for _ in range(30):
                b = loader.__next__()
                for row in b["input_ids"].tolist():
                    ids |= {int(m) for m in MARK.findall(tok.decode(row))}
        seen[split] = ids
    batches = build_eval_batches(DataConfig(**base), vocab_size=300, seq_len=64, n_tokens=10**6, batch_size=16)
    stream = [t for b in batches for row in b["input_ids"].tolist() for t in row]  # eval windows are contiguous
    seen["eval"] = {int(m) for m in MARK.findall(tok.decode(stream))}
    assert not seen["teacher"] & seen["student"]
    assert not seen["eval"] & (seen["teacher"] | seen["student"])
    truth = {s: {i for i, t in enumerate(texts) if Splitter(0.45, 0.1, 5).split_of_key(text_key(t)) == s}
             for s in ("teacher", "student", "eval")}
    for s in ("teacher", "student", "eval"):  # > 1 epoch is served; markers cut by window edges are missed
        assert seen[s] <= truth[s] and len(seen[s]) > 0.8 * len(truth[s]), (s, len(seen[s]), len(truth[s]))
    assert 0.25 < len(truth["student"]) / len(texts) < 0.45 and len(truth["eval"]) > 10  # 0.45 - 0.1 expected


def test_doc_streams_deal_split_documents_to_dp_ranks_without_overlap(tmp_path):
    texts, paths = write_corpus(tmp_path, n=200, seed=2)
    tok_dir = str(tmp_path / "tok")
    train_bpe([paths["txt"]], tok_dir, 280)
    tok = load_tokenizer(tok_dir)
    cfg = DataConfig(source="files", files=[paths["txt"]], tokenizer=tok_dir)
    sp = Splitter.from_config(cfg)
    per_rank = []
    for rank in range(3):
        stream = TokenizedDocStream(TextSource(cfg), tok, sp, "teacher", rank, 3, wrap=False)
        per_rank.append([tok.decode(list(tokens[:-1])) for _, tokens in stream])
    teacher = [t for t in texts if sp.split_of_key(text_key(t)) == "teacher"]
    assert sorted(sum(per_rank, [])) == sorted(teacher)
    assert per_rank[1] == teacher[1::3]  # round-robin over the split's documents in source order
    assert corpus_texts(3, seed=2)[0] == texts[0]
