"""Packing: EOS-terminated token documents concatenated and cut into (seq_len + 1)-token windows, resumably."""
from __future__ import annotations

import logging
from collections import deque
from typing import Deque, Iterator, List, Optional, Tuple

import numpy as np
import torch

from megadistill.data.split import Splitter, split_code
from megadistill.data.tokenizer import encode_batch
from megadistill.errors import UserError

log = logging.getLogger(__name__)

# A label the losses skip (megadistill.parallel.vocab_parallel.IGNORE_INDEX, torch's cross-entropy default).
IGNORE_LABEL = -100


def doc_ids_of(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """Document number of each input position within its window: EOS tokens seen strictly before it.

    inputs: [b, s] -> [b, s] int64. An EOS belongs to the document it ends, so the token after it
    starts document d + 1; position 0 is document 0 (often the tail of a document begun earlier).
    """
    is_eos = (inputs == eos_id).astype(np.int64)
    return np.cumsum(is_eos, axis=1) - is_eos


def make_batch(windows: np.ndarray, eos_id: int) -> dict:
    """[b, s + 1] token windows -> {"input_ids", "labels", "doc_ids"}: CPU LongTensors [b, s]."""
    windows = np.ascontiguousarray(windows, dtype=np.int64)
    inputs, labels = windows[:, :-1], windows[:, 1:]
    return {"input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
            "doc_ids": torch.from_numpy(doc_ids_of(inputs, eos_id))}


def pad_batch(batch: dict, rows: int) -> dict:
    """`batch` grown to `rows` rows by repeating its first row with every label IGNORE_LABEL.

    The extra rows are computed and never counted, so a forward keeps one shape (one compiled graph) for the
    whole eval set while the losses over it are unchanged.
    """
    b = batch["input_ids"].shape[0]
    if b >= rows:
        return batch
    out = {k: torch.cat([v, v[:1].expand(rows - b, *v.shape[1:])]) for k, v in batch.items()}
    out["labels"][b:] = IGNORE_LABEL
    return out


# A document stream yields (resume_state, tokens with EOS); restart(state) makes the next item the
# document that state was recorded for.
DocItem = Tuple[dict, np.ndarray]


class TokenizedDocStream:
    """Documents of one split and one DP rank's share, tokenized with EOS appended, in source order.

    Split documents are dealt to DP ranks round-robin (the j-th split document goes to rank j mod dp),
    so ranks tokenize disjoint documents. With wrap=True the source is replayed forever with an epoch
    counter (logged); an epoch that gives this rank no document is an error rather than a hang.
    Resume state of a document: {"epoch", "position" (source row), "count" (split documents before it
    in this epoch), "resume" (the `datasets` iterator state of that row, or None)}.
    """

    def __init__(self, source, tokenizer, splitter: Splitter, split: str,
                 dp_rank: int = 0, dp_size: int = 1, wrap: bool = True, batch_docs: int = 64):
        self.source = source  # a TextSource; owned by this stream (its dataset iterator state is tracked)
        self.tokenizer, self.eos_id = tokenizer, int(tokenizer.eos_token_id)
        self.splitter, self.split, self.code = splitter, split, split_code(split)
        self.dp_rank, self.dp_size, self.wrap, self.batch_docs = dp_rank, dp_size, wrap, batch_docs
        self._it: Iterator[DocItem] = self._generate({"epoch": 0, "position": 0, "count": 0, "resume": None})

    def restart(self, state: dict) -> None:
        self._it = self._generate(dict(state))

    def __iter__(self):
        return self

    def __next__(self) -> DocItem:
        return next(self._it)

    def _generate(self, state: dict) -> Iterator[DocItem]:
        epoch, start, count, resume = state["epoch"], state["position"], state["count"], state.get("resume")
        while True:
            mine = 0
            pending: List[Tuple[dict, str]] = []
            for doc in self.source.documents(start, resume):
                if self.splitter.split_of_key(doc.key) != self.split:
                    continue
                c, count = count, count + 1
                if c % self.dp_size != self.dp_rank:
                    continue
                pending.append(({"epoch": epoch, "position": doc.position, "count": c, "resume": doc.resume},
                                doc.text))
                if len(pending) == self.batch_docs:
                    mine += len(pending)
                    yield from self._encode(pending)
                    pending = []
            mine += len(pending)
            yield from self._encode(pending)
            if start == 0 and count == 0 and mine == 0:
                raise UserError(f"the {self.split!r} split of {self.source.describe()} has no documents "
                                f"(check data.student_fraction / data.eval_fraction and the data files)")
            if start == 0 and mine == 0:
                raise UserError(f"the {self.split!r} split has only {count} documents, none for dp rank "
                                f"{self.dp_rank} of {self.dp_size}: add data or use fewer data-parallel ranks")
            if not self.wrap:
                return
            epoch, start, count, resume = epoch + 1, 0, 0, None
            log.info("data: %s split, dp rank %d: source exhausted, starting epoch %d", self.split, self.dp_rank, epoch)

    def _encode(self, pending: List[Tuple[dict, str]]) -> Iterator[DocItem]:
        ids = encode_batch(self.tokenizer, [text for _, text in pending])
        for (state, _), tokens in zip(pending, ids):
            yield state, np.append(tokens, np.int64(self.eos_id))


class StreamPacker:
    """Concatenates a document stream and cuts windows of seq_len + 1 tokens every seq_len tokens.

    Consecutive windows share their boundary token (the last label of one window is the first input of
    the next), so every stream token after the first is a label exactly once. The pending buffer holds
    the documents not yet fully consumed; the resume state is the first pending document's state plus
    how many of its tokens are consumed, so a restored packer re-reads and re-tokenizes from that
    document and yields exactly the same next window.
    """

    def __init__(self, stream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self._pending: Deque[List] = deque()  # [state, tokens, consumed]
        self._available = 0  # unconsumed tokens in _pending

    def _pull(self) -> bool:
        try:
            state, tokens = next(self.stream)
        except StopIteration:
            return False
        self._pending.append([state, tokens, 0])
        self._available += len(tokens)
        return True

    def next_window(self) -> Optional[np.ndarray]:
        """The next [seq_len + 1] tokens (consuming seq_len), or None when a non-wrapping stream ends."""
        window = self.seq_len + 1
        while self._available < window:
            if not self._pull():
                return None
        out = np.empty(window, dtype=np.int64)
        filled, i = 0, 0
        while filled < window:  # copy window tokens from the head, consuming only the first seq_len
            item = self._pending[i]
            tokens, used = item[1], item[2]
            take = min(window - filled, len(tokens) - used)
            out[filled: filled + take] = tokens[used: used + take]
            filled += take
            i += 1
        left = self.seq_len
        while left:
            item = self._pending[0]
            take = min(left, len(item[1]) - item[2])
            item[2] += take
            left -= take
            if item[2] == len(item[1]):
                self._pending.popleft()
        self._available -= self.seq_len
        return out

    def state_dict(self) -> dict:
        if not self._pending and not self._pull():
            return {"doc": None, "offset": 0}
        state, _, used = self._pending[0]
        return {"doc": state, "offset": int(used)}

    def load_state_dict(self, d: dict) -> None:
        if d.get("doc") is None:
            raise UserError("data loader state has no document position (it was saved from an exhausted stream)")
        self._pending.clear()
        self._available = 0
        self.stream.restart(d["doc"])
        if not self._pull():
            raise UserError("data loader state points past the end of the data source; did the data files change?")
        self._pending[0][2] = int(d["offset"])
        self._available -= int(d["offset"])
