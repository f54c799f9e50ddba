"""Checkpoints: atomic DeepSpeed + trainer-state saves with a `latest` pointer and a verified manifest, resume-point
selection (`train.resume=true | latest_valid`), pickle-free loading, and consolidated safetensors weights."""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megadistill.errors import UserError
from megadistill.fileio import atomic_write_bytes, fsync_dir as _fsync_dir
from megadistill.parallel.groups import ParallelGroups

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
MODEL_DIR = "model"  # <run_dir>/model/: consolidated weights + config.yaml of a finished run
MANIFEST = "manifest.json"  # in each checkpoint: every file with its size and CRC-32, written last before the rename
CONFIG = "config.yaml"  # in each checkpoint: the resolved config of the run that wrote it (resume checks)
_TAG = re.compile(r"step_(\d{8})")  # a complete checkpoint's directory name; a write in progress is step_N.tmp


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from (missing, truncated, corrupt, refused); the message says what to do."""


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
        raise CheckpointError(f"{pointer} names checkpoint {tag!r}, which does not exist"
                              + _fallback_hint(pointer.parent))
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
        remove_partial(root)
    _barrier()
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    except (OSError, RuntimeError) as e:  # torch.save reports a refused write (disk full, quota) as a RuntimeError
        raise CheckpointError(f"could not write checkpoint {root / tmp_tag} ({str(e).strip().splitlines()[-1]}; disk "
                              "full or over a quota?). The previous checkpoint is intact and stays `latest`; the "
                              "partial one is removed on resume. Free space, then resume with train.resume=true"
                              ) from None
    (root / tmp_tag).mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / tmp_tag / f"trainer_state_rank{rank:05d}.json", json.dumps(rank_state))
    if rank == 0 and (Path(run_dir) / CONFIG).is_file():
        atomic_write_bytes(root / tmp_tag / CONFIG, (Path(run_dir) / CONFIG).read_bytes())
    _barrier()
    _write_manifest(root / tmp_tag, step, rank)
    _barrier()
    if rank == 0:
        shutil.rmtree(root / tag, ignore_errors=True)
        os.replace(root / tmp_tag, root / tag)
        _fsync_dir(root)
        atomic_write_text(root / "latest", tag + "\n")
        old = [p for p in complete_checkpoints(root) if _step_of(p) < step]  # newer ones: an abandoned future
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        log.info("checkpoint %s written", root / tag)
    _barrier()
    return tag


def load(engine, ckpt: Path) -> Dict:
    """Restore checkpoint directory `ckpt` (from resume_point) into the engine; return this rank's trainer state.
    The caller has checked the world size (check_world_size), before building the engine."""
    ckpt = Path(ckpt)
    rank = dist.get_rank() if dist.is_initialized() else 0
    state_file = ckpt / f"trainer_state_rank{rank:05d}.json"
    zero_shards = any(ckpt.glob("*zero_pp_rank_*optim_states.pt"))
    if engine.zero_optimization_stage() >= 1 and not zero_shards and any(ckpt.glob("mp_rank_*_model_states.pt")):
        raise CheckpointError(f"{ckpt} holds its optimizer state without ZeRO (written at ZeRO stage 0) but this run "
                              "uses ZeRO's optimizer (a bf16 run on one DP rank runs ZeRO-1 unless zero.stage=0; "
                              "megadistill.train.engine.zero_stage_at): resume it with zero.stage=0")
    load_engine(engine, ckpt, load_optimizer_states=True, load_lr_scheduler_states=True)
    return json.loads(state_file.read_text())


# ---- integrity: manifest, verification, resume point, partial writes -------------------------------------------

def written_world_size(ckpt: Path) -> int:
    """How many processes wrote checkpoint `ckpt`: each writes its own trainer state (data position, RNG)."""
    return len(list(Path(ckpt).glob("trainer_state_rank*.json")))


def check_world_size(ckpt: Path, world_size: int) -> None:
    """A run resumes on the number of processes that wrote its checkpoint; anything else is a UserError saying so,
    raised before any engine is built (DeepSpeed itself fails deep in its loader: an AssertionError, or a None
    optimizer state when fewer ranks leave ZeRO's partitions unread)."""
    written = written_world_size(ckpt)
    if written != world_size:
        raise UserError(f"{ckpt} was written by {written} processes and this run has {world_size}: a run resumes on "
                        "the number of processes that wrote its checkpoint (each rank's data position, RNG and ZeRO "
                        f"partition are its own). Relaunch on {written} processes (launch/train.sh: NNODES x NPROC = "
                        f"{written}); `megadistill eval` and `export` read a run at any size")


def _step_of(path: Path) -> int:
    return int(_TAG.fullmatch(path.name).group(1))


def complete_checkpoints(root: Path) -> List[Path]:
    """Renamed (finished) checkpoint dirs under root, oldest first; partial (.tmp) and set-aside (.bad) ones excluded."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _TAG.fullmatch(p.name)), key=_step_of)


def remove_partial(root: Path) -> None:
    """Rank 0: delete checkpoint writes that never finished (step_N.tmp: a kill or a full disk mid-save)."""
    for p in sorted(Path(root).glob("step_*.tmp")):
        log.warning("removing %s: a checkpoint write that did not finish (the previous checkpoint is intact)", p)
        shutil.rmtree(p, ignore_errors=True)


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (all_gather_object; [obj] in a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 24)
            if not chunk:
                return crc
            crc = zlib.crc32(chunk, crc)


def _write_manifest(ckpt: Path, step: int, rank: int) -> None:
    """Every rank: CRC its share of the files (all ranks' listings merged, so no rank misses one), rank 0 writes them."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    here = [p.name for p in ckpt.iterdir() if p.is_file() and p.name != MANIFEST]
    names = sorted(set().union(*gather_objects(here)))
    mine = {n: {"bytes": (ckpt / n).stat().st_size, "crc32": _crc32(ckpt / n)} for n in names[rank::world]}
    files = {k: v for part in gather_objects(mine) for k, v in part.items()}
    if rank == 0:
        atomic_write_text(ckpt / MANIFEST, json.dumps({"version": 1, "step": step, "world_size": world,
                                                       "files": files}, indent=1, sort_keys=True) + "\n")


def verify(ckpt: Path) -> Optional[str]:
    """What is wrong with checkpoint dir `ckpt` (None: complete and intact). Every rank calls it and gets the same
    answer: each checks all sizes and the CRC-32 of its share of the files. A checkpoint written before manifests
    existed is accepted unverified, with a warning."""
    ckpt = Path(ckpt)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    problem = None
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        if any(ckpt.glob("*.pt")) and any(ckpt.glob("trainer_state_rank*.json")):
            if rank == 0:
                log.warning("%s has no %s (written by an older megadistill): resuming from it unverified", ckpt,
                            MANIFEST)
            files = {}
        else:
            files, problem = {}, f"{ckpt} has no {MANIFEST} and no checkpoint files: it is not a complete checkpoint"
    except (OSError, ValueError, KeyError, TypeError) as e:
        files, problem = {}, f"{ckpt / MANIFEST} is unreadable ({e})"
    for i, (name, want) in enumerate(sorted(files.items())):
        if problem:
            break
        path = ckpt / name
        if not path.is_file():
            problem = f"{path} is missing (a shard of this checkpoint)"
        elif path.stat().st_size != want["bytes"]:
            problem = f"{path} is truncated or overwritten ({path.stat().st_size} bytes, {want['bytes']} written)"
        elif i % world == rank and _crc32(path) != want["crc32"]:
            problem = f"{path} is corrupt (its CRC-32 differs from the one recorded when it was written)"
    found = [p for p in gather_objects(problem) if p]
    return found[0] if found else None


_LOCAL_HINT = ("train.resume=latest_valid resumes from the newest checkpoint that verifies (or start afresh in another "
               "train.run_dir)")  # where only some ranks may fail: no collective to find which one


def _fallback_hint(root: Path, exclude: Optional[str] = None) -> str:
    """The way out, naming the checkpoint train.resume=latest_valid would pick (collective: every rank calls it)."""
    older = [p for p in reversed(complete_checkpoints(root)) if p.name != exclude]
    for p in older:
        if verify(p) is None:
            return (f". Resume from the newest complete checkpoint ({p.name}) with train.resume=latest_valid, "
                    "or start afresh in another train.run_dir")
    return (". No other complete checkpoint exists: start afresh (another train.run_dir, or remove "
            f"{root}) or restore the checkpoint from a backup")


def resume_point(run_dir: Path, mode: str = "true", clean: bool = True) -> Optional[Path]:
    """The checkpoint dir to resume from, verified (None: there is none, a fresh start). Every rank calls it.

    mode "true": the one `latest` names; if it is missing, truncated or corrupt, a CheckpointError names the fault and
    offers the fallback. "latest_valid": the newest checkpoint that verifies; the broken newer ones are set aside as
    <name>.bad (nothing is deleted) and `latest` is moved to the one chosen. clean: remove partial writes (.tmp) first
    (the resuming job owns the run dir; a reader of a live run must not).
    """
    root = Path(run_dir) / "checkpoints"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if clean and rank == 0 and root.is_dir():
        remove_partial(root)
    _barrier()
    pointer = root / "latest"
    complete = complete_checkpoints(root)
    if mode != "latest_valid":
        if not pointer.is_file():
            if complete:
                raise CheckpointError(f"{pointer} is missing but {root} holds {[p.name for p in complete]}"
                                      + _fallback_hint(root))
            return None
        tag = pointer.read_text().strip()
        ckpt = root / tag
        problem = (verify(ckpt) if _TAG.fullmatch(tag) and ckpt.is_dir() else
                   f"{pointer} names checkpoint {tag!r}, which does not exist")
        if problem:
            raise CheckpointError(problem + _fallback_hint(root, exclude=tag))
        return ckpt
    skipped = []
    for ckpt in reversed(complete):
        problem = verify(ckpt)
        if problem is None:
            if rank == 0:
                for bad, why in skipped:
                    log.warning("train.resume=latest_valid: skipping %s (%s); set aside as %s.bad", bad.name, why,
                                bad.name)
                    os.replace(bad, bad.with_name(bad.name + ".bad"))
                if not pointer.is_file() or pointer.read_text().strip() != ckpt.name:
                    atomic_write_text(pointer, ckpt.name + "\n")
                log.info("train.resume=latest_valid: resuming from %s", ckpt)
            _barrier()
            return ckpt
        skipped.append((ckpt, problem))
    if skipped:
        raise CheckpointError(f"no checkpoint under {root} is intact: " + "; ".join(w for _, w in skipped)
                              + ". Start afresh in another train.run_dir, or restore a checkpoint from a backup")
    return None


# ---- pickle-free loading ------------------------------------------------------------------------------------------

def _deepspeed_safe_globals() -> list:
    """The only non-tensor classes DeepSpeed's checkpoints hold (plain data: a namedtuple, an enum, a scale record);
    everything else must pass torch.load(weights_only=True), which refuses any other pickled callable."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path, map_location=None, mmap: bool = False):
    """torch.load with weights_only=True and DeepSpeed's few data classes allowed; a crafted pickle is refused.
    mmap=True maps the file: a tensor's pages are read when it is used."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def checked_load(path, map_location=None, mmap: bool = False):
    """safe_torch_load of one checkpoint file; a refused pickle or an unreadable file is a CheckpointError naming it."""
    try:
        return safe_torch_load(path, map_location, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds pickled code, not only tensors and plain data: refused (a checkpoint "
                              f"from an untrusted source?). {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} cannot be read ({str(e).splitlines()[0]}): the checkpoint is damaged. "
                              + _LOCAL_HINT) from None


def load_engine(engine, ckpt: Path, **kw) -> None:
    """engine.load_checkpoint(ckpt) with every file read by checked_load; unreadable / refused / missing files are
    a CheckpointError naming the checkpoint (DeepSpeed itself would warn and carry on with what it has)."""
    ckpt = Path(ckpt)
    ce = engine.checkpoint_engine
    saved = ce.__dict__.get("load")
    ce.load = checked_load
    try:
        path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, **kw)
    finally:
        if saved is None:
            del ce.load
        else:
            ce.load = saved
    if path is None:
        raise CheckpointError(f"{ckpt} has no model states for this rank (DeepSpeed found none to load). "
                              + _LOCAL_HINT)


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


def _publish_weights(out_dir: Path, write: Callable[[Path], None], config_yaml: str) -> None:
    """model.safetensors written by `write` under a temp name, fsynced and renamed, then config.yaml, into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{WEIGHTS}.tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / WEIGHTS)
    atomic_write_text(out_dir / "config.yaml", config_yaml)


def write_weights(state: Dict[str, torch.Tensor], out_dir: Path, config_yaml: str) -> None:
    """Rank 0: write model.safetensors + config.yaml atomically into out_dir."""
    from safetensors.torch import save_file

    _publish_weights(out_dir, lambda tmp: save_file(state, str(tmp), metadata={"format": "megadistill-v1"}),
                     config_yaml)


def copy_weights(weights_dir: Path, out_dir: Path, config_yaml: str) -> None:
    """Rank 0: weights_dir's model.safetensors (consolidated weights) copied byte for byte, streamed, no tensor
    loaded, + config.yaml, atomically into out_dir."""
    _publish_weights(out_dir, lambda tmp: shutil.copyfile(Path(weights_dir) / WEIGHTS, tmp), config_yaml)


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
