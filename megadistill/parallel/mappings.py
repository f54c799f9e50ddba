"""Named autograd collectives that move activations into and out of the tensor-parallel (TP) region."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# Convention: `group=None` means "no tensor parallelism" (a dense single process), NOT the WORLD group as in
# torch.distributed; every function below is then the identity, as it is for a group of size 1.


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Number of ranks in `group`; 1 when group is None (dense)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    """This process's rank inside `group`; 0 when group is None (dense)."""
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # Reduce into a fresh buffer: the input may be saved for another node's backward.
    out = x.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


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


def _is_dense(group) -> bool:
    return group is None or group_size(group) == 1


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # Each rank holds only its shard's contribution to dL/dx; the full gradient is their sum.
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        # d(sum_r x_r)/dx_r = I: every rank's partial receives the same (replicated) gradient.
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


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
