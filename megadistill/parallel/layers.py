"""Megatron-style tensor-parallel layers (column / row linear, vocab embedding, RMSNorm) and the factory the model uses."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megadistill.model.kernels import _RMSNormFn, rms_norm  # noqa: F401 (_RMSNormFn lived here; name kept)
from megadistill.model.sizes import kv_layout
from megadistill.errors import UserError
from megadistill.parallel.mappings import (columns_entry, copy_to_tp_region, gather_from_tp_region,
                                           gather_sequence, gather_sequence_into_tp_region, group_rank, group_size,
                                           reduce_from_tp_region, reduce_scatter_to_sequence_region,
                                           scatter_to_tp_region, sum_in_tp_region)

# Initialisation contract: every sharded weight is drawn FULL, in fp32, from the current torch RNG of `device`
# (all TP ranks are seeded identically), then this rank keeps its slice. RNG draws therefore happen in the same
# order and amounts at any TP size, and a model built at TP=t computes the same function as at TP=1.


def divide(n: int, tp_size: int, what: str) -> int:
    """n / tp_size, or a UserError naming the dimension that does not split."""
    if n % tp_size:
        raise UserError(f"{what}={n} is not divisible by parallel.tp_size={tp_size}; "
                        f"choose a tp_size that divides it")
    return n // tp_size


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int) -> nn.Parameter:
    """Tag a sharded parameter the way DeepSpeed's grad-norm code expects (counted on every TP rank)."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = 1
    return param


def _sharded_normal(shape, std: float, partition_dim: int, group, device, dtype) -> nn.Parameter:
    size, rank = group_size(group), group_rank(group)
    n = divide(shape[partition_dim], size, f"dimension {partition_dim} of a {tuple(shape)} weight")
    if device is not None and torch.device(device).type == "meta":  # shapes only (weights come from a load):
        local = list(shape)  # no draw, which on meta goes through torch._refs and imports dynamo (2 s, 150 MB)
        local[partition_dim] = n
        return mark_tensor_parallel(nn.Parameter(torch.empty(local, device="meta", dtype=dtype or torch.float32)),
                                    partition_dim)
    full = torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, std)
    local = full.narrow(partition_dim, rank * n, n).to(dtype or torch.float32).clone()
    del full
    return mark_tensor_parallel(nn.Parameter(local), partition_dim)


def _replicated_normal(shape, std: float, device, dtype) -> nn.Parameter:
    """A weight every TP rank keeps whole (not TP-marked), drawn like a sharded one: full, in fp32, then cast."""
    if device is not None and torch.device(device).type == "meta":  # shapes only (weights come from a load)
        return nn.Parameter(torch.empty(shape, device="meta", dtype=dtype or torch.float32))
    w = torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, std)
    return nn.Parameter(w.to(dtype or torch.float32))


def _replicated_zeros(n: int, device, dtype) -> nn.Parameter:
    """A bias every TP rank keeps whole (not TP-marked): zeros, no RNG draw."""
    return nn.Parameter(torch.zeros(n, device=device, dtype=dtype or torch.float32))


def _sharded_zeros(n: int, group, device, dtype) -> nn.Parameter:
    """A bias of n outputs split like its column-parallel weight's rows: this rank's [n/tp], zeros (no RNG draw)."""
    local = divide(n, group_size(group), f"a bias of {n} outputs")
    return mark_tensor_parallel(nn.Parameter(torch.zeros(local, device=device, dtype=dtype or torch.float32)), 0)


class ColumnParallelLinear(nn.Module):
    """Y = X A (+ b) with A = [A_1 .. A_p] split by output columns: rank r holds A_r (and b_r) and computes
    Y_r = X A_r (+ b_r). The bias (bias=True, e.g. Qwen2's Q / K / V) is split like the columns, initialised to 0;
    each rank's slice of Y is its own, so the bias gradient needs no TP reduction.

    copy_input=False when the caller already passed X through copy_to_tp_region (several column layers reading the
    same X, e.g. Q/K/V: one backward all-reduce of their summed dL/dX instead of one per layer).
    """

    def __init__(self, in_features: int, out_features: int, group=None, init_std: Optional[float] = None,
                 gather_output: bool = False, device=None, dtype=None, copy_input: bool = True, bias: bool = False):
        super().__init__()
        self.group, self.gather_output, self.copy_input = group, gather_output, copy_input
        self.in_features, self.out_features = in_features, out_features
        self.tp_size = group_size(group)
        self.out_per_rank = divide(out_features, self.tp_size, "output features")
        std = in_features ** -0.5 if init_std is None else init_std
        self.weight = _sharded_normal((out_features, in_features), std, 0, group, device, dtype)  # [out/tp, in]
        self.bias = _sharded_zeros(out_features, group, device, dtype) if bias else None  # [out/tp]

    def local_weight(self) -> torch.Tensor:
        """The weight this rank multiplies by (its shard; a ColumnsEntry reads it)."""
        return self.weight

    def local_bias(self) -> Optional[torch.Tensor]:
        return self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_tp_region(x, self.group)  # [..., in], replicated; backward sums dL/dX over ranks
        y = F.linear(x, self.weight, self.bias)  # [..., out/tp]
        return gather_from_tp_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        bias = ", bias" if self.bias is not None else ""
        return f"in={self.in_features}, out={self.out_features}, tp={self.tp_size}{bias}"


class HeadReplicatedLinear(nn.Module):
    """The K or V projection of a model with fewer key/value heads than TP ranks (n_heads < tp, tp a multiple of
    n_heads: Gemma 3 1B's one head at TP=2, Qwen2.5-3B's two at TP=4): every rank keeps the whole [n_heads hd, in]
    weight (replicated, like a norm gain) and uses the rows of head r // (tp / n_heads) -- the head its query heads
    read under GQA, since rank r's h / tp query heads lie in that head's group.

    The rows pass through copy_to_tp_region: each rank's gradient holds only its own query heads' share of dL/dW
    (and zeros in the other heads' rows), and backward sums it over the TP group, so every replica gets the full
    gradient and stays identical. Used through a ColumnsEntry (copy_input=False), which also sums dL/dX.
    """

    copy_input = gather_output = False  # ColumnsEntry's contract: it enters the TP region for its columns

    def __init__(self, in_features: int, n_heads: int, head_dim: int, group, init_std: Optional[float] = None,
                 device=None, dtype=None, bias: bool = False):
        super().__init__()
        self.group, self.in_features, self.n_heads, self.head_dim = group, in_features, n_heads, head_dim
        self.tp_size = group_size(group)
        if kv_layout(n_heads, self.tp_size) != "replicated":
            raise UserError(f"{n_heads} key/value heads cannot be replicated over parallel.tp_size={self.tp_size}: "
                            "tp_size must be a multiple of them (or divide them: no replication needed)")
        self.head = group_rank(group) // (self.tp_size // n_heads)  # the key/value head this rank's queries read
        std = in_features ** -0.5 if init_std is None else init_std
        self.weight = _replicated_normal((n_heads * head_dim, in_features), std, device, dtype)  # [h_kv hd, in]
        self.bias = _replicated_zeros(n_heads * head_dim, device, dtype) if bias else None

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return copy_to_tp_region(t, self.group).narrow(0, self.head * self.head_dim, self.head_dim)

    def local_weight(self) -> torch.Tensor:
        return self._rows(self.weight)  # [hd, in]

    def local_bias(self) -> Optional[torch.Tensor]:
        return None if self.bias is None else self._rows(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp_region(x, self.group), self.local_weight(), self.local_bias())  # [..., hd]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, heads={self.n_heads}x{self.head_dim} replicated, this rank's head="
                f"{self.head}, tp={self.tp_size}" + (", bias" if self.bias is not None else ""))


class ReplicatedLinear(nn.Module):
    """Y = X W^T with W [out, in] whole on every TP rank, for a small matrix read inside the TP region (a mixture of
    experts' router): each rank's gradient of W is only its share of dL/dW (the rest flows through the other ranks'
    expert shards), so W passes through copy_to_tp_region and its gradient is summed over TP, keeping the replicas
    identical. Drawn full, like every weight, from the shared seed."""

    def __init__(self, in_features: int, out_features: int, group=None, init_std: Optional[float] = None,
                 device=None, dtype=None):
        super().__init__()
        self.group, self.in_features, self.out_features = group, in_features, out_features
        std = in_features ** -0.5 if init_std is None else init_std
        self.weight = _replicated_normal((out_features, in_features), std, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, copy_to_tp_region(self.weight, self.group))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, replicated, tp={group_size(self.group)}"


class RowParallelLinear(nn.Module):
    """Y = X A (+ b) with A = [A_1; ..; A_p] split by input rows: rank r computes X_r A_r, then all-reduce.

    sequence_parallel: reduce-scatter along the sequence instead of the all-reduce (Y leaves as this rank's
    sequence slice [b, s/tp, out]). The bias (bias=True: Llama's attention_bias / mlp_bias, GPT-NeoX) is replicated,
    initialised to 0 and added once, after the reduction; under sequence parallelism each rank adds it to its own
    tokens only, so its gradient is summed over TP (like a norm gain's).
    """

    def __init__(self, in_features: int, out_features: int, group=None, init_std: Optional[float] = None,
                 input_is_parallel: bool = True, device=None, dtype=None, sequence_parallel: bool = False,
                 bias: bool = False):
        super().__init__()
        self.group, self.input_is_parallel, self.sequence_parallel = group, input_is_parallel, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.tp_size = group_size(group)
        self.in_per_rank = divide(in_features, self.tp_size, "input features")
        std = in_features ** -0.5 if init_std is None else init_std
        self.weight = _sharded_normal((out_features, in_features), std, 1, group, device, dtype)  # [out, in/tp]
        self.bias = _replicated_zeros(out_features, device, dtype) if bias else None  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.group)  # [..., in] -> [..., in/tp]
        y = F.linear(x, self.weight)  # partial X_r A_r
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(y, self.group)  # [b, s/tp, out] of sum_r X_r A_r
        else:
            y = reduce_from_tp_region(y, self.group)  # sum_r X_r A_r: [..., out]
        if self.bias is None:
            return y
        return y + copy_to_tp_region(self.bias, self.group if self.sequence_parallel else None)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tp={self.tp_size}"
                + (", bias" if self.bias is not None else "")
                + (", sequence_parallel" if self.sequence_parallel else ""))


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows: rank r owns ids [r V/p, (r+1) V/p); others contribute zeros.

    sequence_parallel: the rows are summed by a reduce-scatter along the sequence ([b, s] ids -> [b, s/tp, d]).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None, init_std: float = 1.0,
                 device=None, dtype=None, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_size = group_size(group)
        self.per_rank = divide(num_embeddings, self.tp_size, "vocab_size")
        self.vocab_start = group_rank(group) * self.per_rank
        self.weight = _sharded_normal((num_embeddings, embedding_dim), init_std, 0, group, device, dtype)  # [V/tp, d]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)  # [b, s, d]
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)  # ids owned by another rank
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [b, s, d]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_region(out, self.group)  # [b, s/tp, d]
        return reduce_from_tp_region(out, self.group)  # exactly one rank contributes each row

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp_size}"


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, normalised in fp32, learnable gain g (init 1), replicated on TP ranks.

    With `group` set, the input is sharded over TP (e.g. QK-norm over the heads of this rank) while g is shared by
    all heads: each rank then sees only part of dL/dg, so g passes through copy_to_tp_region and its gradient is
    summed over the group, keeping the replicas identical. `kernels`: model.kernels (torch | liger, see
    megadistill.model.kernels); the Transformer sets it on all its norms from its config. `offset`: the gain is
    offset + w (Gemma's 1 + w, model.norm_offset), summed in fp32; w starts at 1 - offset.
    """

    def __init__(self, dim: int, eps: float = 1e-5, group=None, device=None, dtype=None, kernels: str = "torch",
                 offset: float = 0.0):
        super().__init__()
        self.eps, self.group, self.kernels, self.offset = eps, group, kernels, float(offset)
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - self.offset, device=device, dtype=dtype or torch.float32))

    def gain(self) -> torch.Tensor:
        w = copy_to_tp_region(self.weight, self.group)
        return w if not self.offset else w.float() + self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.gain(), self.eps, self.kernels)  # gain applied in fp32

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, tp_input={self.group is not None}"
                + (f", offset={self.offset}" if self.offset else ""))


class LayerNorm(RMSNorm):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * g + b over the last dim, in fp32, returned in x's dtype (GPT-NeoX /
    Pythia, model.norm_type=layer): RMSNorm's gain (offset, TP handling) plus a bias b (init 0), replicated like the
    gain; under sequence parallelism (`group` set) both gradients are summed over TP. Always our torch op
    (F.layer_norm, one fused kernel on CUDA), whatever `kernels` says."""

    def __init__(self, dim: int, eps: float = 1e-5, group=None, device=None, dtype=None, offset: float = 0.0):
        super().__init__(dim, eps, group, device, dtype, offset=offset)
        self.bias = _replicated_zeros(dim, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = copy_to_tp_region(self.bias, self.group)
        return F.layer_norm(x.float(), x.shape[-1:], self.gain().float(), b.float(), self.eps).to(x.dtype)


class AffineFreeLayerNorm(nn.Module):
    """y = (x - mean(x)) / sqrt(var(x) + eps) over the last dim, in fp32, returned in x's dtype: no gain, no bias,
    no parameters (OLMo 1, model.norm_type=layer_noaffine), so nothing to reduce over TP."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], None, None, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, no affine"


class WidthShardedRMSNorm(RMSNorm):
    """RMSNorm over a width split over TP (OLMo 2's QK-norm over all heads' dims): rank r holds columns
    [r w/tp, (r+1) w/tp) of the input and the same slice of the gain (one per dim, init 1, sharded like the columns).
    The mean of squares spans the whole width: each rank's sum of squares is summed over TP (sum_in_tp_region)."""

    def __init__(self, width: int, eps: float = 1e-5, group=None, device=None, dtype=None, offset: float = 0.0):
        super().__init__(divide(width, group_size(group), f"a norm over {width} sharded dims"), eps, None, device,
                         dtype, offset=offset)
        self.width, self.tp_group = width, group
        mark_tensor_parallel(self.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # [..., w/tp]; normalised and scaled in fp32, cast back (as rms_norm does)
        total = sum_in_tp_region(xf.pow(2).sum(-1, keepdim=True), self.tp_group)  # [..., 1]: sum over all w dims
        return (xf * torch.rsqrt(total / self.width + self.eps) * self.gain().float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.width} (this rank: {self.weight.shape[0]}), eps={self.eps}"


class Collective(nn.Module):
    """Module form of one mapping of megadistill.parallel.mappings over `group` (e.g. copy_to_tp_region for an input
    shared by several columns), so the model can hold region entries / exits like any other layer."""

    def __init__(self, fn, group=None):
        super().__init__()
        self.fn, self.group = fn, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.group)

    def extra_repr(self) -> str:
        return f"{self.fn.__name__}, tp={group_size(self.group)}"


class ColumnsEntry(nn.Module):
    """Entry into the TP region through several column-parallel linears reading one input (Q / K / V, SwiGLU gate /
    up): forward(x) -> one output per column, [..., out_i / tp] each (megadistill.parallel.mappings.columns_entry).

    x is replicated, or this rank's sequence slice under sequence parallelism (all-gathered here; backward keeps the
    slice and re-gathers it). The columns stay the owners of their weights (state-dict names, initialisation,
    sharding); under TP this module reads them (dense, it calls them). Under ZeRO-3, which gathers a module's
    parameters around its own forward, the engine registers `weights()` as this module's external parameters
    (megadistill.train.engine.register_shared_weights).
    """

    def __init__(self, columns, group=None, sequence_parallel: bool = False):
        super().__init__()
        self.columns = tuple(columns)  # a tuple: referenced, not registered as submodules (their parents own them)
        self.group, self.sequence_parallel = group, sequence_parallel
        if any(c.copy_input or c.gather_output for c in self.columns):
            raise ValueError("ColumnsEntry columns must be built with copy_input=False, gather_output=False")

    def weights(self):
        return [c.weight for c in self.columns]

    def shared_parameters(self):
        """Every parameter this module reads from its columns (weights, then biases): ZeRO-3's external parameters."""
        return self.weights() + [c.bias for c in self.columns if c.bias is not None]

    def forward(self, x: torch.Tensor):
        if self.group is None:  # dense: each column's own forward (and any hooks on it)
            return tuple(c(x) for c in self.columns)
        ys = columns_entry(x, [c.local_weight() for c in self.columns], self.group, self.sequence_parallel)
        return tuple(y if c.bias is None else y + c.local_bias() for y, c in zip(ys, self.columns))  # [..., out_i/tp]

    def extra_repr(self) -> str:
        return (f"{len(self.columns)} columns, tp={group_size(self.group)}"
                + (", sequence_parallel" if self.sequence_parallel else ""))


class LayerFactory:
    """Builds the layers of one model at one TP layout; `group=None` gives plain dense layers (TP=1).

    The model asks it for every weight-bearing layer, so the same model code runs at any tp_size; it also tells
    the model how many heads / ffn columns / vocab rows live on this rank (`local`).

    sequence_parallel (Megatron-style, only with tp_size > 1): outside the TP regions -- the residual stream, the
    norms, the embedding output -- activations are [b, s/tp, d], rank r holding sequence slice r. Entering a TP region
    (`columns_entry`) all-gathers the sequence (backward: re-gathers it from the kept slice, then reduce-scatters),
    leaving it (`row`, `embedding`) reduce-scatters (backward: all-gather) in place of the all-reduce; norm gains see
    only this rank's tokens, so their grads are summed over TP; `sequence_output` all-gathers the final hidden states
    for the head and the losses.
    """

    def __init__(self, group=None, device=None, dtype=None, sequence_parallel: bool = False):
        self.group = group if group is not None and group_size(group) > 1 else None
        self.device, self.dtype = device, dtype
        self.tp_size = group_size(self.group)
        self.tp_rank = group_rank(self.group)
        self.sequence_parallel = bool(sequence_parallel) and self.group is not None

    def local(self, n: int, what: str) -> int:
        """This rank's share of a dimension split over TP (UserError if it does not divide)."""
        return divide(n, self.tp_size, what)

    def replicates_heads(self, n_heads: int) -> bool:
        """Whether `n_heads` key/value heads are fewer than the TP ranks (then replicated: `kv_column`)."""
        return kv_layout(n_heads, self.tp_size) == "replicated"

    def local_kv_heads(self, n_heads: int) -> int:
        """The key/value heads this rank computes: n_heads / tp, or 1 when they are replicated."""
        return 1 if self.replicates_heads(n_heads) else self.local(n_heads, "model.n_kv_heads")

    def kv_column(self, in_features: int, n_heads: int, head_dim: int, init_std: Optional[float] = None,
                  bias: bool = False) -> nn.Module:
        """K or V projection [..., in] -> [..., local_kv_heads hd] (for a ColumnsEntry): column-parallel when tp
        divides n_heads, else every rank keeps all heads and computes the one its query heads read
        (HeadReplicatedLinear)."""
        if self.replicates_heads(n_heads):
            return HeadReplicatedLinear(in_features, n_heads, head_dim, self.group, init_std, self.device,
                                        self.dtype, bias)
        return self.column(in_features, n_heads * head_dim, init_std, copy_input=False, bias=bias)

    def column(self, in_features: int, out_features: int, init_std: Optional[float] = None,
               gather_output: bool = False, copy_input: bool = True, bias: bool = False) -> ColumnParallelLinear:
        """[..., in] replicated -> [..., out/tp] (or [..., out] with gather_output), plus a sharded bias if asked.

        copy_input=False: the input enters the TP region through `self.columns_entry(...)` (shared by several columns).
        """
        return ColumnParallelLinear(in_features, out_features, self.group, init_std, gather_output,
                                    self.device, self.dtype, copy_input, bias)

    def columns_entry(self, *columns: ColumnParallelLinear) -> ColumnsEntry:
        """One entry into the TP region for `columns` (built with copy_input=False) sharing their input: forward(x)
        returns their outputs (under sequence parallelism x is this rank's sequence slice, all-gathered inside)."""
        return ColumnsEntry(columns, self.group, self.sequence_parallel)

    def region_entry(self) -> Collective:
        """The residual stream into the TP region for a sublayer that reads it whole (a mixture of experts): copy
        (backward: all-reduce), or under sequence parallelism all-gather the sequence (backward: reduce-scatter)."""
        return Collective(gather_sequence_into_tp_region if self.sequence_parallel else copy_to_tp_region, self.group)

    def region_exit(self) -> Collective:
        """Per-rank partial sums out of the TP region: all-reduce, or under sequence parallelism reduce-scatter."""
        return Collective(reduce_scatter_to_sequence_region if self.sequence_parallel else reduce_from_tp_region,
                          self.group)

    def replicated(self, in_features: int, out_features: int, init_std: Optional[float] = None) -> ReplicatedLinear:
        """A linear read inside the TP region, whole on every rank (its gradient summed over TP)."""
        return ReplicatedLinear(in_features, out_features, self.group, init_std, self.device, self.dtype)

    def region_column(self, in_features: int, out_features: int, init_std: Optional[float] = None,
                      experts: int = 0) -> nn.Parameter:
        """A column-parallel weight [out/tp, in] read inside a TP region another layer entered (no collective of its
        own: a mixture's shared expert), or `experts` of them stacked, [E, out/tp, in] (its routed experts)."""
        std = in_features ** -0.5 if init_std is None else init_std
        shape = (experts,) * bool(experts) + (out_features, in_features)
        return _sharded_normal(shape, std, len(shape) - 2, self.group, self.device, self.dtype)

    def region_row(self, in_features: int, out_features: int, init_std: Optional[float] = None,
                   experts: int = 0) -> nn.Parameter:
        """A row-parallel weight [out, in/tp] (or `experts` of them stacked, [E, out, in/tp]) giving per-rank partial
        sums that another layer reduces (the mixture's single exit)."""
        std = in_features ** -0.5 if init_std is None else init_std
        shape = (experts,) * bool(experts) + (out_features, in_features)
        return _sharded_normal(shape, std, len(shape) - 1, self.group, self.device, self.dtype)

    def sequence_output(self) -> nn.Module:
        """The final hidden states back to full sequence length (identity without sequence parallelism)."""
        # all-gather along the sequence forward, this rank's slice of the replicated grad backward
        return Collective(gather_sequence, self.group if self.sequence_parallel else None)

    @property
    def sequence_shards(self) -> int:
        """Into how many slices the residual stream's sequence is cut (tp_size under sequence parallelism, else 1)."""
        return self.tp_size if self.sequence_parallel else 1

    def row(self, in_features: int, out_features: int, init_std: Optional[float] = None,
            bias: bool = False) -> RowParallelLinear:
        """[..., in/tp] sharded -> [..., out] replicated (all-reduce), plus a replicated bias if asked."""
        return RowParallelLinear(in_features, out_features, self.group, init_std, True, self.device, self.dtype,
                                 self.sequence_parallel, bias)

    def embedding(self, vocab_size: int, dim: int, init_std: float = 1.0) -> VocabParallelEmbedding:
        """ids [...] -> [..., dim] replicated."""
        return VocabParallelEmbedding(vocab_size, dim, self.group, init_std, self.device, self.dtype,
                                      self.sequence_parallel)

    def head(self, dim: int, vocab_size: int, init_std: Optional[float] = None) -> ColumnParallelLinear:
        """Output head: [..., dim] replicated -> LOCAL vocab-shard logits [..., V/tp], never gathered (its input is the
        full-sequence output of `sequence_output` under sequence parallelism)."""
        return ColumnParallelLinear(dim, vocab_size, self.group, init_std, False, self.device, self.dtype)

    def norm(self, dim: int, eps: float = 1e-5, offset: float = 0.0, kind: str = "rms") -> nn.Module:
        """RMSNorm (kind=rms), LayerNorm (layer) or LayerNorm without parameters (layer_noaffine) over the residual
        stream: replicated, or this rank's sequence slice under sequence parallelism (then its gain's and bias's grads
        are summed over TP, like the QK-norm's)."""
        group = self.group if self.sequence_parallel else None
        if kind == "layer_noaffine":
            return AffineFreeLayerNorm(dim, eps)
        if kind == "layer":
            return LayerNorm(dim, eps, group, self.device, self.dtype, offset=offset)
        return RMSNorm(dim, eps, group, self.device, self.dtype, offset=offset)

    def sharded_input_norm(self, dim: int, eps: float = 1e-5, offset: float = 0.0) -> RMSNorm:
        """RMSNorm whose gain is shared by inputs sharded over TP (per-head QK-norm); its grad is summed over TP."""
        return RMSNorm(dim, eps, self.group, self.device, self.dtype, offset=offset)

    def width_sharded_norm(self, width: int, eps: float = 1e-5, offset: float = 0.0) -> WidthShardedRMSNorm:
        """RMSNorm over `width` dims split over TP like a column-parallel output (full-width QK-norm): [..., w/tp]."""
        return WidthShardedRMSNorm(width, eps, self.group, self.device, self.dtype, offset)

