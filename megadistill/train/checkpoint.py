"""Checkpoints: atomic DeepSpeed + trainer-state saves with a `latest` pointer, and consolidated safetensors weights."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megadistill.errors import UserError
from megadistill.fileio import atomic_write_bytes, fsync_dir as _fsync_dir
from megadistill.parallel.groups import ParallelGroups

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
MODEL_DIR = "model"  # <run_dir>/model/: consolidated weights + config.yaml of a finished run


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp name, fsync, rename: readers see the old or the new file, never a torn one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def latest_tag(run_dir: Path) -> Optional[str]:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (pointer.parent / tag).is_dir():
        raise UserError(f"{pointer} names checkpoint {tag!r}, which does not exist; delete the pointer to restart "
                        "from the newest complete checkpoint")
    return tag


def save(engine, run_dir: Path, step: int, rank_state: Dict, keep: int) -> str:
    """Save the engine (model, optimizer, scheduler; ZeRO-sharded) and this rank's trainer state; move `latest` last.

    Every rank calls this. The checkpoint is written under a temporary tag and renamed by rank 0 once all ranks are
    done, so a crash mid-save leaves the previous checkpoint as `latest`. Assumes a filesystem shared by all nodes.
    """
    root = Path(run_dir) / "checkpoints"
    tag, tmp_tag = f"step_{step:08d}", f"step_{step:08d}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    (root / tmp_tag).mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / tmp_tag / f"trainer_state_rank{rank:05d}.json", json.dumps(rank_state))
    _barrier()
    if rank == 0:
        shutil.rmtree(root / tag, ignore_errors=True)
        os.replace(root / tmp_tag, root / tag)
        _fsync_dir(root)
        atomic_write_text(root / "latest", tag + "\n")
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and p.name != tag)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        log.info("checkpoint %s written", root / tag)
    _barrier()
    return tag


def load(engine, run_dir: Path) -> Optional[Dict]:
    """Restore the newest checkpoint into the engine; return this rank's trainer state (None when there is none)."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    root = Path(run_dir) / "checkpoints"
    engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    state_file = root / tag / f"trainer_state_rank{rank:05d}.json"
    if not state_file.is_file():
        raise UserError(f"{state_file} is missing: the checkpoint was written with a different world size; "
                        "resume with the same number of processes")
    return json.loads(state_file.read_text())


def _is_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def _full_tensor(p: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """This TP rank's shard -> the full tensor (concatenated along its partition_dim over the TP group)."""
    t = p.detach()
    if not _is_sharded(p) or groups.tp_size == 1:
        return t.clone()
    if getattr(p, "partition_stride", 1) != 1:
        raise RuntimeError(f"partition_stride={p.partition_stride} is not supported by the consolidator")
    parts = [torch.empty_like(t) for _ in range(groups.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=groups.tp_group)
    return torch.cat(parts, dim=p.partition_dim)


def consolidated_state(module: torch.nn.Module, groups: ParallelGroups, zero3: bool) -> Dict[str, torch.Tensor]:
    """Full fp32 weights on global rank 0 (empty dict elsewhere), one parameter gathered at a time."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: Dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if zero3:
            import deepspeed
            with deepspeed.zero.GatheredParameters([p]):
                full = _full_tensor(p, groups)
        else:
            full = _full_tensor(p, groups)
        if rank == 0:
            out[name] = full.float().cpu().contiguous()
    return out


def write_weights(state: Dict[str, torch.Tensor], out_dir: Path, config_yaml: str) -> None:
    """Rank 0: write model.safetensors + config.yaml atomically into out_dir."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "megadistill-v1"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / WEIGHTS)
    atomic_write_text(out_dir / "config.yaml", config_yaml)


def find_weights(path: str) -> Path:
    """A teacher reference -> the directory holding model.safetensors + config.yaml (a run dir or an export dir)."""
    p = Path(path)
    for cand in (p, p / MODEL_DIR):
        if (cand / WEIGHTS).is_file() and (cand / "config.yaml").is_file():
            return cand
    raise UserError(f"no consolidated weights under {path!r} (looked for {WEIGHTS} in it and in {MODEL_DIR}/): "
                    f"finish the teacher run, or run `megadistill export {path} -o DIR` and point distill.teacher at DIR")


def load_sharded_weights(module: torch.nn.Module, weights_dir: Path, groups: ParallelGroups) -> None:
    """Load full weights into a (possibly TP-sharded) module: each rank reads only its slice along partition_dim,
    straight from the file (no full tensor, no mapping of the file)."""
    from megadistill.hf.weights import load_into

    load_into(module, Path(weights_dir), groups.tp_rank, groups.tp_size, hf_names=False)
