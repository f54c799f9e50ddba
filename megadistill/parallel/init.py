"""Process-group start-up: the only place that reads the launcher's environment (torchrun / srun / single process)."""
from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_env_fallback() -> None:
    """Under `srun` without torchrun, derive the torch env vars from SLURM's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(backend: str = "auto", timeout_s: Optional[float] = None) -> DistInfo:
    """Initialise torch.distributed (through DeepSpeed) once per process; a bare process becomes a world of 1.

    backend: auto (nccl when CUDA is available, else gloo) | nccl | gloo. timeout_s: how long a collective may wait
    for its peers before it fails (parallel.timeout_s; None: torch's default).
    """
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    _slurm_env_fallback()
    if "RANK" not in os.environ:  # plain `megadistill train` on one process
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        import deepspeed
        kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **kw)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        log.info("distributed: world_size=%d backend=%s", world, backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)
