"""FlexAttention backend (model.attention=flex): torch's block-sparse compiled attention kernel for what SDPA can only
take as a dense [s, s] mask -- packed documents and sliding windows -- and for softcapped scores (Gemma 2), which SDPA
cannot apply at all (megadistill.model.attention falls back to explicit [b, h, s, s] scores there).

Block masks are built here from the document runs directly: per row, the first and last run index of each 128-token
block say which (query block, key block) pairs are empty (skipped by the kernel), full (no mask evaluated) or partial
(the per-pair rule below evaluated in the kernel). That is O(b s) work plus O(b (s / 128)^2) flags, where torch's
create_block_mask evaluates the rule on all b s^2 pairs (gigabytes at s = 8192) unless compiled itself.

The per-pair rule is megadistill.model.attention's: j <= i, i - j < window (if any), same run of document ids.

FlexAttention fuses only when compiled: outside a compiled region the kernel is called through its own
torch.compile'd wrapper (one static graph per shape); inside a compiled block (train.compile) the block's graph takes
it in. Its backward has no CPU implementation in torch: on CPU, flex serves inference only (evaluation, writing a
teacher cache); train() refuses it there before building anything (attention.check_backend), and a training forward
says so too.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional

import torch

from megadistill.errors import UserError
from megadistill.model.graphs import with_graph_limit

BLOCK = 128  # FlexAttention's default block (query and key), the granularity of its sparsity


@functools.lru_cache(maxsize=None)
def _compiled_kernel() -> Callable:
    """One static graph per shape and mask rule (student training and evaluation, a teacher of other widths, sliding
    and full blocks), up to GRAPH_LIMIT: past dynamo's default limit of 8 it would run FlexAttention's dense
    reference, O(s^2) memory, with only a warning."""
    from torch.nn.attention.flex_attention import flex_attention
    return with_graph_limit(torch.compile(flex_attention, dynamic=False))


_SOFTCAP_MODS: Dict[float, Callable] = {}


def _softcap_mod(cap: float) -> Callable:
    """score -> cap tanh(score / cap), one function object per cap: the compiled kernel guards on it, so a new one
    per call would recompile (a plain dict, not lru_cache, which dynamo warns of inside a compiled block)."""
    if cap not in _SOFTCAP_MODS:
        def softcap(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / cap) * cap
        _SOFTCAP_MODS[cap] = softcap
    return _SOFTCAP_MODS[cap]


def _pair_rule(segments: Optional[torch.Tensor], window: int) -> Callable:
    """The mask_mod: whether query q_idx of row b may attend to key kv_idx."""
    def allowed(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx
        if window:
            ok = ok & (q_idx - kv_idx < window)
        if segments is not None:
            ok = ok & (segments[b, q_idx] == segments[b, kv_idx])
        return ok
    return allowed


def _sorted_blocks(flags: torch.Tensor):
    """[b, n, n] bool -> (count [b, 1, n], indices [b, 1, n, n]) int32, the flagged key blocks of each query block
    first, in order (BlockMask.from_kv_blocks' layout)."""
    count = flags.sum(-1, dtype=torch.int32)
    order = torch.argsort(flags.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count.unsqueeze(1), order.unsqueeze(1)


def block_mask(segments: Optional[torch.Tensor], seq_len: int, window: int = 0, device=None):
    """The BlockMask of causal attention over seq_len tokens, within documents (segments [b, s]: the run index of each
    token, non-decreasing along a row: megadistill.model.attention.document_segments) and a sliding window (0 = none).
    Without documents the mask is the same for every row: batch dimension 1 (broadcast), cached per shape."""
    if segments is None:
        return _plain_block_mask(seq_len, window, str(torch.device(device or "cpu")))
    return _build(segments, segments.shape[1], window, segments.device)


@functools.lru_cache(maxsize=64)
def _plain_block_mask(seq_len: int, window: int, device: str):
    # normal tensors even when a teacher's forward (inference_mode) asks first: the student's training forward reuses
    # this mask, and FlexAttention saves its tensors for backward, which inference tensors cannot be
    with torch.inference_mode(False):
        return _build(None, seq_len, window, torch.device(device))


def _build(segments: Optional[torch.Tensor], seq_len: int, window: int, device):
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-seq_len // BLOCK)
    first = torch.arange(n, device=device) * BLOCK  # [n] first position of each block
    last = (first + BLOCK).clamp(max=seq_len) - 1  # [n] its last one (the final block may be short)
    q_first, q_last, k_first, k_last = first[:, None], last[:, None], first[None, :], last[None, :]  # [n, 1] / [1, n]
    # over the pairs of a query block and a key block, i - j takes every value in [q_first - k_last, q_last - k_first]
    some = k_first <= q_last  # [n, n]: some pair with j <= i
    every = k_last <= q_first  # every pair
    if window:
        some = some & (q_first - k_last < window)
        every = every & (q_last - k_first < window)
    ragged = torch.zeros(n, dtype=torch.bool, device=device)
    ragged[-1] = seq_len % BLOCK != 0
    every = every & ~ragged[:, None] & ~ragged[None, :]  # a short block is never called full: the kernel pads it
    some, every = some.unsqueeze(0), every.unsqueeze(0)  # [1, n, n]
    if segments is not None:
        if segments.dim() != 2 or segments.shape[1] != seq_len:
            raise ValueError(f"segments {tuple(segments.shape)} must be [batch, {seq_len}]")
        lo, hi = segments[:, first], segments[:, last]  # [b, n]: runs are non-decreasing, so a block's range
        q_lo, q_hi, k_lo, k_hi = lo[:, :, None], hi[:, :, None], lo[:, None, :], hi[:, None, :]
        some = some & (k_lo <= q_hi) & (q_lo <= k_hi)  # the two blocks' run ranges overlap
        every = every & (k_lo == k_hi) & (q_lo == q_hi) & (k_lo == q_lo)  # both lie in one run
    partial_count, partial_index = _sorted_blocks(some & ~every)
    full_count, full_index = _sorted_blocks(every)
    return BlockMask.from_kv_blocks(partial_count, partial_index, full_count, full_index, BLOCK_SIZE=BLOCK,
                                    mask_mod=_pair_rule(segments, window), seq_lengths=(seq_len, seq_len))


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block, scale: float, gqa: bool,
         softcap: float = 0.0) -> torch.Tensor:
    """Attention over [b, h, s, hd] q and [b, h_kv, s, hd] k / v with this BlockMask -> [b, h, s, hd]."""
    if q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
        raise UserError("model.attention=flex cannot train on CPU: torch's FlexAttention has no CPU backward. Use "
                        "model.attention=sdpa on CPU (flex runs forwards there: evaluation, a teacher cache)")
    score_mod = _softcap_mod(float(softcap)) if softcap else None
    if torch.compiler.is_compiling():  # inside a compiled block: the block's graph fuses it
        from torch.nn.attention.flex_attention import flex_attention
        kernel = flex_attention
    else:
        kernel = _compiled_kernel()
    return kernel(q, k, v, score_mod=score_mod, block_mask=block, scale=scale, enable_gqa=gqa)
