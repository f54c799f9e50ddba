"""The paper's 33-size model family, tiny CPU sizes, and their parameter counts N (non-embedding) and N_total."""
from __future__ import annotations

import math
from collections import OrderedDict
from types import SimpleNamespace
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
    """N as the paper counts it: every weight except the vocabulary matrices, norm gains included (param_counts for
    the shape given field by field: block_norms 4 is a sandwich block).

    Per block: attention 2 d (h hd) + 2 d (h_kv hd) (Q, O; K, V; h_kv = h without GQA, i.e. 4 d h hd), with
    qkv_bias (Qwen2) (h + 2 h_kv) hd biases, SwiGLU 3 d d_ff, block_norms gains of d (pre- or post-norm: 2, sandwich
    norms: 4), and
    with QK-norm two gains of size head_dim (shared by all heads; qk_norm_full, OLMo 2: (h + h_kv) hd, one per dim).
    Plus the final norm gain d. `vocab_size` is accepted for a uniform signature; it does not enter N.
    """
    m = SimpleNamespace(n_layers=n_layers, d_model=d_model, d_ff=d_ff, n_heads=n_heads, head_dim=head_dim,
                        vocab_size=vocab_size, qk_norm=qk_norm, n_kv_heads=n_kv_heads, qkv_bias=qkv_bias,
                        qk_norm_scope="full" if qk_norm_full else "head",
                        norm_position="sandwich" if block_norms == 4 else "pre")
    c = param_counts(m)
    return c["matrices"] + c["vectors"]


def kv_layout(n_kv_heads: int, tp: int) -> Optional[str]:
    """How tp TP ranks hold n_kv_heads key/value heads: "split" (tp divides them: a share each), "replicated" (fewer
    heads than ranks, tp a multiple of them: every rank keeps all, parallel.layers.HeadReplicatedLinear), or None
    (neither: no layout). The one rule the config, the teacher checks, the planner and the model read."""
    if n_kv_heads % tp == 0:
        return "split"
    return "replicated" if tp % n_kv_heads == 0 else None


def block_norms(model_cfg) -> int:
    """Norm gains of d_model per block: 2 (pre- or post-norm), 4 (sandwich, Gemma 3)."""
    return 4 if getattr(model_cfg, "norm_position", "pre") == "sandwich" else 2


def param_counts(m, tp: int = 1) -> Dict[str, int]:
    """Elements of model config m that one of tp TP ranks stores, by kind: "matrices" (Q, K, V, O and the FFN's),
    "vectors" (norm gains and biases, linear biases) and "vocab" (ONE vocabulary matrix: the embedding or the head).
    At tp=1 N = matrices + vectors (the paper's non-embedding count; N_total adds vocab).

    Split over TP: Q, O, the FFN matrices and their column biases, the vocabulary, a full-width QK-norm's gains.
    Replicated: norm gains (and LayerNorm biases), the biases of O and of the FFN's down projection, K and V with
    their biases when there are fewer key/value heads than ranks (parallel.layers.HeadReplicatedLinear).
    Per block: attention 2 d h hd + 2 d h_kv hd; FFN 3 d d_ff (gated) or 2 d d_ff (plain MLP); block_norms norms of d
    (a LayerNorm: gain and bias; OLMo 1's: none); QK-norm 2 hd (per head) or (h + h_kv) hd (full width); biases
    (h + 2 h_kv) hd on Q/K/V, d on O, d_ff (x2 gated) + d on the FFN. Plus the final norm. A mixture of E experts
    (model.moe_experts): E FFNs and an [E, d] router per block, the router replicated over TP; a shared expert
    (model.moe_shared_ff = f_s: Qwen2-MoE) adds 3 d f_s, split, and its [1, d] gate, replicated.
    """
    g = lambda key, default: getattr(m, key, default)  # noqa: E731 (any object with the shape fields)
    h, hd, d, f, n_layers = m.n_heads, m.head_dim, m.d_model, m.d_ff, m.n_layers
    kv = g("n_kv_heads", 0) or h
    kv_tp = 1 if kv_layout(kv, tp) == "replicated" else tp  # fewer key/value heads than ranks: K, V replicated
    gated = g("ffn_gated", True)
    ffn_in = 2 if gated else 1  # column matrices of the FFN (gate and up, or one)
    experts = g("moe_experts", 0)
    ffn = (ffn_in + 1) * d * f // tp * max(experts, 1) + experts * d  # a mixture: its experts and its router (whole)
    ffn += 3 * d * g("moe_shared_ff", 0) // tp + (d if g("moe_shared_ff", 0) else 0)  # a shared expert and its gate
    matrices = n_layers * (2 * d * h * hd // tp + 2 * d * kv * hd // kv_tp + ffn)
    per_norm = d * {"layer": 2, "layer_noaffine": 0}.get(g("norm_type", "rms"), 1)  # gain (and bias), or none
    qk = 0
    if g("qk_norm", True):
        qk = (h * hd // tp + kv * hd // tp) if g("qk_norm_scope", "head") == "full" else 2 * hd
    biases = ((h * hd // tp + 2 * kv * hd // kv_tp) if g("qkv_bias", False) else 0) + (d if g("o_bias", False) else 0)
    biases += (ffn_in * f // tp + d) if g("ffn_bias", False) else 0
    vectors = n_layers * (block_norms(m) * per_norm + qk + biases) + per_norm
    return {"matrices": matrices, "vectors": vectors, "vocab": m.vocab_size * d // tp}


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


def active_params(model_cfg) -> int:
    """N of the weights one token's forward multiplies by: params_of's N, less the experts a mixture of experts does
    not route it to (moe_experts - moe_top_k per block). The compute counts (F(N), MFU, FLOPs records) use it."""
    n = params_of(model_cfg)[0]
    experts = getattr(model_cfg, "moe_experts", 0)
    if experts:
        n -= model_cfg.n_layers * (experts - model_cfg.moe_top_k) * 3 * model_cfg.d_model * model_cfg.d_ff
    return n


def params_of(model_cfg) -> Tuple[int, int]:
    """(N, N_total) of a resolved ModelConfig (any object with the shape fields and qk_norm)."""
    c = param_counts(model_cfg)
    n = c["matrices"] + c["vectors"]
    return n, n + c["vocab"]  # total_params: N + one vocabulary matrix
