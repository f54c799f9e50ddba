"""ParallelGroups: the tensor- and data-parallel process groups, built once and passed down, plus DeepSpeed's `mpu`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch.distributed as dist

from megadistill.errors import UserError

# Layout (TP-contiguous, as Megatron): with world W and tensor-parallel size t, dp = W / t and
#   TP group k = ranks [k t, (k + 1) t)             (k = 0 .. dp-1)   -> neighbours share a node's fast links
#   DP group j = ranks {j, j + t, j + 2t, ...}      (j = 0 .. t-1)    -> same tp_rank, i.e. the same weight shard
# so rank = dp_rank * t + tp_rank.


@dataclass
class ParallelGroups:
    """Which groups this rank belongs to; `tp_group` / `dp_group` are None in a single process."""

    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    tp_group: Optional[Any]
    dp_size: int
    dp_rank: int
    dp_group: Optional[Any]
    tp_ranks: Tuple[int, ...] = field(default=(0,))  # global ranks of this rank's TP group, in tp_rank order
    dp_ranks: Tuple[int, ...] = field(default=(0,))  # global ranks of this rank's DP group, in dp_rank order
    # the same ranks as tp_group in a group of their own, for a co-resident teacher (None: it uses tp_group). On NCCL
    # each process group has its own communicator and stream, so a prefetched teacher's TP collectives run beside the
    # student's instead of queueing in one stream behind (or ahead of) them.
    teacher_tp_group: Optional[Any] = None

    @classmethod
    def single(cls) -> "ParallelGroups":
        """One process, no tensor or data parallelism; needs no torch.distributed."""
        return cls(world_size=1, rank=0, tp_size=1, tp_rank=0, tp_group=None,
                   dp_size=1, dp_rank=0, dp_group=None, tp_ranks=(0,), dp_ranks=(0,))

    @classmethod
    def build(cls, tp_size: int, teacher_tp_group: bool = False) -> "ParallelGroups":
        """Create the TP and DP groups of an initialised torch.distributed job (collective: every rank calls it).

        teacher_tp_group=True (with tp_size > 1) also creates a second TP group over the same ranks for the teacher."""
        if not dist.is_initialized():
            raise UserError("ParallelGroups.build needs torch.distributed initialised first "
                            "(launch with torchrun / the launch/ scripts, or use ParallelGroups.single())")
        world, rank = dist.get_world_size(), dist.get_rank()
        if tp_size < 1 or world % tp_size:
            raise UserError(f"parallel.tp_size={tp_size} does not divide the world size {world}; "
                            f"pick a divisor of {world}")
        dp_size = world // tp_size
        tp_group = dp_group = teacher_tp = None
        tp_ranks = dp_ranks = ()
        # new_group is collective over WORLD: every rank creates every group, in the same order.
        for k in range(dp_size):
            ranks = tuple(range(k * tp_size, (k + 1) * tp_size))
            g = dist.new_group(list(ranks))
            if rank in ranks:
                tp_group, tp_ranks = g, ranks
        for j in range(tp_size):
            ranks = tuple(range(j, world, tp_size))
            g = dist.new_group(list(ranks))
            if rank in ranks:
                dp_group, dp_ranks = g, ranks
        if teacher_tp_group and tp_size > 1:
            for k in range(dp_size):
                ranks = tuple(range(k * tp_size, (k + 1) * tp_size))
                g = dist.new_group(list(ranks))
                if rank in ranks:
                    teacher_tp = g
        return cls(world_size=world, rank=rank, tp_size=tp_size, tp_rank=rank % tp_size, tp_group=tp_group,
                   dp_size=dp_size, dp_rank=rank // tp_size, dp_group=dp_group,
                   tp_ranks=tp_ranks, dp_ranks=dp_ranks, teacher_tp_group=teacher_tp)

    @property
    def is_tp_src(self) -> bool:
        """True on tp_rank 0, the rank that writes replicated state (logs, norms) once per TP group."""
        return self.tp_rank == 0

    def mpu(self) -> "DeepSpeedMPU":
        """The adapter DeepSpeed takes as `deepspeed.initialize(..., mpu=...)`."""
        return DeepSpeedMPU(self)

    def factory(self, device=None, dtype=None, sequence_parallel: bool = False):
        """A LayerFactory over this rank's TP group (dense when tp_size is 1), optionally sequence-parallel."""
        from megadistill.parallel.layers import LayerFactory
        return LayerFactory(self.tp_group if self.tp_size > 1 else None, device=device, dtype=dtype,
                            sequence_parallel=sequence_parallel)

    def teacher_factory(self, device=None, dtype=None, sequence_parallel: bool = False):
        """The teacher's LayerFactory: the student's TP layout, over teacher_tp_group when there is one."""
        from megadistill.parallel.layers import LayerFactory
        group = self.teacher_tp_group if self.teacher_tp_group is not None else self.tp_group
        return LayerFactory(group if self.tp_size > 1 else None, device=device, dtype=dtype,
                            sequence_parallel=sequence_parallel)


class DeepSpeedMPU:
    """Megatron-style `mpu` object with the getters DeepSpeed's engine, ZeRO 1/2/3 and grad-norm code call.

    "Model parallel" here is tensor parallel only (no pipeline): ZeRO partitions over the DP group, and the
    global grad norm sums squared norms over the model-parallel group, counting a parameter on tp_rank > 0
    only if it carries `tensor_model_parallel=True`. There is deliberately no `initialize_sequence_parallel`:
    DeepSpeed treats an mpu that has it as Ulysses sequence parallelism and ignores the DP group.
    """

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    # tensor (= model) parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.groups.tp_size

    def get_tensor_model_parallel_group(self):
        return self.groups.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tp_rank 0 in this rank's TP group (the broadcast source)."""
        return self.groups.tp_ranks[0]

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dp_size

    def get_data_parallel_group(self):
        return self.groups.dp_group

    def get_data_parallel_group_ranks(self):
        return list(self.groups.dp_ranks)

    # no sequence parallelism: the "sequence-data" group is the DP group
    def get_sequence_parallel_rank(self) -> int:
        return 0

    def get_sequence_parallel_world_size(self) -> int:
        return 1

    get_sequence_data_parallel_rank = get_data_parallel_rank
    get_sequence_data_parallel_world_size = get_data_parallel_world_size
    get_sequence_data_parallel_group = get_data_parallel_group

    # no pipeline parallelism
    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1
