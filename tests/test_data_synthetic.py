"""The synthetic Markov language: determinism, the sampled law, and its exact entropy rate vs Monte Carlo."""
import math

import numpy as np
import pytest

from megadistill.config import DataConfig
from megadistill.data import build_eval_batches, describe_data
from megadistill.data.synthetic import EOS, MarkovLanguage
from megadistill.errors import UserError


def _stream_contexts(lang, stream):
    """Order-k contexts of every stream position (EOS-padded at document starts) and its in-document position.

    The stream starts at a document start; returns ctx [N, k] and pos_in_doc [N] (pos == L means EOS).
    """
    cycle, k = lang.doc_len + 1, lang.order
    pos = np.arange(len(stream)) % cycle
    ctx = np.full((len(stream), k), EOS, dtype=np.int64)
    for j in range(1, k + 1):  # ctx[:, k - j] is the token j back, if it lies inside the same document
        back = np.roll(stream, j)
        ctx[:, k - j] = np.where(pos >= j, back, EOS)
    return ctx, pos


def test_documents_are_pure_functions_of_their_index():
    lang = MarkovLanguage(97, order=2, branching=5, zipf=1.2, seed=7, doc_len=40)
    docs = lang.documents(np.arange(50))
    assert docs.shape == (50, 40) and docs.dtype == np.int64
    assert docs.min() >= 1 and docs.max() <= 96  # EOS (0) never inside a document
    np.testing.assert_array_equal(lang.documents([37, 3]), docs[[37, 3]])
    np.testing.assert_array_equal(MarkovLanguage(97, 2, 5, 1.2, 7, 40).documents([12]), docs[[12]])
    assert not np.array_equal(MarkovLanguage(97, 2, 5, 1.2, 8, 40).documents([12]), docs[[12]])
    withe = lang.documents_with_eos([5])
    assert withe.shape == (1, 41) and withe[0, -1] == EOS


@pytest.mark.parametrize("order", [1, 2])
def test_sampled_transitions_follow_the_stated_chain(order):
    """Empirical next-token frequencies per context (start distribution included) match next_token_probs."""
    lang = MarkovLanguage(13, order=order, branching=3, zipf=1.0, seed=3, doc_len=24)
    docs = lang.documents(np.arange(4000))
    stream = lang.documents_with_eos(np.arange(4000)).reshape(-1)
    ctx, pos = _stream_contexts(lang, stream)
    keep = pos < lang.doc_len
    ctx, nxt = ctx[keep], stream[keep]
    keys = ctx @ (lang.vocab_size ** np.arange(order))
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    counts = np.zeros((len(uniq), lang.vocab_size))
    np.add.at(counts, (inverse, nxt), 1)
    n = counts.sum(1, keepdims=True)
    probs = lang.next_token_probs(ctx[first])
    busy = n[:, 0] >= 400
    assert busy.sum() >= 10
    sem = np.sqrt(probs[busy] * (1 - probs[busy]) / n[busy])  # binomial standard error per entry
    assert (np.abs(counts[busy] / n[busy] - probs[busy]) <= 5 * sem + 1e-12).all()
    assert (counts[probs == 0]).sum() == 0  # never a token off the context's successor set
    start = np.bincount(docs[:, 0], minlength=lang.vocab_size) / len(docs)
    np.testing.assert_allclose(start, lang.next_token_probs(np.zeros((1, order), np.int64))[0], atol=0.03)


def test_successor_sets_are_distinct_and_log_prob_inverts_them():
    lang = MarkovLanguage(1000, order=3, branching=16, zipf=1.1, seed=5)  # n = 999 = 27 x 37: strides must be units
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, 1000, size=(500, 3))
    succ = lang.successors(ctx)
    assert all(len(set(row)) == 16 for row in succ.tolist())
    probs = lang.next_token_probs(ctx)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=0, atol=1e-12)
    assert (probs[:, EOS] == 0).all()
    lp = lang.log_prob(np.repeat(ctx, 16, 0), succ.reshape(-1)).reshape(500, 16)
    np.testing.assert_allclose(lp, np.broadcast_to(lang.log_probs, lp.shape))
    off = rng.integers(1, 1000, size=500)
    with np.errstate(divide="ignore"):
        expect = np.log(probs[np.arange(500), off])  # -inf off the successor set
    np.testing.assert_allclose(lang.log_prob(ctx, off), expect)


def test_entropy_rate_matches_monte_carlo_on_the_packed_stream():
    """-log p of the true model over packed windows (docs + EOS, starts included) averages to entropy_rate."""
    cfg = DataConfig(synthetic_order=2, synthetic_branching=6, synthetic_zipf=0.9, synthetic_doc_len=30,
                     synthetic_seed=11)
    seq_len, vocab = 64, 64
    batches = build_eval_batches(cfg, vocab_size=vocab, seq_len=seq_len, n_tokens=200_000, batch_size=64)
    windows = np.concatenate([np.concatenate([b["input_ids"].numpy(), b["labels"].numpy()[:, -1:]], 1)
                              for b in batches])
    np.testing.assert_array_equal(windows[1:, 0], windows[:-1, -1])  # windows share their boundary token
    stream = np.concatenate([windows[0], windows[1:, 1:].reshape(-1)])
    lang = MarkovLanguage(vocab, 2, 6, 0.9, 11, 30)
    ctx, pos = _stream_contexts(lang, stream)
    is_eos_slot = pos == lang.doc_len
    np.testing.assert_array_equal(stream == EOS, is_eos_slot)  # EOS exactly every L + 1 tokens
    p = lang.next_token_probs(ctx[~is_eos_slot])[np.arange((~is_eos_slot).sum()), stream[~is_eos_slot]]
    nll = np.zeros(len(stream))
    nll[~is_eos_slot] = -np.log(p)  # the EOS slots cost 0: the predictor counts the document's tokens
    mean, sem = nll.mean(), nll.std() / math.sqrt(len(nll))
    assert sem < 0.005
    assert abs(mean - lang.entropy_rate) < 4 * sem, (mean, lang.entropy_rate, sem)
    assert abs(mean - lang.step_entropy) > 8 * sem  # the EOS positions matter at this resolution
    info = describe_data(cfg, vocab)
    assert info["entropy_rate"] == pytest.approx(lang.entropy_rate) and info["eos_id"] == EOS
    h = -(lang.probs * np.log(lang.probs)).sum()
    assert lang.entropy_rate == pytest.approx(30 * h / 31)


def _window_predictor_loss(lang, windows, seq_len):
    """Loop-based reference of the offset-agnostic window-only predictor of window_loss_bound (order 1)."""
    cycle, last = lang.doc_len + 1, lang.doc_len
    offsets = list(range(0, cycle, math.gcd(seq_len, cycle)))
    first = [(last - o) % cycle for o in offsets]
    total, count = 0.0, 0
    for w in windows:
        since_eos = None  # tokens since the last seen EOS
        for p in range(1, seq_len + 1):
            if w[p - 1] == EOS:
                since_eos = 0
            elif since_eos is not None:
                since_eos += 1
            tok = w[p]
            if since_eos is not None:  # exact: EOS iff the document is complete
                if since_eos == lang.doc_len:
                    assert tok == EOS
                    continue
                loss = -lang.log_prob(np.array([[w[p - 1]]]), np.array([tok]))[0]
            else:
                risk = sum(f >= p for f in first)
                hz = sum(f == p for f in first) / risk
                if tok == EOS:
                    loss = -math.log(hz)
                else:
                    loss = -math.log1p(-hz) - lang.log_prob(np.array([[w[p - 1]]]), np.array([tok]))[0]
            total += loss
            count += 1
    return total / (len(windows) * seq_len)


def test_window_loss_bound_matches_the_explicit_window_predictor():
    cfg = DataConfig(synthetic_order=1, synthetic_branching=4, synthetic_zipf=1.0, synthetic_doc_len=20)
    lang = MarkovLanguage(32, 1, 4, 1.0, cfg.synthetic_seed, 20)
    seq_len = 16  # gcd(16, 21) = 1: offsets cycle through all 21 positions every 21 windows
    batches = build_eval_batches(cfg, vocab_size=32, seq_len=seq_len, n_tokens=21 * 60 * seq_len, batch_size=256)
    windows = np.concatenate([np.concatenate([b["input_ids"].numpy(), b["labels"].numpy()[:, -1:]], 1)
                              for b in batches])
    assert len(windows) == 21 * 60
    mc = _window_predictor_loss(lang, windows, seq_len)
    bound = lang.window_loss_bound(seq_len)
    assert bound > lang.entropy_rate + 0.05  # short windows pay for not knowing where documents end
    assert mc == pytest.approx(bound, abs=0.03)
    assert lang.window_loss_bound(42) == pytest.approx(lang.entropy_rate, abs=1e-12)  # 21 | 42: aligned
    info = describe_data(cfg, 32, seq_len=seq_len)
    assert info["window_loss_bound"] == pytest.approx(bound)


def test_bad_language_settings_are_user_errors():
    with pytest.raises(UserError, match="synthetic_branching"):
        MarkovLanguage(8, branching=8)
    with pytest.raises(UserError, match="vocab_size"):
        MarkovLanguage(1)
