"""Disjoint teacher / student / eval splits decided by a stable, salted hash of each document's key."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterable

import numpy as np

from megadistill.data.synthetic import mix64, seed_hash, uniform01
from megadistill.errors import UserError

SPLITS = ("teacher", "student", "eval")
TEACHER, STUDENT, EVAL = 0, 1, 2  # split codes


def text_key(text: str) -> str:
    """Stable key of a text document: a hash of its text, so duplicates (and renamed files) share one split."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def key_score(key: str, hash_seed: int) -> float:
    """A uniform number in [0, 1) that is a pure function of (key, hash_seed): blake2b keyed by the salt."""
    salt = str(int(hash_seed)).encode()
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=salt).digest()
    return (int.from_bytes(digest, "little") >> 11) * (1.0 / (1 << 53))


def index_scores(indices: np.ndarray, hash_seed: int) -> np.ndarray:
    """Scores of integer keys (synthetic document indices), vectorised: splitmix64 of (salt, index)."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    return uniform01(mix64(seed_hash(hash_seed, 0x5B1) ^ mix64(idx)))


class Splitter:
    """Maps a score u in [0, 1) to a split: eval = [0, f_eval), student = [f_eval, f_student), teacher = the rest.

    The eval split is carved from the student half, so the student trains on f_student - f_eval of the
    documents, the teacher on 1 - f_student, and no document is in two splits.
    """

    def __init__(self, student_fraction: float, eval_fraction: float, hash_seed: int = 0):
        if not 0 < student_fraction < 1:
            raise UserError(f"data.student_fraction={student_fraction} must be in (0, 1)")
        if not 0 < eval_fraction < student_fraction:
            raise UserError(f"data.eval_fraction={eval_fraction} must be in (0, data.student_fraction)")
        self.student_fraction, self.eval_fraction, self.hash_seed = student_fraction, eval_fraction, hash_seed

    @classmethod
    def from_config(cls, cfg) -> "Splitter":
        return cls(cfg.student_fraction, cfg.eval_fraction, cfg.hash_seed)

    def code_of_scores(self, u: np.ndarray) -> np.ndarray:
        u = np.asarray(u)
        return np.where(u < self.eval_fraction, EVAL, np.where(u < self.student_fraction, STUDENT, TEACHER))

    def split_of_key(self, key: str) -> str:
        return SPLITS[int(self.code_of_scores(key_score(key, self.hash_seed)))]

    def split_of_indices(self, indices: Iterable[int]) -> np.ndarray:
        """Split codes of integer document keys: [D] -> [D] in {TEACHER, STUDENT, EVAL}."""
        return self.code_of_scores(index_scores(np.asarray(indices), self.hash_seed))


def split_code(split: str) -> int:
    if split not in SPLITS:
        raise UserError(f"data split {split!r} is not one of {list(SPLITS)}")
    return SPLITS.index(split)


class SplitIndex:
    """Random access to the m-th integer document key (0, 1, 2, ...) that hashes into one split.

    The keys are scanned in chunks of 2^16; per chunk only the running member count is kept, and the
    member list of the few most recently used chunks is cached, so memory stays O(#chunks) and a jump
    to any ordinal costs one vectorised re-hash of a chunk.
    """

    CHUNK = 1 << 16

    def __init__(self, splitter: Splitter, split: str, cache_chunks: int = 4):
        self.splitter, self.code = splitter, split_code(split)
        self._cum = [0]  # _cum[c] = members in chunks < c
        self._cache: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._cache_chunks = cache_chunks

    def _members(self, chunk: int) -> np.ndarray:
        if chunk in self._cache:
            self._cache.move_to_end(chunk)
            return self._cache[chunk]
        keys = np.arange(chunk * self.CHUNK, (chunk + 1) * self.CHUNK, dtype=np.int64)
        members = keys[self.splitter.split_of_indices(keys) == self.code]
        self._cache[chunk] = members
        if len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        return members

    def lookup(self, ordinals) -> np.ndarray:
        """Integer keys of the given split ordinals: [N] -> [N] int64."""
        ords = np.asarray(ordinals, dtype=np.int64)
        if ords.size == 0:
            return ords.copy()
        if ords.min() < 0:
            raise ValueError("split ordinals must be >= 0")
        while self._cum[-1] <= ords.max():
            self._cum.append(self._cum[-1] + len(self._members(len(self._cum) - 1)))
        cum = np.asarray(self._cum)
        chunks = np.searchsorted(cum, ords, side="right") - 1
        out = np.empty_like(ords)
        for c in np.unique(chunks):
            sel = chunks == c
            out[sel] = self._members(int(c))[ords[sel] - cum[c]]
        return out
