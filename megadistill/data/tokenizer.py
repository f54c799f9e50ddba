"""Tokenizers: load any Hugging Face tokenizer directory, train a byte-level BPE, encode document batches."""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence

import numpy as np

from megadistill.errors import UserError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"  # the one special token of tokenizers trained here; it separates packed documents
_N_BYTES = 256  # byte-level alphabet


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
    """AutoTokenizer.from_pretrained(path) for a local directory (or hub name); it must define an EOS token."""
    from transformers import AutoTokenizer

    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"data.tokenizer={path!r} is a file; give the tokenizer directory (with tokenizer.json)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the tokenizer at data.tokenizer={path!r}: {e}. Train one with "
                        f"`megadistill tokenizer train FILES -o DIR --vocab-size V`") from None
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {path!r} has no EOS token; packing separates documents with EOS "
                        f"(set eos_token in its tokenizer_config.json)")
    return tok


def tokenizer_vocab_size(tok) -> int:
    """Number of ids the tokenizer can emit (base vocab plus added tokens)."""
    return len(tok)


def check_vocab_fits(tok, vocab_size: int, name: str = "data.tokenizer") -> None:
    n = tokenizer_vocab_size(tok)
    if n > vocab_size:
        raise UserError(f"{name} has {n} tokens but model.vocab_size={vocab_size}; set model.vocab_size >= {n} "
                        f"(a multiple of parallel.tp_size) or train a smaller tokenizer")


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the token -> id map (added tokens included): equal iff two tokenizers emit the same ids."""
    import hashlib
    import json

    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def has_tokenizer(folder) -> bool:
    """Whether a directory holds tokenizer files AutoTokenizer can load."""
    return any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def encode_batch(tok, texts: Sequence[str]) -> List[np.ndarray]:
    """Token ids of each text without special tokens (no BOS; EOS is appended by the packer)."""
    if not texts:
        return []
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is not None:  # the Rust tokenizer directly: batched, parallel, no max-length warnings
        encs = backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]
    ids = tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [np.asarray(x, dtype=np.int64) for x in ids]


def _training_texts(files: Sequence[str], text_field: str) -> Iterator[str]:
    from megadistill.config import DataConfig
    from megadistill.data.sources import TextSource

    for doc in TextSource(DataConfig(source="files", files=list(files), text_field=text_field)).documents():
        yield doc.text


def train_bpe(files: Sequence[str], out_dir: str, vocab_size: int, *, text_field: str = "text",
              min_frequency: int = 2, texts: Iterable[str] = None):
    """Train a byte-level BPE on the documents of `files` and save it where AutoTokenizer can load it.

    The vocabulary is the 256 byte symbols, the learned merges and one special token, EOS_TOKEN, which is
    the tokenizer's eos_token (and pad/unk stand-in). Returns the PreTrainedTokenizerFast that was saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < _N_BYTES + 1:
        raise UserError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs >= {_N_BYTES + 1} "
                        f"(256 bytes + EOS)")
    if not files and texts is None:
        raise UserError("tokenizer train needs at least one training file")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    stream = texts if texts is not None else _training_texts(files, text_field)
    bpe.train_from_iterator(_batched(stream), trainer=trainer)
    if bpe.get_vocab_size() <= _N_BYTES:
        raise UserError(f"training produced only {bpe.get_vocab_size()} tokens; the files hold no text?")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                  unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    log.info("tokenizer: trained a byte-level BPE with %d tokens -> %s", len(tok), out)
    return tok


def _batched(texts: Iterable[str], size: int = 1000) -> Iterator[List[str]]:
    batch: List[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
