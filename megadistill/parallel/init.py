"""Process-group start-up: the only place that reads the launcher's environment (torchrun / srun / single process)."""
from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megadistill.errors import UserError

log = logging.getLogger(__name__)

# A torch JIT-extension build (DeepSpeed's shm op on CPU: about a minute) holds <extensions dir>/<op>/lock; a process
# killed meanwhile (a preempted SLURM job, a timeout) leaves the file, and every later load of the op waits for it to
# vanish, forever. A lock older than this is taken to be such a leftover.
STALE_BUILD_LOCK_S = 600.0


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


def launch_rank() -> Tuple[int, int]:
    """(rank, world size) this process was launched as, read before any process group exists: torchrun's RANK /
    WORLD_SIZE, else srun's SLURM_PROCID / SLURM_NTASKS; (0, 1) for a plain process."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", "1"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun without torchrun (_slurm_env_fallback)
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S, root: Optional[str] = None) -> List[Path]:
    """Remove JIT-extension build locks older than max_age_s under `root` (TORCH_EXTENSIONS_DIR, else torch's default
    build root) and return them; younger ones are kept and named in a warning (a build in progress, or a leftover the
    next start will clear)."""
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    removed, now = [], time.time()
    for lock in sorted(Path(root).glob("*/*/lock")) + sorted(Path(root).glob("*/lock")):
        try:
            age = now - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                removed.append(lock)
                log.warning("removed the build lock %s, left %.0f s ago by a process that died while building the "
                            "op: it would have made this start wait forever", lock, age)
            else:
                log.warning("build lock %s is %.0f s old: this start waits for it; if no process is building the op, "
                            "remove the file", lock, age)
        except FileNotFoundError:  # released meanwhile
            continue
    return removed


def init_distributed(backend: str = "auto", timeout_s: Optional[float] = None) -> DistInfo:
    """Initialise torch.distributed (through DeepSpeed) once per process; a bare process becomes a world of 1.

    backend: auto (nccl when CUDA is available, else gloo; an existing process group's backend) | nccl | gloo.
    timeout_s: how long a collective may wait for its peers before it fails (parallel.timeout_s; None: torch's
    default). A process group that already exists is used as it is: gloo there keeps the model on the CPU even with
    CUDA present.
    """
    if dist.is_initialized():  # a process group made before us (a test harness, a notebook) decides the backend
        running = str(dist.get_backend())
        if backend not in ("auto", running):
            raise UserError(f"parallel.backend={backend} but torch.distributed already runs {running}; set "
                            f"parallel.backend={running} (or auto)")
        backend = running
    elif backend == "auto":
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
        clear_stale_build_locks()  # DeepSpeed JIT-loads its ops from here on
        import deepspeed
        kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **kw)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        log.info("distributed: world_size=%d backend=%s", world, backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)
