"""The paper's 33-size model family, tiny CPU sizes, and their parameter counts N (non-embedding) and N_total."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Optional, Tuple

PAPER_VOCAB = 32768
PAPER_HEAD_DIM = 128  # ours: the paper does not state the head count; head_dim 128 gives n_heads = n_layers
ASPECT_RATIO = 128  # d_model / n_layers, fixed across the paper's family
PAPER_LAYERS = range(8, 41)  # one size per layer count


def ffn_width(d_model: int, multiple: int = 128) -> int:
    """SwiGLU hidden width: 8/3 d_model rounded up to a multiple of `multiple` (paper: 128)."""
    return int(math.ceil(8 * d_model / 3 / multiple) * multiple)


def non_embedding_params(n_layers: int, d_model: int, d_ff: int, n_heads: int, head_dim: int,
                         vocab_size: int = PAPER_VOCAB, qk_norm: bool = True, n_kv_heads: Optional[int] = None,
                         qkv_bias: bool = False, qk_norm_full: bool = False, block_norms: int = 2) -> int:
    """N as the paper counts it: every weight except the vocabulary matrices, norm gains included.

    Per block: attention 2 d (h hd) + 2 d (h_kv hd) (Q, O; K, V; h_kv = h without GQA, i.e. 4 d h hd), with
    qkv_bias (Qwen2) (h + 2 h_kv) hd biases, SwiGLU 3 d d_ff, block_norms gains of d (pre- or post-norm: 2, sandwich
    norms: 4), and
    with QK-norm two gains of size head_dim (shared by all heads; qk_norm_full, OLMo 2: (h + h_kv) hd, one per dim).
    Plus the final norm gain d. `vocab_size` is accepted for a uniform signature; it does not enter N.
    """
    del vocab_size
    kv = n_kv_heads or n_heads
    attn = 2 * d_model * (n_heads + kv) * head_dim + ((n_heads + 2 * kv) * head_dim if qkv_bias else 0)
    ffn = 3 * d_model * d_ff
    norms = block_norms * d_model + (((n_heads + kv) if qk_norm_full else 2) * head_dim if qk_norm else 0)
    return n_layers * (attn + ffn + norms) + d_model


def total_params(n_layers: int, d_model: int, d_ff: int, n_heads: int, head_dim: int,
                 vocab_size: int = PAPER_VOCAB, qk_norm: bool = True, n_kv_heads: Optional[int] = None) -> int:
    """N_total as in the paper's Table 13: N + vocab_size * d_model.

    Table 13 counts ONE vocabulary matrix (e.g. 143M: 0.1434 B + 32768 x 1152 = 0.1811 B), although the model
    has an untied input embedding and output head; the embedding lookup costs no FLOPs, so the head is the matrix
    that counts. `stored_params` gives the number of weights the untied model actually stores.
    """
    n = non_embedding_params(n_layers, d_model, d_ff, n_heads, head_dim, vocab_size, qk_norm, n_kv_heads)
    return n + vocab_size * d_model


def stored_params(n_layers: int, d_model: int, d_ff: int, n_heads: int, head_dim: int,
                  vocab_size: int = PAPER_VOCAB, qk_norm: bool = True, n_kv_heads: Optional[int] = None,
                  tie_embeddings: bool = False) -> int:
    """Weights the model holds (all TP shards together): N + 2 vocab_size d_model (N + vocab_size d_model tied)."""
    n = non_embedding_params(n_layers, d_model, d_ff, n_heads, head_dim, vocab_size, qk_norm, n_kv_heads)
    return n + (1 if tie_embeddings else 2) * vocab_size * d_model


def size_name(n_params: int) -> str:
    """Name a size by its N: three significant figures, 'M' below 1e9 else 'B' (format(x, '.3g'): 2.10B -> '2.1B')."""
    return f"{n_params / 1e6:.3g}M" if n_params < 1e9 else f"{n_params / 1e9:.3g}B"


def _paper_shape(n_layers: int) -> Dict[str, int]:
    d = ASPECT_RATIO * n_layers
    return dict(n_layers=n_layers, d_model=d, n_heads=d // PAPER_HEAD_DIM, head_dim=PAPER_HEAD_DIM,
                d_ff=ffn_width(d), vocab_size=PAPER_VOCAB)


def _n_of(shape: Dict[str, int]) -> int:
    return non_embedding_params(shape["n_layers"], shape["d_model"], shape["d_ff"], shape["n_heads"],
                                shape["head_dim"], shape["vocab_size"])


def _tiny(n_layers, d_model, n_heads, vocab_size) -> Dict[str, int]:
    # d_ff: 8/3 d rounded up to a multiple of 64 (keeps it divisible by tp_size 1, 2, 4 at tiny widths)
    return dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, head_dim=d_model // n_heads,
                d_ff=ffn_width(d_model, 64), vocab_size=vocab_size)


# Tiny CPU sizes: the name is the approximate N; n_heads divisible by 4 and vocab by 4 so TP=2 and TP=4 work.
_TINY = OrderedDict([
    ("tiny-0.5M", _tiny(2, 128, 4, 512)),  # N = 0.43M, head_dim 32
    ("tiny-1M", _tiny(5, 128, 4, 512)),  # N = 1.07M, head_dim 32
    ("tiny-2M", _tiny(6, 160, 4, 512)),  # N = 1.91M, head_dim 40
    ("tiny-5M", _tiny(6, 256, 8, 1024)),  # N = 4.82M, head_dim 32
    ("tiny-10M", _tiny(6, 384, 12, 1024)),  # N = 10.6M, head_dim 32
    ("tiny-20M", _tiny(6, 512, 8, 1024)),  # N = 19.3M, head_dim 64
])

# Paper sizes, 8..40 layers, named by size_name(N): this reproduces every name printed in Table 13
# ("103M", "143M", ..., "975M", "1.82B", ..., "12.6B") and names the unprinted rows the same way ("1.15B").
SIZES: "OrderedDict[str, Dict[str, int]]" = OrderedDict(
    [(size_name(_n_of(_paper_shape(L))), _paper_shape(L)) for L in PAPER_LAYERS] + list(_TINY.items()))

PAPER_SIZES: Tuple[str, ...] = tuple(k for k in SIZES if not k.startswith("tiny-"))
TINY_SIZES: Tuple[str, ...] = tuple(_TINY)


def get_size(name: str) -> Dict[str, int]:
    """Shape fields (n_layers, d_model, n_heads, head_dim, d_ff, vocab_size) of a named size, as a fresh dict."""
    try:
        return dict(SIZES[name])
    except KeyError:
        raise KeyError(f"unknown size {name!r}; known: {', '.join(SIZES)}") from None


def block_norms(model_cfg) -> int:
    """Norm gains of d_model per block: 2 (pre- or post-norm), 4 (sandwich, Gemma 3)."""
    return 4 if getattr(model_cfg, "norm_position", "pre") == "sandwich" else 2


def params_of(model_cfg) -> Tuple[int, int]:
    """(N, N_total) of a resolved ModelConfig (any object with the shape fields and qk_norm)."""
    args = (model_cfg.n_layers, model_cfg.d_model, model_cfg.d_ff, model_cfg.n_heads, model_cfg.head_dim,
            model_cfg.vocab_size, getattr(model_cfg, "qk_norm", True), getattr(model_cfg, "n_kv_heads", 0) or None)
    n = non_embedding_params(*args, qkv_bias=bool(getattr(model_cfg, "qkv_bias", False)),
                             qk_norm_full=getattr(model_cfg, "qk_norm_scope", "head") == "full",
                             block_norms=block_norms(model_cfg))
    return n, n + model_cfg.vocab_size * model_cfg.d_model  # total_params: N + one vocabulary matrix
