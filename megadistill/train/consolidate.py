"""Consolidate a checkpoint's student weights offline: one process, no DeepSpeed engine, no torch.distributed.

A checkpoint is written in the layout of the processes that wrote it: per TP rank t, either DeepSpeed's module states
(`mp_rank_TT_model_states.pt`, ZeRO stages 0-2: the TP shard whole, in the run's dtype) or, under ZeRO-3, each DP
rank's slice of every parameter inside the optimizer's fp32 flat groups (`*zero_pp_rank_D_mp_rank_TT_optim_states.pt`;
the parameter order and shapes are in `zero_pp_rank_D_mp_rank_TT_model_states.pt`). This module reassembles them into
one TP rank's shard (tp_shard: what an eval as written loads) or the full weights `export` writes (checkpoint_weights:
fp32, our parameter names), so a run -- finished or not, no engine built -- can be evaluated or exported on any number
of processes. Files are memory-mapped: the optimizer's moments are never read.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import torch

from megadistill.config import Config
from megadistill.train.checkpoint import CheckpointError, checked_load

STUDENT = "student."  # the engine's module is the Objective; the student is its `student`


def _load(path: Path) -> dict:
    if not Path(path).is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    return checked_load(path, map_location="cpu", mmap=True)


def _zero3_files(ckpt: Path, tp_rank: int) -> List[Path]:
    """This TP rank's ZeRO-3 model-state files, in DP-rank order ([] if the checkpoint is not ZeRO-3)."""
    pat = re.compile(rf"zero_pp_rank_(\d+)_mp_rank_{tp_rank:02d}_model_states\.pt")
    found = {int(m.group(1)): p for p in ckpt.iterdir() if (m := pat.fullmatch(p.name))}
    if found and sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{ckpt} holds the ZeRO-3 model states of DP ranks {sorted(found)} for TP rank "
                              f"{tp_rank}: some are missing")
    return [found[d] for d in range(len(found))]


def _optim_file(ckpt: Path, dp_rank: int, tp_rank: int) -> Path:
    name = f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"
    found = sorted(ckpt.glob(f"*{name}"))  # prefixed with the precision: bf16_zero_pp_rank_..., or none
    if len(found) != 1:
        raise CheckpointError(f"{ckpt} has {len(found)} optimizer-state files for DP rank {dp_rank}, TP rank "
                              f"{tp_rank} (*{name}); a ZeRO-3 checkpoint holds exactly one")
    return found[0]


def _partition(ckpt: Path, state_file: Path, dp_rank: int, tp_rank: int, dp: int) -> Dict[str, torch.Tensor]:
    """One DP rank's ZeRO-3 partition of each parameter of TP rank tp_rank, by name: ceil(numel / dp) fp32 elements
    (the last rank's padded), laid end to end per parameter group in that rank's fp32 flat group -- what its
    ds_tensor holds, in the parameter order and shapes of its model-state file."""
    groups = _load(state_file)["param_shapes"]  # one {name: shape at this TP rank} per parameter group, in flat order
    flat = _load(_optim_file(ckpt, dp_rank, tp_rank))["optimizer_state_dict"]["fp32_flat_groups"]
    if len(flat) != len(groups):
        raise CheckpointError(f"{state_file}: {len(groups)} parameter groups but {len(flat)} fp32 flat groups in its "
                              "optimizer states; the checkpoint's files are from different runs")
    out: Dict[str, torch.Tensor] = {}
    for g, shapes in enumerate(groups):
        offset = 0
        for name, shape in shapes.items():
            part = -(-shape.numel() // dp)
            out[name] = flat[g].narrow(0, offset, part)
            offset += part
        if offset != flat[g].numel():
            raise CheckpointError(f"{state_file}: parameter group {g} holds {flat[g].numel()} elements, its "
                                  f"parameters {offset}; the checkpoint's files are from different runs")
    return out


def zero3_partition(ckpt: Path, dp_rank: int, tp_rank: int) -> Dict[str, torch.Tensor]:
    """DP rank dp_rank's ZeRO-3 partition of TP rank tp_rank's parameters (see _partition): what a launch of the
    writers' layout loads into its own ds_tensors."""
    files = _zero3_files(Path(ckpt), tp_rank)
    if not files:
        raise CheckpointError(f"{ckpt} holds no ZeRO-3 model states for TP rank {tp_rank}")
    return _partition(Path(ckpt), files[dp_rank], dp_rank, tp_rank, len(files))


def _zero3_shard(ckpt: Path, tp_rank: int, files: List[Path]) -> Dict[str, torch.Tensor]:
    """TP rank tp_rank's parameters under ZeRO-3, its DP ranks' partitions joined. Returned in the dtype the run
    computed in (the one its module placeholders carry), as the engine's own export gathers them."""
    dp = len(files)
    parts = [_partition(ckpt, files[d], d, tp_rank, dp) for d in range(dp)]
    first = _load(files[0])
    module, shapes = first["module"], {k: v for g in first["param_shapes"] for k, v in g.items()}
    return {name: torch.cat([p[name] for p in parts]).narrow(0, 0, shape.numel()).view(shape).to(module[name].dtype)
            for name, shape in shapes.items()}


def tp_shard(ckpt: Path, tp_rank: int) -> Dict[str, torch.Tensor]:
    """TP rank tp_rank's parameters as it trained them (its shard of each TP-split weight, all of the others)."""
    files = _zero3_files(ckpt, tp_rank)
    if files:
        return _zero3_shard(ckpt, tp_rank, files)
    return _load(ckpt / f"mp_rank_{tp_rank:02d}_model_states.pt")["module"]


def student_part(shard: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The student's entries of a tp_shard, named as the student's own state_dict names them."""
    return {k[len(STUDENT):]: v for k, v in shard.items() if k.startswith(STUDENT)}


def checkpoint_weights(ckpt: Path, cfg: Config) -> Dict[str, torch.Tensor]:
    """The student's full fp32 weights in checkpoint dir `ckpt`, written by a run with config `cfg` (its TP size and
    model); named and laid out as `export` writes them (TP shards concatenated along their split dimension)."""
    from megadistill.model.transformer import Transformer
    from megadistill.parallel.layers import LayerFactory

    ckpt, tp = Path(ckpt), cfg.parallel.tp_size
    full = {n: tuple(p.shape) for n, p in Transformer(cfg.model, LayerFactory(device="meta")).named_parameters()}
    shards = [tp_shard(ckpt, t) for t in range(tp)]
    out: Dict[str, torch.Tensor] = {}
    for name, shape in full.items():
        pieces = [s.get(STUDENT + name) for s in shards]
        if any(p is None for p in pieces):
            raise CheckpointError(f"{ckpt} has no {name!r} for TP rank {pieces.index(None)}: it was not written by a "
                                  f"run of this config (model.*, parallel.tp_size={tp})")
        local = tuple(pieces[0].shape)
        split = [d for d, (a, b) in enumerate(zip(local, shape)) if a != b] if len(local) == len(shape) else None
        if split == []:
            t = pieces[0]  # replicated on every TP rank (norm gains, replicated key/value heads)
        elif split is not None and len(split) == 1 and local[split[0]] * tp == shape[split[0]]:
            t = torch.cat(pieces, dim=split[0])
        else:
            raise CheckpointError(f"{ckpt}: {name} is {local} on TP rank 0, which is no 1/{tp} split of its full "
                                  f"shape {shape}; the checkpoint does not match the run's config")
        out[name] = t.detach().float().contiguous()
    return out
