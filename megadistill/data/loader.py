"""DP-sharded, seed-deterministic, exactly resumable training loaders and fixed held-out eval batches."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import List, Optional

import numpy as np

from megadistill.data.packing import StreamPacker, TokenizedDocStream, make_batch
from megadistill.data.sources import TextSource
from megadistill.data.split import SplitIndex, Splitter
from megadistill.data.synthetic import EOS, MarkovLanguage, hash_permutation
from megadistill.data.tokenizer import check_vocab_fits, load_tokenizer, tokenizer_vocab_size
from megadistill.errors import UserError

log = logging.getLogger(__name__)

SHUFFLE_BLOCK = 64  # windows are served in seed-permuted blocks of this many windows

_TEXT_FIELDS = ("source", "files", "hf_name", "hf_config", "hf_split", "text_field", "streaming", "tokenizer")
_SYNTH_FIELDS = ("synthetic_order", "synthetic_branching", "synthetic_zipf", "synthetic_doc_len", "synthetic_seed")


def language_of(cfg, vocab_size: int) -> MarkovLanguage:
    return MarkovLanguage(vocab_size, order=cfg.synthetic_order, branching=cfg.synthetic_branching,
                          zipf=cfg.synthetic_zipf, seed=cfg.synthetic_seed, doc_len=cfg.synthetic_doc_len)


def _fingerprint(cfg, **extra) -> str:
    """Hash of everything that decides the sample stream, so a resume with other data settings is caught."""
    keys = ("split", "student_fraction", "eval_fraction", "hash_seed") + (
        _SYNTH_FIELDS if cfg.source == "synthetic" else _TEXT_FIELDS)
    blob = json.dumps({**{k: getattr(cfg, k) for k in keys}, "source": cfg.source, **extra}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def _check_state(d: dict, kind: str, fingerprint: str) -> None:
    if d.get("kind") != kind:
        raise UserError(f"data loader state is for a {d.get('kind')!r} source, this run reads a {kind!r} source")
    if d.get("fingerprint") != fingerprint:
        raise UserError("data loader state was saved with different data settings (source, split, fractions, "
                        "hash_seed, seq_len, seed or language); resume with the configuration of the saved run")


class SyntheticWindows:
    """Random access to the packed windows of one split of a synthetic language.

    The split stream is the split's documents in key order, each followed by EOS (L + 1 tokens); window w
    is stream tokens [w s, (w + 1) s] (s + 1 tokens; consecutive windows share one, as StreamPacker cuts
    them), generated from just the documents it touches.
    """

    def __init__(self, lang: MarkovLanguage, splitter: Splitter, split: str, seq_len: int):
        self.lang, self.seq_len = lang, seq_len
        self.index = SplitIndex(splitter, split)

    def windows(self, ids) -> np.ndarray:
        """[N] window ids -> [N, s + 1] tokens."""
        ids = np.asarray(ids, dtype=np.int64)
        cycle = self.lang.doc_len + 1
        pos = ids[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]  # [N, s + 1] stream positions
        ordinal, within = pos // cycle, pos % cycle
        uniq = np.unique(ordinal)
        docs = self.lang.documents_with_eos(self.index.lookup(uniq))  # [U, L + 1]
        return docs[np.searchsorted(uniq, ordinal), within]


class SyntheticLoader:
    """Training loader over a synthetic split: micro-step i on DP rank r serves global windows
    [(i dp + r) b, (i dp + r + 1) b) of the seed-permuted window sequence.

    The sequence is the same for every layout, so all ranks' micro-batches of one optimizer step cover the
    same windows whenever micro_batch_size x dp_size x accumulation is the same. Never exhausts; the state
    is the global window count, so a resume may even change dp_size or micro_batch_size if it divides.
    """

    kind = "synthetic"

    def __init__(self, cfg, *, vocab_size: int, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int):
        _check_layout(seq_len, micro_batch_size, dp_rank, dp_size)
        self.lang = language_of(cfg, vocab_size)
        self.source = SyntheticWindows(self.lang, Splitter.from_config(cfg), cfg.split, seq_len)
        self.micro_batch_size, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self.seq_len = seq_len
        self.tokens_per_batch = micro_batch_size * seq_len
        self.eos_id = EOS
        self.step = 0
        self._cache: dict = {}  # block -> (this rank's positions in it, their windows)
        self._fp = _fingerprint(cfg, seq_len=seq_len, seed=seed, vocab_size=vocab_size)

    def _positions(self, step: int) -> np.ndarray:
        """[b] positions in the global window sequence served by this rank at micro-step `step`."""
        return (step * self.dp_size + self.dp_rank) * self.micro_batch_size + np.arange(self.micro_batch_size)

    def _window_id(self, g: np.ndarray) -> np.ndarray:
        """Global positions -> window ids: positions are permuted by the seed within blocks of SHUFFLE_BLOCK."""
        out = np.empty_like(g)
        for blk in np.unique(g // SHUFFLE_BLOCK):
            sel = g // SHUFFLE_BLOCK == blk
            out[sel] = blk * SHUFFLE_BLOCK + hash_permutation(SHUFFLE_BLOCK, self.seed, int(blk))[g[sel] % SHUFFLE_BLOCK]
        return out

    def _block(self, blk: int):
        """(positions, windows) of this rank's share of block `blk`, generated in one vectorised call.

        A block's windows share their documents, so generating them together (and caching the last two
        blocks) runs the per-token generation loop once per block instead of once per micro-batch.
        """
        if blk not in self._cache:
            g = blk * SHUFFLE_BLOCK + np.arange(SHUFFLE_BLOCK)
            mine = g[(g // self.micro_batch_size) % self.dp_size == self.dp_rank]
            self._cache[blk] = (mine, self.source.windows(self._window_id(mine)))
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
        return self._cache[blk]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = self._positions(self.step)
        rows = np.empty((len(g), self.seq_len + 1), dtype=np.int64)
        for blk in np.unique(g // SHUFFLE_BLOCK):
            sel = g // SHUFFLE_BLOCK == blk
            mine, windows = self._block(int(blk))
            rows[sel] = windows[np.searchsorted(mine, g[sel])]
        self.step += 1
        return make_batch(rows, EOS)

    def state_dict(self) -> dict:
        return {"version": 1, "kind": self.kind, "fingerprint": self._fp,
                "windows_consumed": self.step * self.dp_size * self.micro_batch_size,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, d: dict) -> None:
        _check_state(d, self.kind, self._fp)
        per_step = self.dp_size * self.micro_batch_size
        if d["windows_consumed"] % per_step:
            raise UserError(f"data loader state has consumed {d['windows_consumed']} windows, not a multiple of "
                            f"micro_batch_size x dp_size = {per_step}; resume with the saved layout")
        self.step = d["windows_consumed"] // per_step


class TextLoader:
    """Training loader over a tokenized text split: this DP rank packs its own round-robin share of the
    split's documents and serves its windows in seed-permuted blocks of SHUFFLE_BLOCK.

    The next block is read, tokenized and packed on a background thread (the Rust tokenizer releases the
    GIL), overlapping the training step. State (per DP rank): the packer state at the start of the
    current block, the block number and the position in it; restoring re-packs that one block and
    continues at exactly the next window.
    """

    kind = "text"

    def __init__(self, cfg, *, vocab_size: int, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int):
        _check_layout(seq_len, micro_batch_size, dp_rank, dp_size)
        # A private copy: the prefetch thread encodes with it while others may reconfigure theirs (padding,
        # truncation), which the Rust tokenizer would refuse as a concurrent borrow.
        tok = copy.deepcopy(load_tokenizer(cfg.tokenizer))
        check_vocab_fits(tok, vocab_size)
        stream = TokenizedDocStream(TextSource(cfg), tok, Splitter.from_config(cfg), cfg.split,
                                    dp_rank=dp_rank, dp_size=dp_size, wrap=True)
        self.packer = StreamPacker(stream, seq_len)
        self.micro_batch_size, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self.seq_len = seq_len
        self.tokens_per_batch = micro_batch_size * seq_len
        self.eos_id = int(tok.eos_token_id)
        self._fp = _fingerprint(cfg, seq_len=seq_len, seed=seed, dp_rank=dp_rank, dp_size=dp_size)
        self.block, self.index = 0, 0
        self._windows = None  # [SHUFFLE_BLOCK, s + 1] windows of block `self.block`; None until first use
        self._block_state = None  # packer state at the start of block `self.block`
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megadistill-data")
        self._next: Optional[Future] = None  # block `self.block + 1` in the making; it alone uses the packer

    @property
    def epoch(self) -> int:
        """Pass over the source that the block now being served started in."""
        return int(self._block_state["doc"]["epoch"]) if self._block_state else 0

    def _produce(self, block: int):
        state = self.packer.state_dict()
        ws = np.stack([self.packer.next_window() for _ in range(SHUFFLE_BLOCK)])
        return state, ws[hash_permutation(SHUFFLE_BLOCK, self.seed, block)]

    def _advance(self, block: int) -> None:
        """Make `block` current (it follows the current one, or starts a fresh / restored packer)."""
        fut = self._next if self._next is not None else self._pool.submit(self._produce, block)
        self._next = None
        self._block_state, self._windows = fut.result()
        self.block, self.index = block, 0
        self._next = self._pool.submit(self._produce, block + 1)

    def _drain(self) -> None:
        if self._next is not None:
            self._next.cancel() or self._next.exception()  # wait: it may be using the packer
            self._next = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows: List[np.ndarray] = []
        need = self.micro_batch_size
        while need:
            if self._windows is None:
                self._advance(self.block)
            elif self.index == SHUFFLE_BLOCK:
                self._advance(self.block + 1)
            take = min(need, SHUFFLE_BLOCK - self.index)
            rows.append(self._windows[self.index: self.index + take])
            self.index += take
            need -= take
        return make_batch(np.concatenate(rows), self.eos_id)

    def state_dict(self) -> dict:
        if self._windows is None:  # nothing served yet: no prefetch in flight
            self._block_state = self.packer.state_dict()
        return {"version": 1, "kind": self.kind, "fingerprint": self._fp, "block": self.block,
                "index": self.index, "packer": self._block_state, "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def load_state_dict(self, d: dict) -> None:
        _check_state(d, self.kind, self._fp)
        self._drain()
        self.packer.load_state_dict(d["packer"])
        self._windows = None
        self._advance(int(d["block"]))
        self.index = int(d["index"])

    def close(self) -> None:
        """Stop the prefetch thread (also done when the loader is garbage-collected)."""
        self._drain()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _check_layout(seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if seq_len < 1 or micro_batch_size < 1:
        raise UserError(f"seq_len={seq_len} and micro_batch_size={micro_batch_size} must be >= 1")
    if not 0 <= dp_rank < dp_size:
        raise UserError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")


def build_train_loader(cfg, *, vocab_size: int, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                       seed: int):
    """The training loader of split cfg.split for one DP rank: next() -> {"input_ids", "labels", "doc_ids"} [b, s]."""
    if cfg.source not in ("synthetic", "files", "hf"):
        raise UserError(f"data.source={cfg.source!r} is not one of ['synthetic', 'files', 'hf']")
    if cfg.split not in ("teacher", "student"):
        raise UserError(f"data.split={cfg.split!r} is not one of ['teacher', 'student'] (eval is held out)")
    cls = SyntheticLoader if cfg.source == "synthetic" else TextLoader
    loader = cls(cfg, vocab_size=vocab_size, seq_len=seq_len, micro_batch_size=micro_batch_size,
                 dp_rank=dp_rank, dp_size=dp_size, seed=seed)
    if dp_rank == 0:
        log.info("data: %s source, %s split, %d x %d tokens per micro-batch per rank, dp_size %d",
                 cfg.source, cfg.split, micro_batch_size, seq_len, dp_size)
    return loader


def build_eval_batches(cfg, *, vocab_size: int, seq_len: int, n_tokens: int, batch_size: int) -> List[dict]:
    """ceil(n_tokens / seq_len) windows from the start of the eval split, in batches of batch_size.

    Independent of rank, seed and split, so every rank and every run with the same data config sees the
    same tokens. A text eval split smaller than requested gives what it has (with a warning).
    """
    if n_tokens < 1 or batch_size < 1 or seq_len < 1:
        raise UserError(f"n_tokens={n_tokens}, batch_size={batch_size} and seq_len={seq_len} must be >= 1")
    n_windows = math.ceil(n_tokens / seq_len)
    splitter = Splitter.from_config(cfg)
    if cfg.source == "synthetic":
        windows = SyntheticWindows(language_of(cfg, vocab_size), splitter, "eval", seq_len).windows(
            np.arange(n_windows))
        eos = EOS
    else:
        tok = load_tokenizer(cfg.tokenizer)
        check_vocab_fits(tok, vocab_size)
        packer = StreamPacker(TokenizedDocStream(TextSource(cfg), tok, splitter, "eval", wrap=False),
                              seq_len)
        rows = []
        while len(rows) < n_windows:
            w = packer.next_window()
            if w is None:
                break
            rows.append(w)
        if not rows:
            raise UserError(f"the eval split holds fewer than seq_len + 1 = {seq_len + 1} tokens; raise "
                            f"data.eval_fraction or add data")
        if len(rows) < n_windows:
            log.warning("data: eval split has only %d windows (%d tokens) of the %d tokens asked for",
                        len(rows), len(rows) * seq_len, n_tokens)
        windows, eos = np.stack(rows), int(tok.eos_token_id)
    return [make_batch(windows[i: i + batch_size], eos) for i in range(0, len(windows), batch_size)]


def describe_data(cfg, vocab_size: int, seq_len: Optional[int] = None) -> dict:
    """What the data is: for synthetic sources the exact entropy rate (nats/token) the fitted E should approach.

    With seq_len, a synthetic description also carries window_loss_bound: the expected loss of an explicit
    predictor that sees one packed window; the best loss of a model with that context lies between the two.
    """
    split = {"split": cfg.split, "student_fraction": cfg.student_fraction, "eval_fraction": cfg.eval_fraction,
             "hash_seed": cfg.hash_seed}
    if cfg.source == "synthetic":
        lang = language_of(cfg, vocab_size)
        extra = {"seq_len": seq_len, "window_loss_bound": lang.window_loss_bound(seq_len)} if seq_len else {}
        return {**lang.describe(), **extra, **split}
    tok = load_tokenizer(cfg.tokenizer)
    check_vocab_fits(tok, vocab_size)
    return {**TextSource(cfg).describe(), "tokenizer": cfg.tokenizer, "tokenizer_vocab": tokenizer_vocab_size(tok),
            "eos_id": int(tok.eos_token_id), "vocab_size": vocab_size, **split}
