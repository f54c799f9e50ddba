"""`megadistill tokenizer train`: the data pipeline's command-line verbs."""
from __future__ import annotations

import argparse

from megadistill.errors import UserError


def _train(args: argparse.Namespace) -> int:
    from megadistill.data.tokenizer import train_bpe

    tok = train_bpe(args.files, args.out, args.vocab_size, text_field=args.text_field,
                    min_frequency=args.min_frequency)
    print(f"saved a byte-level BPE tokenizer with {len(tok)} tokens (eos {tok.eos_token!r} = "
          f"{tok.eos_token_id}) to {args.out}")
    return 0


def _missing_subverb(args: argparse.Namespace) -> int:
    raise UserError("say what to do with tokenizers, e.g. `megadistill tokenizer train FILES -o DIR --vocab-size V`")


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train tokenizers for the data pipeline",
                              description="Tokenizer tools for data.source=files|hf.")
    p.set_defaults(func=_missing_subverb)
    sub = p.add_subparsers(dest="tokenizer_verb", metavar="ACTION")
    t = sub.add_parser("train", help="train a byte-level BPE on json/jsonl/parquet/txt files",
                       description="Train a byte-level BPE (Hugging Face `tokenizers`) and save it as a "
                                   "tokenizer directory that AutoTokenizer loads (data.tokenizer=DIR).")
    t.add_argument("files", nargs="+", metavar="FILES", help="training files (.json/.jsonl/.parquet/.txt)")
    t.add_argument("-o", "--out", required=True, metavar="DIR", help="output tokenizer directory")
    t.add_argument("--vocab-size", type=int, required=True, metavar="V",
                   help="vocabulary size incl. the 256 bytes and EOS; must fit model.vocab_size")
    t.add_argument("--text-field", default="text", help="column holding the text in json/parquet files")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair count to merge")
    t.set_defaults(func=_train)
