"""A seeded sparse order-k Markov language whose packed token stream has an exactly known entropy rate."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from megadistill.errors import UserError

EOS = 0  # token 0 ends every synthetic document; the chain itself only emits tokens 1..V-1

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def mix64(x) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-mixing hash of uint64 arrays (stable across platforms)."""
    x = np.array(x, dtype=np.uint64, copy=True)  # arrays wrap on overflow silently (scalars would warn)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def seed_hash(*parts: int) -> np.ndarray:
    """Fold integers into one uint64 (as a 1-element array) by chained mixing; order matters."""
    h = np.zeros(1, dtype=np.uint64)
    for p in parts:
        h = mix64(h ^ np.array([int(p) & _MASK64], dtype=np.uint64))
    return h


def uniform01(h: np.ndarray) -> np.ndarray:
    """Map uint64 hashes to floats in [0, 1) using the top 53 bits."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_permutation(n: int, *parts: int) -> np.ndarray:
    """A permutation of range(n) that is a pure function of `parts` (argsort of hashed ranks)."""
    return np.argsort(mix64(seed_hash(*parts) + np.arange(n, dtype=np.uint64) * _GOLDEN), kind="stable")


class MarkovLanguage:
    """Sparse random order-k Markov chain over tokens 1..V-1 with Zipf transitions, cut into EOS-terminated documents.

    Context -> successors: the context (the last k tokens of the document, left-padded with EOS at the
    document start) is hashed to a base a and a stride m coprime with n = V - 1; its successors are the
    `branching` distinct tokens 1 + (a + j m) mod n, j = 0..b-1, with probabilities w_j ~ (j+1)^-zipf.
    Start distribution: the first token of a document is drawn from the successors of the all-EOS context
    (EOS, ..., EOS), i.e. the same Zipf law over its own b hashed successors.

    Because every context (the start included) has the same Zipf law over b *distinct* successors, the
    conditional entropy of every in-document token is H_b = -sum_j w_j log w_j, whatever the context or
    its probability. The packed stream is doc_len tokens then EOS, repeated; with the full history the
    EOS is certain (loss 0, the position in the document is known) and the first token of the next
    document costs H_b. So the entropy rate is exactly L H_b / (L + 1) nats/token for any order and vocab.

    Document i is a pure function of (seed, i): its uniforms are hashes of (seed, i, t), so any document
    can be regenerated alone and any batch of documents is generated with vectorised numpy.
    """

    def __init__(self, vocab_size: int, order: int = 1, branching: int = 8, zipf: float = 1.1,
                 seed: int = 1234, doc_len: int = 256):
        if vocab_size < 2:
            raise UserError(f"synthetic language needs model.vocab_size >= 2 (EOS + one token), got {vocab_size}")
        if order < 1:
            raise UserError(f"data.synthetic_order={order} must be >= 1")
        if not 1 <= branching <= vocab_size - 1:
            raise UserError(f"data.synthetic_branching={branching} must be in [1, model.vocab_size - 1 = {vocab_size - 1}]")
        if zipf < 0:
            raise UserError(f"data.synthetic_zipf={zipf} must be >= 0 (0 = uniform successors)")
        if doc_len < 1:
            raise UserError(f"data.synthetic_doc_len={doc_len} must be >= 1")
        self.vocab_size, self.order, self.branching, self.zipf = vocab_size, order, branching, zipf
        self.seed, self.doc_len = seed, doc_len
        self.n = vocab_size - 1  # non-EOS tokens
        w = np.arange(1, branching + 1, dtype=np.float64) ** -zipf
        self.probs = w / w.sum()  # [b] successor j has probability probs[j]
        self.log_probs = np.log(self.probs)
        self.cdf = np.cumsum(self.probs)
        self.cdf[-1] = 1.0
        # Strides coprime with n make j -> a + j m (mod n) injective, so the b successors are distinct.
        self.units = np.flatnonzero(np.gcd(np.arange(self.n), self.n) == 1).astype(np.int64)
        self._ctx_seed = seed_hash(seed, 0xC0)
        self._doc_seed = seed_hash(seed, 0xD0)
        self._inv_units: Optional[np.ndarray] = None
        self._tables = self._context_params(np.arange(vocab_size)[:, None]) if order == 1 else None

    # ---- entropy ---------------------------------------------------------------------------------
    @property
    def step_entropy(self) -> float:
        """H_b: entropy (nats) of the next in-document token given any context."""
        return float(-(self.probs * self.log_probs).sum())

    @property
    def entropy_rate(self) -> float:
        """Exact entropy rate (nats/token) of the packed stream doc, EOS, doc, EOS, ...: L H_b / (L + 1)."""
        return self.doc_len * self.step_entropy / (self.doc_len + 1)

    def window_loss_bound(self, seq_len: int) -> float:
        """Expected loss of an explicit predictor that sees only one packed window: an upper bound on the
        best loss of a model with that context, which itself is >= entropy_rate.

        Windows start every seq_len tokens, so every stream token is a label exactly once and a window's
        offset o in the (L + 1)-token document cycle is uniform over the multiples of g = gcd(seq_len, L + 1).
        Until an EOS appears among its inputs the predictor does not know where the document ends: it gives
        EOS the hazard P(first EOS at p | none before p) under that offset prior and the chain's law times
        (1 - hazard) to the rest; after the first EOS it is the Bayes predictor. The first k - 1 labels of a
        window lack part of their order-k context; there it spreads (1 - hazard) uniformly over the V - 1
        tokens. With order 1 and L + 1 dividing seq_len this equals entropy_rate.
        """
        cycle, last = self.doc_len + 1, self.doc_len  # cycle position `last` is the EOS
        offsets = np.arange(0, cycle, math.gcd(seq_len, cycle))  # [O] equally likely window offsets
        first_eos = (last - offsets) % cycle  # [O] window position of the first EOS (may be > seq_len)
        p = np.arange(1, seq_len + 1)  # [S] label positions; their inputs are window positions 0..p-1
        unseen = first_eos[None, :] >= p[:, None]  # [S, O] no EOS among the inputs yet
        is_eos = first_eos[None, :] == p[:, None]  # [S, O] the label is that first EOS
        hazard = is_eos.sum(1) / np.maximum(unseen.sum(1), 1)  # [S]
        with np.errstate(divide="ignore"):
            eos_loss, stay_loss = -np.log(hazard), -np.log1p(-hazard)  # [S]
        token_loss = np.where(p >= self.order, self.step_entropy, math.log(self.n))  # [S] context cut if p < k
        later_eos = ((offsets[None, :] + p[:, None]) % cycle) == last  # [S, O] EOS after the first: certain
        loss = np.where(unseen, np.where(is_eos, eos_loss[:, None], (stay_loss + token_loss)[:, None]),
                        np.where(later_eos, 0.0, self.step_entropy))
        return float(loss.mean())

    # ---- transition structure -------------------------------------------------------------------
    def _context_hash(self, ctx: np.ndarray) -> np.ndarray:
        h = np.broadcast_to(self._ctx_seed, ctx.shape[:1]).copy()  # [D]
        for j in range(ctx.shape[1]):
            h = mix64(h ^ ctx[:, j].astype(np.uint64))
        return h

    def _context_params(self, ctx: np.ndarray):
        """(base a, stride m) of each context row; ctx: [D, k] tokens (EOS-padded at document starts)."""
        h = self._context_hash(ctx)
        base = (h % np.uint64(self.n)).astype(np.int64)
        stride = self.units[(mix64(h ^ _GOLDEN) % np.uint64(len(self.units))).astype(np.int64)]
        return base, stride

    def _params(self, ctx: np.ndarray):
        if self._tables is not None:  # order 1: per-token lookup tables
            return self._tables[0][ctx[:, 0]], self._tables[1][ctx[:, 0]]
        return self._context_params(ctx)

    def successors(self, ctx: np.ndarray) -> np.ndarray:
        """Successor tokens of each context, most probable first; ctx: [D, k] -> [D, b]."""
        base, stride = self._params(np.asarray(ctx, dtype=np.int64))
        j = np.arange(self.branching)
        return (base[:, None] + j[None, :] * stride[:, None]) % self.n + 1

    def next_token_probs(self, ctx: np.ndarray) -> np.ndarray:
        """Dense next-token distribution of each in-document context; ctx: [D, k] -> [D, V] (EOS gets 0)."""
        succ = self.successors(ctx)
        out = np.zeros((succ.shape[0], self.vocab_size))
        np.put_along_axis(out, succ, np.broadcast_to(self.probs, succ.shape), axis=1)
        return out

    def log_prob(self, ctx: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """log P(token | context) for in-document positions by inverting j = (t - 1 - a) / m mod n; -inf off-support."""
        if self._inv_units is None:
            self._inv_units = np.array([pow(int(m), -1, self.n) if self.n > 1 else 0 for m in self.units])
        ctx = np.asarray(ctx, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        base, stride = self._params(ctx)
        inv = self._inv_units[np.searchsorted(self.units, stride)]
        j = ((tokens - 1 - base) % self.n) * inv % self.n
        ok = (tokens >= 1) & (j < self.branching)
        return np.where(ok, self.log_probs[np.minimum(j, self.branching - 1)], -np.inf)

    # ---- generation ------------------------------------------------------------------------------
    def documents(self, indices) -> np.ndarray:
        """Documents with the given indices, without EOS: [D] int -> [D, doc_len] int64 tokens in 1..V-1."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        d, L, k = idx.size, self.doc_len, self.order
        doc_h = mix64(self._doc_seed ^ mix64(idx.astype(np.uint64)))  # [D]
        t = np.arange(L, dtype=np.uint64)
        u = uniform01(mix64(doc_h[:, None] + (t[None, :] + np.uint64(1)) * _GOLDEN))  # [D, L]
        rank = np.minimum(np.searchsorted(self.cdf, u, side="right"), self.branching - 1)  # [D, L] Zipf draws
        out = np.empty((d, L), dtype=np.int64)
        ctx = np.full((d, k), EOS, dtype=np.int64)  # [D, k] EOS padding = document start
        for step in range(L):
            base, stride = self._params(ctx)
            tok = (base + rank[:, step] * stride) % self.n + 1
            out[:, step] = tok
            if k > 1:
                ctx[:, :-1] = ctx[:, 1:]
            ctx[:, -1] = tok
        return out

    def documents_with_eos(self, indices) -> np.ndarray:
        """[D] -> [D, doc_len + 1]: each document followed by its EOS, the unit of the packed stream."""
        docs = self.documents(indices)
        return np.concatenate([docs, np.full((docs.shape[0], 1), EOS, dtype=np.int64)], axis=1)

    def describe(self) -> dict:
        return {"source": "synthetic", "entropy_rate": self.entropy_rate, "step_entropy": self.step_entropy,
                "vocab_size": self.vocab_size, "eos_id": EOS, "order": self.order, "branching": self.branching,
                "zipf": self.zipf, "doc_len": self.doc_len, "seed": self.seed,
                "start_distribution": "Zipf over the successors of the all-EOS context"}
