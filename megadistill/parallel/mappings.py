"""Named autograd collectives that move activations into and out of the tensor-parallel (TP) region."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megadistill.model.kernels import traced_output  # torch 2.11 dynamo: see there

# Convention: `group=None` means "no tensor parallelism" (a dense single process), NOT the WORLD group as in
# torch.distributed; every function below is then the identity, as it is for a group of size 1.


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Number of ranks in `group`; 1 when group is None (dense)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    """This process's rank inside `group`; 0 when group is None (dense)."""
    return 0 if group is None else dist.get_rank(group)


def _wait(work, async_op: bool) -> None:
    if async_op:  # a synchronous call returns None (traced by torch 2.11's dynamo: a tensor): nothing to wait on
        work.wait()


def _all_reduce_start(x: torch.Tensor, group, async_op: bool = False):
    """Start an in-place all-reduce (sum) of x (a buffer the caller owns); returns finish() -> x, summed."""
    work = dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group, async_op=async_op)

    def finish() -> torch.Tensor:
        _wait(work, async_op)
        return x
    return finish


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # Reduce into a fresh buffer: the input may be saved for another node's backward.
    return _all_reduce_start(x.contiguous().clone(), group)()


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    # [..., n] -> [..., n/tp]: this rank's contiguous chunk (no communication)
    size, rank = group_size(group), group_rank(group)
    n = x.shape[-1]
    if n % size:
        raise ValueError(f"last dim {n} is not divisible by the tensor-parallel size {size}")
    return x.narrow(-1, rank * (n // size), n // size).contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    # [..., n/tp] -> [..., n], chunks concatenated in group-rank order
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


# Sequence-parallel layout: activations are [b, s, ...] (batch first); rank r of the TP group holds the contiguous
# sequence slice [r s/tp, (r+1) s/tp) of dim 1. The collectives themselves move flat [tp, ...] buffers along dim 0
# (NCCL's all-gather / reduce-scatter layout); the dim-1 <-> dim-0 reorder is one copy on each side.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.13 renamed
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _seq_split(x: torch.Tensor, group) -> torch.Tensor:
    # [b, s, ...] -> [b, s/tp, ...]: this rank's contiguous sequence slice (no communication)
    size, rank = group_size(group), group_rank(group)
    s = x.shape[1]
    if s % size:
        raise ValueError(f"sequence length {s} is not divisible by the tensor-parallel size {size}")
    return x.narrow(1, rank * (s // size), s // size).contiguous()


def _seq_gather_start(x: torch.Tensor, group, async_op: bool = False):
    """Start the all-gather of [b, s/tp, ...] slices into [b, s, ...] (slices in group-rank order); returns finish(),
    which waits (async_op) and returns the gathered tensor."""
    size = group_size(group)
    b, sl = x.shape[0], x.shape[1]
    rest = tuple(x.shape[2:])
    out, src = x.new_empty((size * b, sl) + rest), x.contiguous()  # the ranks' slices stacked along dim 0
    work = _all_gather_flat(out, src, group=group, async_op=async_op)

    def finish(_reads=(src,)) -> torch.Tensor:  # holds src until the collective has read it
        _wait(work, async_op)
        return out.view((size, b, sl) + rest).transpose(0, 1).reshape((b, size * sl) + rest)
    return finish


def _seq_reduce_scatter_start(x: torch.Tensor, group, async_op: bool = False):
    """Start the reduce-scatter of [b, s, ...] partial sums into this rank's [b, s/tp, ...] slice of their sum;
    returns finish(), which waits (async_op) and returns the slice."""
    size = group_size(group)
    b, s = x.shape[0], x.shape[1]
    if s % size:
        raise ValueError(f"sequence length {s} is not divisible by the tensor-parallel size {size}")
    rest = tuple(x.shape[2:])
    flat = x.reshape((b, size, s // size) + rest).transpose(0, 1).reshape((size * b, s // size) + rest)  # by rank
    out = x.new_empty((b, s // size) + rest)
    work = _reduce_scatter_flat(out, flat, group=group, async_op=async_op)

    def finish(_reads=(flat,)) -> torch.Tensor:  # holds flat until the collective has read it
        _wait(work, async_op)
        return out
    return finish


def _seq_gather(x: torch.Tensor, group) -> torch.Tensor:
    # [b, s/tp, ...] -> [b, s, ...], slices concatenated in group-rank order
    return _seq_gather_start(x, group)()


def _seq_reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    # [b, s, ...] partial sums -> [b, s/tp, ...] of the sum over ranks, this rank's sequence slice
    return _seq_reduce_scatter_start(x, group)()


def _is_dense(group) -> bool:
    return group is None or group_size(group) == 1


def _collective(name: str, forward, backward):
    """An autograd Function over a process group: forward(x, group) -> y, backward(grad, group) -> dL/dx."""

    def fwd(ctx, x, group):
        ctx.group = group
        return traced_output(forward(x, group))

    def bwd(ctx, grad):
        return backward(grad, ctx.group), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


# copy: each rank holds only its shard's contribution to dL/dx; the full gradient is their sum
_CopyToTP = _collective("_CopyToTP", lambda x, group: x.view_as(x), _all_reduce)
# reduce: d(sum_r x_r)/dx_r = I, every rank's partial receives the same (replicated) gradient
_ReduceFromTP = _collective("_ReduceFromTP", _all_reduce, lambda grad, group: grad)
# sum inside: every rank's partial enters a total that every rank then uses for its own shard; each rank's use
# contributes its own part of dL/dtotal, so the backward is a sum too
_SumInTP = _collective("_SumInTP", _all_reduce, _all_reduce)
_ScatterToTP = _collective("_ScatterToTP", _split_last, _gather_last)
_GatherFromTP = _collective("_GatherFromTP", _gather_last, _split_last)


def copy_to_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Enter the TP region with a replicated tensor.

    forward: identity (x is already replicated on every rank), backward: all-reduce (sum) over `group`.
    """
    return x if _is_dense(group) else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Leave the TP region by summing per-rank partial results.

    forward: all-reduce (sum) over `group`, backward: identity.
    """
    return x if _is_dense(group) else _ReduceFromTP.apply(x, group)


def sum_in_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Total of per-rank partials (e.g. sums of squares over each rank's heads) used by every rank inside the region.

    forward: all-reduce (sum) over `group`, backward: all-reduce (sum) -- unlike reduce_from_tp_region, whose output
    feeds replicated computation that already yields the complete gradient on every rank.
    """
    return x if _is_dense(group) else _SumInTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Keep this rank's chunk of the last dim ([..., n] -> [..., n/tp]).

    forward: split along the last dim, no communication, backward: all-gather along the last dim.
    """
    return x if _is_dense(group) else _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's chunk along the last dim ([..., n/tp] -> [..., n]).

    forward: all-gather along the last dim, backward: split along the last dim (keep the local chunk), no communication.
    """
    return x if _is_dense(group) else _GatherFromTP.apply(x, group)


# gather into TP: inside the TP region every rank holds a partial dL/dx (its own heads / ffn columns): sum them,
# keep this rank's slice
_GatherSeqIntoTP = _collective("_GatherSeqIntoTP", _seq_gather, _seq_reduce_scatter)
# gather for a replicated consumer: its grad is already complete and replicated (it entered the TP region via
# copy_to_tp_region), so each rank keeps its slice
_GatherSeq = _collective("_GatherSeq", _seq_gather, _seq_split)
_ReduceScatterSeq = _collective("_ReduceScatterSeq", _seq_reduce_scatter, _seq_gather)
_ScatterSeq = _collective("_ScatterSeq", _seq_split, _seq_gather)


def gather_sequence_into_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Enter the TP region from the sequence-parallel residual stream ([b, s/tp, d] -> [b, s, d]).

    forward: all-gather along the sequence, backward: reduce-scatter along the sequence (replaces
    copy_to_tp_region's backward all-reduce under sequence parallelism).
    """
    return x if _is_dense(group) else _GatherSeqIntoTP.apply(x, group)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Leave the TP region into the sequence-parallel stream: sum per-rank partials, keep this rank's slice.

    forward: reduce-scatter along the sequence ([b, s, d] -> [b, s/tp, d]), backward: all-gather along the sequence
    (replaces reduce_from_tp_region's forward all-reduce under sequence parallelism).
    """
    return x if _is_dense(group) else _ReduceScatterSeq.apply(x, group)


def gather_sequence(x: torch.Tensor, group=None) -> torch.Tensor:
    """Leave sequence parallelism for a consumer that takes a replicated input and makes its grad replicated
    (the head / fused losses enter the TP region through copy_to_tp_region).

    forward: all-gather along the sequence, backward: keep this rank's slice of the grad (no communication).
    """
    return x if _is_dense(group) else _GatherSeq.apply(x, group)


def scatter_to_sequence_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Keep this rank's slice of a replicated [b, s, ...] tensor.

    forward: split along the sequence (no communication), backward: all-gather along the sequence.
    """
    return x if _is_dense(group) else _ScatterSeq.apply(x, group)


# Entering the TP region through column-parallel matmuls that share one input (Q / K / V, SwiGLU gate / up) as one
# autograd node, Megatron-style:
# - under sequence parallelism the all-gathered [b, s, d] input is not kept for backward: the node saves this
#   rank's [b, s/tp, d] slice and all-gathers it again in backward (tp x less activation memory for these inputs),
#   the re-gather overlapping the input-gradient matmuls;
# - the input gradient's reduction (reduce-scatter under sequence parallelism, else the all-reduce of
#   copy_to_tp_region) overlaps the weight-gradient matmuls.
# In a torch.compile graph the collectives are issued synchronously (Inductor schedules the traced graph itself).
def _async_ok() -> bool:
    return not torch.compiler.is_compiling()


class _ColumnsEntry(torch.autograd.Function):
    """y_i = X W_i^T for the weights W_i of several column-parallel linears reading one X (see above)."""

    @staticmethod
    def forward(ctx, x, group, sequence_parallel, *weights):
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        full = _seq_gather(x, group) if sequence_parallel else x  # [b, s, d]
        ctx.save_for_backward(x, *weights)  # x: this rank's slice under sequence parallelism
        return tuple(torch.nn.functional.linear(full, w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        group, sp = ctx.group, ctx.sequence_parallel
        gathering = _seq_gather_start(x, group, _async_ok()) if sp else None  # overlaps the input-gradient matmuls
        grad_x = None
        for g, w in zip(grads, weights):
            if g is not None:
                part = g @ w  # [b, s, d]
                grad_x = part if grad_x is None else grad_x.add_(part)
        full = gathering() if sp else x
        if grad_x is None:
            grad_x = torch.zeros_like(full)
        start = _seq_reduce_scatter_start if sp else _all_reduce_start
        reducing = start(grad_x, group, _async_ok())
        grad_ws = []  # overlap the reduction of grad_x
        full2d = full.reshape(-1, full.shape[-1])
        for i, (g, w) in enumerate(zip(grads, weights)):
            if g is None or not ctx.needs_input_grad[3 + i]:
                grad_ws.append(None)
            else:
                grad_ws.append(g.reshape(-1, g.shape[-1]).t() @ full2d)  # [out/tp, d]
        return (reducing(), None, None, *grad_ws)


def columns_entry(x: torch.Tensor, weights, group=None, sequence_parallel: bool = False):
    """Enter the TP region through column-parallel weights sharing the input x: tuple of x_full W_i^T.

    x is replicated [b, s, d], or this rank's sequence slice [b, s/tp, d] with sequence_parallel (then all-gathered
    forward). Backward sums the input gradients of all W_i and reduces them once over `group` (reduce-scatter under
    sequence parallelism, else all-reduce). Dense (group None or of size 1): plain matmuls.
    """
    dense = _is_dense(group)
    if dense or not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))):
        # dense, or no backward (the teacher, eval): plain matmuls, nothing kept
        full = _seq_gather(x, group) if sequence_parallel and not dense else x
        return tuple(torch.nn.functional.linear(full, w) for w in weights)
    return _ColumnsEntry.apply(x, group, bool(sequence_parallel), *weights)
