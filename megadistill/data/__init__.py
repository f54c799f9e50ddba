"""Data pipeline: synthetic known-entropy language, text sources, tokenizer, disjoint splits, packing, loaders."""
from megadistill.data.loader import build_eval_batches, build_train_loader, describe_data
from megadistill.data.synthetic import EOS as SYNTHETIC_EOS, MarkovLanguage

__all__ = ["build_train_loader", "build_eval_batches", "describe_data", "MarkovLanguage", "SYNTHETIC_EOS"]
