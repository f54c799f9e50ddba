"""Text sources through `datasets` (jsonl / parquet / txt / hub-style dataset dir), BPE training and its CLI verb."""
import json
import random

import pytest

from megadistill.config import DataConfig
from megadistill.data.sources import TextSource
from megadistill.data.split import text_key
from megadistill.data.tokenizer import EOS_TOKEN, check_vocab_fits, encode_batch, load_tokenizer, train_bpe
from megadistill.errors import UserError

WORDS = ("the cat dog ran over a big small red blue house tree river mountain sky under with quietly "
         "because seven green light stone water bird").split()


def corpus_texts(n, seed=0):
    """n distinct documents, each carrying a unique marker <<ID#####>> that survives tokenization."""
    rng = random.Random(seed)
    return [f"<<ID{i:05d}>> " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60))) for i in range(n)]


def write_corpus(tmp_path, n=400, seed=0):
    """The same corpus as one jsonl, one parquet and one txt file; returns (texts, {fmt: path})."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = corpus_texts(n, seed)
    paths = {"jsonl": tmp_path / "c.jsonl", "parquet": tmp_path / "c.parquet", "txt": tmp_path / "c.txt"}
    with open(paths["jsonl"], "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "id": i}) + "\n")
    pq.write_table(pa.table({"text": texts, "id": list(range(n))}), paths["parquet"], row_group_size=64)
    paths["txt"].write_text("\n".join(texts) + "\n")
    return texts, {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    texts, paths = write_corpus(tmp)
    tok_dir = str(tmp / "tok")
    train_bpe([paths["jsonl"]], tok_dir, 320)
    return texts, paths, tok_dir


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "txt"])
def test_file_sources_yield_documents_in_order_with_text_hash_keys(corpus, fmt):
    texts, paths, _ = corpus
    docs = list(TextSource(DataConfig(source="files", files=[paths[fmt]])).documents())
    assert [d.text for d in docs] == texts
    assert [d.position for d in docs] == list(range(len(texts)))
    assert all(d.key == text_key(d.text) for d in docs)
    # restart at row 123: from the saved iterator state and by skipping rows
    again = TextSource(DataConfig(source="files", files=[paths[fmt]]))
    assert [d.text for d in again.documents(123, docs[123].resume)] == texts[123:]
    assert [d.text for d in again.documents(300)] == texts[300:]
    assert [d.text for d in again.documents(0)] == texts  # a restart after load_state_dict starts over


def test_mixed_files_are_read_in_the_given_order_and_blank_lines_skipped(corpus, tmp_path):
    texts, paths, _ = corpus
    gappy = tmp_path / "gappy.txt"
    gappy.write_text("first line\n\n   \nsecond line\n")
    src = TextSource(DataConfig(source="files", files=[paths["parquet"], str(gappy), paths["jsonl"]]))
    docs = list(src.documents())
    assert [d.text for d in docs] == texts + ["first line", "second line"] + texts
    assert docs[len(texts) + 1].position == len(texts) + 3  # blank rows are counted, not yielded
    tail = [d.text for d in src.documents(docs[-5].position, docs[-5].resume)]
    assert tail == texts[-5:]


@pytest.mark.parametrize("streaming", [True, False])
def test_hub_dataset_code_path_on_a_local_dataset_dir(corpus, tmp_path, monkeypatch, streaming):
    """source=hf calls load_dataset(name, config, split, streaming); a local dataset directory stands in for the hub."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    texts, paths, _ = corpus
    (tmp_path / "ds" / "data").mkdir(parents=True)
    (tmp_path / "ds" / "data" / "train.jsonl").write_text(open(paths["jsonl"]).read())
    cfg = DataConfig(source="hf", hf_name=str(tmp_path / "ds"), hf_split="train", streaming=streaming)
    docs = list(TextSource(cfg).documents())
    assert [d.text for d in docs] == texts
    assert [d.text for d in TextSource(cfg).documents(250, docs[250].resume)] == texts[250:]


def test_source_user_errors(corpus, tmp_path):
    _, paths, _ = corpus
    with pytest.raises(UserError, match="does not exist"):
        TextSource(DataConfig(source="files", files=[str(tmp_path / "nope.jsonl")]))
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported suffix"):
        TextSource(DataConfig(source="files", files=[str(bad)]))
    with pytest.raises(UserError, match="text_field"):
        list(TextSource(DataConfig(source="files", files=[paths["jsonl"]], text_field="body")).documents())


def test_trained_bpe_loads_with_autotokenizer_and_round_trips(corpus):
    from transformers import AutoTokenizer

    texts, _, tok_dir = corpus
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 320 and tok.eos_token == EOS_TOKEN and tok.eos_token_id is not None
    ids = encode_batch(tok, texts[:50])
    assert [tok.decode(list(x)) for x in ids] == texts[:50]
    assert all(tok.eos_token_id not in x for x in ids)  # no special tokens inside documents
    assert sum(map(len, ids)) < sum(map(len, texts[:50])) / 2  # merges were learned: < 2 bytes per token
    assert load_tokenizer(tok_dir).eos_token_id == tok.eos_token_id
    check_vocab_fits(tok, 320)
    with pytest.raises(UserError, match="model.vocab_size=256"):
        check_vocab_fits(tok, 256)


def test_tokenizer_train_cli_verb(corpus, tmp_path, monkeypatch, capsys):
    from megadistill import cli

    monkeypatch.setattr(cli, "REGISTRARS", ("megadistill.data.commands",))  # only this part's verbs
    _, paths, _ = corpus
    out = tmp_path / "cli_tok"
    rc = cli.main(["tokenizer", "train", paths["txt"], paths["parquet"], "-o", str(out), "--vocab-size", "300"])
    assert rc == 0 and "300 tokens" in capsys.readouterr().out
    assert len(load_tokenizer(str(out))) == 300
    assert cli.main(["tokenizer", "train", paths["txt"], "-o", str(out), "--vocab-size", "100"]) == 2
    assert "too small" in capsys.readouterr().err
    assert cli.main(["tokenizer", "train", str(tmp_path / "missing.txt"), "-o", str(out), "--vocab-size", "300"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["tokenizer"]) == 2


def test_loading_a_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer train"):
        load_tokenizer(str(tmp_path / "no_such_tokenizer"))
