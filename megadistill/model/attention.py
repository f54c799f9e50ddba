"""Causal self-attention backends (flash-attn, torch SDPA, FlexAttention, eager reference), document masks, and RoPE."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megadistill.errors import UserError

BACKENDS = ("flash", "sdpa", "flex", "eager")

# Layout: q, k, v and outputs are [b, s, h, hd] (flash-attn's layout); SDPA / flex / eager transpose to [b, h, s, hd].
# GQA: k and v may carry fewer heads h_kv (h_kv divides h); query head i reads key/value head i // (h / h_kv).
#
# Documents: `doc_ids` [b, s] labels the packed documents of each row. A document is a maximal run of equal
# consecutive ids, and token i attends to token j iff j <= i and both lie in the same run. Defining documents as
# runs (not as equal ids) makes the dense mask and flash-attn's cu_seqlens describe exactly the same attention.
#
# Sliding window (Mistral, Phi-3): with window w > 0, token i also needs i - j < w -- it sees itself and the w - 1
# tokens before it, transformers' rule (kv_idx > q_idx - sliding_window; flash-attn's window_size=(w - 1, 0)).
# Within one document positions differ as they do in the row, so documents and windows combine per token pair.


@dataclass
class AttnMask:
    """Which keys each query may attend to beyond plain causality: built once per forward, shared by every layer."""

    segments: Optional[torch.Tensor] = None  # [b, s] int64, run index of each token within its row (documents)
    allowed: Optional[torch.Tensor] = None  # [b or 1, 1, s, s] bool, True = may attend (sdpa / eager)
    cu_seqlens: Optional[torch.Tensor] = None  # [n_docs + 1] int32, starts of the runs in the flattened batch (flash)
    max_seqlen: int = 0  # flash: a bound on the runs' length (the row length: static, no host read-back)
    window: int = 0  # flash: keys j with i - j < window only (0 = no window)
    block: Optional[object] = None  # flex: torch's BlockMask (megadistill.model.flex.block_mask)
    bias: Optional[torch.Tensor] = None  # sdpa: `allowed` as 0 / -inf in the activations' dtype (build_mask)


def document_segments(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document labels -> [b, s] run index (0, 0, 1, 1, 1, 2, ...) restarting at 0 in each row."""
    change = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()  # [b, s-1]
    return torch.cat([torch.zeros_like(change[:, :1]), change.cumsum(1)], dim=1)


def build_mask(doc_ids: Optional[torch.Tensor], backend: str, seq_len: int = 0, window: int = 0,
               device=None, bias_dtype: Optional[torch.dtype] = None) -> Optional[AttnMask]:
    """The mask data `backend` needs for these document ids and a sliding `window` over sequences of seq_len tokens
    (read from doc_ids when given). None when plain causal attention is the same function: no documents, and no
    window or one at least as long as the sequence -- except for flex, whose kernel always takes a block mask.

    bias_dtype (sdpa): also the mask as an additive bias in the activations' dtype (0 / -inf), made once per forward
    for every layer. SDPA's memory-efficient kernel (CUDA) turns a bool mask into such a bias in each call and keeps
    it for backward: 2 b s^2 bytes per layer, 3 GiB over 24 layers at b = 4, s = 4096 in bf16 (its CPU kernels do
    the same, in fp32: 4 b s^2 per layer); given the bias, every layer keeps the same one (Transformer passes it).

    device: where attention runs (default: doc_ids'). doc_ids may stay on the host (the trainer passes them so): the
    document runs are found where the ids are, flash-attn's run starts too (on the GPU that reads their count back:
    a host sync per forward), and what the backend reads is copied to `device` (non_blocking)."""
    if window < 0:
        raise ValueError(f"window={window} must be >= 0 (0 = no sliding window)")
    seg = None
    if doc_ids is not None:
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be [batch, seq], got shape {tuple(doc_ids.shape)}")
        seq_len, device = doc_ids.shape[1], doc_ids.device if device is None else device
        seg = document_segments(doc_ids)  # [b, s], where the ids are
    window = window if 0 < window < seq_len else 0  # a window covering the whole sequence restricts nothing
    if backend == "flash":
        if seg is not None:
            return _flash_mask(seg, window, device)
        return AttnMask(window=window) if window else None
    if seg is not None:
        seg = _to_device(seg, device)
    if backend == "flex":
        from megadistill.model.flex import block_mask
        return AttnMask(seg, block=block_mask(seg, seq_len, window, device), window=window)
    if seg is None and not window:
        return None
    # [s, s] bool from the start (an int64 lag matrix i - j would be 8 s^2 bytes: 8 GiB at s = 32768)
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()  # causal: j <= i
    if window:
        allowed = allowed.triu(1 - window)  # i - j < window
    if seg is not None:
        allowed = allowed & (seg.unsqueeze(2) == seg.unsqueeze(1))  # [b, s, s]
    else:
        allowed = allowed.unsqueeze(0)  # [1, s, s]
    allowed = allowed.unsqueeze(1)  # [b or 1, 1, s, s]
    bias = None
    if backend == "sdpa" and bias_dtype is not None:
        bias = torch.zeros(allowed.shape, dtype=bias_dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    return AttnMask(seg, allowed=allowed, window=window, bias=bias)


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """t on `device`; from the host to a GPU through pinned memory, so the copy is asynchronous."""
    device = torch.device(device)
    if t.device == device:
        return t
    return (t.pin_memory() if device.type == "cuda" and t.device.type == "cpu" else t).to(device, non_blocking=True)


def _flash_mask(seg: torch.Tensor, window: int, device) -> AttnMask:
    """flash-attn's varlen description of the runs `seg` [b, s] (on any device): cu_seqlens on `device`."""
    b, s = seg.shape
    # distinct ids across rows: offset each row's runs by s, then find run starts in the flattened batch
    flat = (seg + s * torch.arange(b, device=seg.device).unsqueeze(1)).reshape(-1)  # [b s]
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1]
    starts = start.nonzero().squeeze(1)  # on a GPU: reads the count back (a host sync); on the host: none
    cu = _to_device(torch.cat([starts, starts.new_tensor([b * s])]).to(torch.int32), device)
    # Under train.compile the blocks' graphs are static (dynamic=False): the document count (cu's length) is marked
    # dynamic and max_seqlen is the row length, not the longest document (an int the graph would guard on, read back
    # with a host sync), so new documents never recompile a block
    from torch._dynamo import mark_dynamic
    mark_dynamic(cu, 0)
    return AttnMask(cu_seqlens=cu, max_seqlen=s, window=window)


def sdpa_repeats_kv(device_type: str, dtype: torch.dtype, masked: bool) -> bool:
    """Whether SDPA gets grouped-query k / v repeated to the query heads rather than enable_gqa: on CUDA, SDPA's GQA
    runs in its flash and cuDNN kernels only, which take no mask and no fp32; with a mask (documents, a window) or in
    fp32 enable_gqa would leave it the math kernel (fp32 [b, h, s, s] scores, kept for backward), where repeated
    k / v keep the memory-efficient one. Costs the repeated k / v (and, training, keeping them for backward)."""
    return device_type == "cuda" and (masked or dtype == torch.float32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              mask: Optional[AttnMask] = None, scale: Optional[float] = None,
              gqa: Optional[bool] = None, softcap: float = 0.0) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v, restricted to documents / a sliding window when `mask` says so:
    [b, s, h, hd] -> [b, s, h, hd].

    softcap c > 0 caps the scores as c tanh(s / c) before the softmax (Gemma 2): flash-attn does it in its kernel;
    SDPA cannot, so sdpa runs the eager path's explicit scores then.

    gqa: whether k / v have fewer heads than q, when the caller knows it as a constant (a module's bool attribute):
    under torch.compile head counts can become symbolic (blocks of different widths share the code), and SDPA takes
    no symbolic enable_gqa."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.shape[2] % k.shape[2] or k.shape != v.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v must share a shape "
                         "whose head count divides q's")
    if backend == "sdpa" and not softcap:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, s, hd], k / v [b, h_kv, s, hd]
        if gqa is None:
            gqa = bool(kt.shape[1] != qt.shape[1])
        if gqa and sdpa_repeats_kv(q.device.type, q.dtype, mask is not None):
            group = qt.shape[1] // kt.shape[1]
            kt, vt = (t.repeat_interleave(group, dim=1) for t in (kt, vt))  # [b, h, s, hd]
            gqa = False
        if mask is None:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            bias = mask.bias if mask.bias is not None and mask.bias.dtype == q.dtype else mask.allowed
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2)
    if backend == "flex":
        from megadistill.model.flex import flex
        if mask is None or mask.block is None:
            raise ValueError("model.attention=flex needs the block mask of build_mask(doc_ids, 'flex', seq_len, ...)")
        gqa = bool(k.shape[2] != q.shape[2]) if gqa is None else gqa
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return flex(qt, kt, vt, mask.block, scale, gqa, softcap).transpose(1, 2)
    if backend in ("eager", "sdpa"):
        return _eager(q, k, v, mask, scale, softcap)
    if backend == "flash":
        return _flash(q, k, v, mask, scale, softcap)
    raise UserError(f"model.attention={backend!r} is not one of {list(BACKENDS)}")


def _eager(q, k, v, mask: Optional[AttnMask], scale: float, softcap: float = 0.0) -> torch.Tensor:
    # Reference path: explicit scores and softmax in fp32 (or the inputs' dtype if wider).
    ct = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) if group > 1 else t for t in (k, v))  # [b, s, h, hd]
    qt, kt, vt = (t.transpose(1, 2).to(ct) for t in (q, k, v))  # [b, h, s, hd]
    scores = (qt @ kt.transpose(-1, -2)) * scale  # [b, h, s, s]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        s = q.shape[1]
        allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()  # [s, s]
    else:
        allowed = mask.allowed  # [b or 1, 1, s, s]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # diagonal always allowed: no empty rows
    return (probs @ vt).transpose(1, 2).to(q.dtype)


def check_backend(backend: str, device_type: str, dtypes: Dict[str, str]) -> None:
    """What `backend` needs to train on this device, checked before anything is built (the first forward would find
    out after the engine, the teacher and the compile): dtypes maps the config keys of the models that will run it
    (train.precision, distill.teacher_dtype) to their dtype names. UserError naming the key and the fixes."""
    import importlib.util
    if backend == "flash":
        if device_type != "cuda":
            raise UserError(f"model.attention=flash runs flash-attn's CUDA kernels; this run is on {device_type}: "
                            "set model.attention=sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError("model.attention=flash needs the flash-attn package, which is not installed: pip install "
                            "-e '.[gpu]', or set model.attention=sdpa (or flex: documents, windows and softcaps)")
        for key, dtype in dtypes.items():
            if dtype not in ("bf16", "fp16"):
                raise UserError(f"model.attention=flash runs in bf16 / fp16 only, and {key}={dtype}: set {key}=bf16, "
                                "or model.attention=sdpa")
    if backend == "flex" and device_type != "cuda":
        raise UserError(f"model.attention=flex cannot train on {device_type}: torch's FlexAttention has no CPU "
                        "backward. Use model.attention=sdpa here (flex runs forwards on CPU: evaluation)")


def _flash(q, k, v, mask: Optional[AttnMask], scale: float, softcap: float = 0.0) -> torch.Tensor:
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        raise UserError("model.attention='flash' needs the flash-attn package: install the GPU extra "
                        "(pip install -e '.[gpu]') on a CUDA machine, or set model.attention=sdpa") from None
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise UserError(f"model.attention='flash' runs on CUDA in bf16/fp16 (got {q.dtype} on {q.device}); "
                        "set train.precision=bf16 or model.attention=sdpa")
    window = (mask.window - 1, 0) if mask is not None and mask.window else (-1, -1)  # (-1, -1): unlimited
    if mask is None or mask.cu_seqlens is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=window, softcap=softcap)
    b, s, h, hd = q.shape
    qf, kf, vf = (t.reshape(b * s, t.shape[2], hd) for t in (q, k, v))  # [b s, h(_kv), hd], runs back to back
    o = flash_attn_varlen_func(qf, kf, vf, mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen,
                               softmax_scale=scale, causal=True, window_size=window, softcap=softcap)
    return o.reshape(b, s, h, hd)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency rescaling (HF's rope_type): default (none), linear (all / factor), llama3 (by wavelength) or
    longrope (a divisor per frequency: the short set up to original_max_position tokens, the long set beyond -- chosen
    by the length of the sequence being embedded, as transformers does per forward -- and cos / sin scaled) or yarn
    (slow frequencies divided by factor, fast ones kept, a linear ramp between; cos / sin scaled)."""

    kind: str = "default"  # default | linear | llama3 | longrope | yarn
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    short_factor: Tuple[float, ...] = ()
    long_factor: Tuple[float, ...] = ()
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    @classmethod
    def of(cls, cfg) -> "RopeScaling":
        """From a ModelConfig's rope_* fields."""
        return cls(cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                   cfg.rope_original_max_position, tuple(cfg.rope_short_factor), tuple(cfg.rope_long_factor),
                   cfg.rope_attention_factor, cfg.rope_beta_fast, cfg.rope_beta_slow, bool(cfg.rope_truncate))

    def scale(self) -> float:
        """Factor on cos and sin (longrope's and yarn's attention factor; 1 otherwise)."""
        return self.attention_factor if self.kind in ("longrope", "yarn") else 1.0

    def apply(self, inv_freq: torch.Tensor, seq_len: int = 0, base: float = 0.0) -> torch.Tensor:
        """Rescaled inverse frequencies [hd/2] (= base^(-2i / dim)) for sequences of seq_len tokens."""
        if self.kind == "default":
            return inv_freq
        if self.kind == "linear":  # positions compressed by factor: p theta / factor
            return inv_freq / self.factor
        if self.kind == "longrope":
            ext = self.long_factor if seq_len > self.original_max_position else self.short_factor
            return inv_freq / torch.tensor(ext, dtype=inv_freq.dtype, device=inv_freq.device)
        if self.kind == "yarn":
            return self._yarn(inv_freq, base)
        if self.kind != "llama3":
            raise UserError(f"model.rope_scaling={self.kind!r} is not one of ['default', 'linear', 'llama3', "
                            "'longrope', 'yarn']")
        # llama3: wavelength 2 pi / theta below L / high_freq is kept, above L / low_freq divided by factor, and
        # interpolated in between by s = (L / wavelength - low) / (high - low), L the original context.
        wavelength = 2 * math.pi / inv_freq
        L, lo, hi = self.original_max_position, self.low_freq_factor, self.high_freq_factor
        s = ((L / wavelength - lo) / (hi - lo)).clamp(0.0, 1.0)
        return (1 - s) * inv_freq / self.factor + s * inv_freq

    def _yarn(self, inv_freq: torch.Tensor, base: float) -> torch.Tensor:
        # Frequency i turns L inv_freq_i / (2 pi) times over the original context L: the index at which that count is
        # r is dim ln(L / (2 pi r)) / (2 ln base). Indices up to the one for beta_fast turns keep their frequency,
        # from the one for beta_slow on they are divided by factor, linearly blended between (YaRN's ramp).
        if base <= 0:
            raise ValueError("yarn needs the RoPE base")
        dim, L = 2 * inv_freq.shape[0], self.original_max_position

        def index(turns: float) -> float:
            return dim * math.log(L / (turns * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = index(self.beta_fast), index(self.beta_slow)
        if self.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        hi = hi + 0.001 if hi == lo else hi  # a step, not a division by zero
        i = torch.arange(inv_freq.shape[0], dtype=inv_freq.dtype, device=inv_freq.device)
        interpolated = ((i - lo) / (hi - lo)).clamp(0.0, 1.0)  # 0: kept (fast), 1: divided by factor (slow)
        return inv_freq * (1 - interpolated) + inv_freq / self.factor * interpolated


class Rotary:
    """RoPE tables for head_dim `dim` and base `base`, cached per (seq_len, device, dtype).

    Rotates the pair (x_i, x_{i + hd/2}) of position p by angle p * base^(-2i / hd) (the half-split layout), so
    q_m . k_n depends on positions only through m - n. `scaling` rescales the frequencies (long-context variants).
    """

    _MAX_CACHE = 8

    def __init__(self, dim: int, base: float, scaling: Optional[RopeScaling] = None):
        if dim % 2:
            raise UserError(f"model.head_dim={dim} must be even for RoPE")
        self.dim, self.base, self.scaling = dim, base, scaling or RopeScaling()
        self._cache: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, seq_len: int, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [seq_len, dim]."""
        key = (seq_len, torch.device(device), dtype)
        if key not in self._cache:
            if len(self._cache) >= self._MAX_CACHE:
                self._cache.clear()
            # angles in fp64: p * theta_i stays exact enough for long contexts before the cast
            inv_freq = self.base ** (-torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim)
            inv_freq = self.scaling.apply(inv_freq, seq_len, self.base)  # [hd/2]
            angles = torch.arange(seq_len, dtype=torch.float64, device=device).unsqueeze(1) * inv_freq  # [s, hd/2]
            angles = torch.cat([angles, angles], dim=-1)  # [s, hd]
            scale = self.scaling.scale()
            self._cache[key] = ((angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype))
        return self._cache[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, s, h, hd] by the tables cos, sin [s, hd]: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # [b, s, h, hd]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [s, 1, hd], broadcast over heads
    return x * cos + rotated * sin
