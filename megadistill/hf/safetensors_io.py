"""Streaming reads of (sharded) safetensors checkpoints: one tensor slice at a time, with plain reads, no mmap
(PyTorch .bin checkpoints, which have no such header: memory-mapped through torch.load, weights only).

A rank that loads its TP shard of a large model must not hold the whole model, nor map whole files: pages of a mapped
file that a strided (column) slice touches count in the process's resident set. Here a slice along dim 0 is one
contiguous read straight into the destination; a slice along dim 1 is read in bounded blocks of rows.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megadistill.errors import UserError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"  # the PyTorch format many older checkpoints (Pythia's revisions) ship in
BIN_SINGLE = "pytorch_model.bin"
BLOCK_BYTES = 64 << 20  # rows read at once for a dim-1 slice


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int  # absolute byte offset of the tensor's data in the file
    nbytes: int
    # rows stored apart (a part of a per-head interleaved matrix, SafetensorsFolder.split_interleaved): (absolute byte
    # offset, rows) of each run of consecutive rows, in order; empty: all rows contiguous from `start`
    runs: Tuple[Tuple[int, int], ...] = ()

    def row_bytes(self) -> int:
        return int(torch.Size(self.shape[1:]).numel()) * torch.empty((), dtype=self.dtype).element_size()

    def row_runs(self, start: int, stop: int):
        """(absolute byte offset, rows) of the stored runs holding rows [start, stop), in order."""
        row = self.row_bytes()
        if not self.runs:
            yield self.start + start * row, stop - start
            return
        first = 0  # the first row of the current run
        for offset, n in self.runs:
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                yield offset + (lo - first) * row, hi - lo
            first += n


def _read_header(path: Path) -> Dict[str, Entry]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise UserError(f"{path} is truncated (no safetensors header): re-download or re-export it")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise UserError(f"{path}: header length {n} exceeds the file ({size} bytes): the file is truncated")
            meta = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a safetensors file (bad header: {e})") from None
    base = 8 + n
    out = {}
    for name, e in meta.items():
        if name == "__metadata__":
            continue
        if e["dtype"] not in DTYPES:
            raise UserError(f"{path}: tensor {name!r} has dtype {e['dtype']}, which is not supported")
        a, b = e["data_offsets"]
        if base + b > size:
            raise UserError(f"{path}: tensor {name!r} ends at byte {base + b}, past the end of the file ({size} "
                            "bytes): the file is truncated; re-download or re-export it")
        out[name] = Entry(path, DTYPES[e["dtype"]], tuple(e["shape"]), base + a, b - a)
    return out


class SafetensorsFolder:
    """The tensors of a checkpoint folder: model.safetensors, or the shards a model.safetensors.index.json names;
    without safetensors, pytorch_model.bin or the shards of pytorch_model.bin.index.json (torch.load with
    weights_only=True, so a pickle carrying code is refused, and mmap=True: a slice reads only its pages)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.tensors: Dict[str, torch.Tensor] = {}  # pytorch_model.bin tensors (mmap-backed), by entry name
        self.stacks: Dict[str, List[str]] = {}  # virtual stacked tensors (`stack`): their parts, in order
        self._stacked: Dict[str, Entry] = {}  # those parts' entries, readable only through their stack
        if (self.folder / INDEX).is_file() or (self.folder / SINGLE).is_file() or \
                not ((self.folder / BIN_INDEX).is_file() or (self.folder / BIN_SINGLE).is_file()):
            files, weight_map, index = self._safetensors_files()
            self.entries: Dict[str, Entry] = {}
            for name in files:
                for key, e in _read_header(self.folder / name).items():
                    self.entries[key] = e
        else:
            files, weight_map, index = self._files(BIN_INDEX, BIN_SINGLE)
            self.entries = {}
            for name in files:
                for key, t in _torch_load(self.folder / name).items():
                    self.tensors[key] = t
                    self.entries[key] = Entry(self.folder / name, t.dtype, tuple(t.shape), 0,
                                              t.numel() * t.element_size())
        if weight_map is not None:
            absent = sorted(k for k, f in weight_map.items() if k not in self.entries)
            if absent:
                raise UserError(f"{self.folder}: {index} lists tensors its shards do not hold ({absent[:3]}): "
                                "the checkpoint is incomplete or mixed")

    def _files(self, index_name: str, single: str):
        """(weight files, the index's weight map or None, the index's name) of one format."""
        index = self.folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise UserError(f"{self.folder}: {len(missing)} of the {len(files)} weight shards that {index_name} "
                                f"lists are missing ({missing[:3]}): copy the complete checkpoint")
            return files, weight_map, index_name
        return [single], None, index_name

    def _safetensors_files(self):
        if (self.folder / INDEX).is_file() or (self.folder / SINGLE).is_file():
            return self._files(INDEX, SINGLE)
        files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if len(files) != 1:
            raise UserError(f"{self.folder} has no {SINGLE} and no {INDEX} (found {files or 'no safetensors'}), nor "
                            f"{BIN_SINGLE} / {BIN_INDEX}: copy the checkpoint's weight files")
        return files, None, INDEX

    def files(self) -> List[Path]:
        return sorted({e.file for e in (*self.entries.values(), *self._stacked.values())})

    def split_rows(self, name: str, parts: Dict[str, int]) -> None:
        """Replace tensor `name` by consecutive blocks of its rows, named and sized by `parts` (in order): views into
        the same bytes (rows of a row-major tensor are contiguous), read like any other tensor. For checkpoints that
        store several projections as one matrix (Phi-3's qkv_proj, gate_up_proj)."""
        e = self.entries[name]
        if sum(parts.values()) != e.shape[0] or len(e.shape) != 2:
            what = ", ".join(f"{k.split('.')[-2]} {v}" for k, v in parts.items())  # e.g. "q_proj 3072, ..."
            raise UserError(f"{self.folder}: {name} has shape {e.shape}, but config.json implies "
                            f"{sum(parts.values())} rows ({what}): the config contradicts the weights")
        row = e.row_bytes()
        offset = 0
        del self.entries[name]
        t = self.tensors.pop(name, None)
        for part, rows in parts.items():
            self.entries[part] = Entry(e.file, e.dtype, (rows, e.shape[1]), e.start + offset * row, rows * row)
            if t is not None:
                self.tensors[part] = t.narrow(0, offset, rows)
            offset += rows

    def split_interleaved(self, name: str, parts: Dict[str, int], groups: int) -> None:
        """Replace tensor `name`, stored as `groups` consecutive groups of rows each holding `parts` (in order;
        GPT-NeoX's query_key_value: per head, its q, k and v rows), by one tensor per part gathering that part's rows
        of every group: views into the same bytes (runs of rows), read like any other tensor."""
        e = self.entries[name]
        per = sum(parts.values())
        if e.runs or e.shape[0] != groups * per:
            what = ", ".join(f"{k.split('.')[-2]} {v}" for k, v in parts.items())
            raise UserError(f"{self.folder}: {name} has shape {e.shape}, but config.json implies {groups} heads x "
                            f"{per} rows ({what}): the config contradicts the weights")
        row = e.row_bytes()
        del self.entries[name]
        t = self.tensors.pop(name, None)
        offset = 0
        for part, rows in parts.items():
            runs = tuple((e.start + (g * per + offset) * row, rows) for g in range(groups))
            self.entries[part] = Entry(e.file, e.dtype, (groups * rows, *e.shape[1:]), runs[0][0],
                                       groups * rows * row, runs)
            if t is not None:  # [groups, rows, ...]: flattened when read (a copy of this part only)
                self.tensors[part] = t.view(groups, per, *e.shape[1:]).narrow(1, offset, rows)
            offset += rows

    def stack(self, name: str, parts: List[str]) -> None:
        """Tensor `name` becomes the stack of `parts` (same shape and dtype, in order) along a new dim 0, and the parts
        are read only through it: a mixture's per-expert matrices as one [E, ...] weight. Reading a slice along
        dim 0 reads those parts; along dim >= 1, each part's slice along dim - 1."""
        missing = [p for p in parts if p not in self.entries]
        if missing:
            raise UserError(f"{self.folder}: {name} stacks {len(parts)} tensors but {len(missing)} are missing "
                            f"({missing[:3]}): does config.json's expert count match the weights?")
        first = self.entries[parts[0]]
        odd = [p for p in parts if (self.entries[p].shape, self.entries[p].dtype) != (first.shape, first.dtype)]
        if odd:
            raise UserError(f"{self.folder}: {odd[0]} has shape {self.entries[odd[0]].shape} "
                            f"({self.entries[odd[0]].dtype}) unlike {parts[0]}'s {first.shape} ({first.dtype}): "
                            "the experts of one layer must agree")
        for p in parts:
            self._stacked[p] = self.entries.pop(p)
        self.stacks[name] = list(parts)
        self.entries[name] = Entry(first.file, first.dtype, (len(parts), *first.shape), first.start,
                                   first.nbytes * len(parts))

    def rename(self, old: str, new: str) -> None:
        """Tensor `old` answers to `new` instead."""
        self.entries[new] = self.entries.pop(old)
        if old in self.tensors:
            self.tensors[new] = self.tensors.pop(old)

    def rename_prefix(self, old: str, new: str) -> int:
        """Tensors named old... answer to new... instead (a text model inside a multimodal checkpoint); returns how
        many were renamed."""
        names = [k for k in self.entries if k.startswith(old)]
        for k in names:
            self.rename(k, new + k[len(old):])
        return len(names)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str, dim: int = 0, start: int = 0, stop: Optional[int] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tensor[name].narrow(dim, start, stop - start) in its stored dtype (or cast into `out`), dim 0 or 1 (any
        dim of a stacked tensor whose parts' dim - 1 is 0 or 1)."""
        if name in self.stacks:
            return self._read_stacked(name, dim, start, stop, out)
        e = self.entries[name] if name in self.entries else self._stacked[name]
        shape = list(e.shape)
        stop = shape[dim] if stop is None else stop
        if dim not in (0, 1) or dim >= len(shape) or not 0 <= start <= stop <= shape[dim]:
            raise ValueError(f"{name}: cannot slice dim {dim} [{start}, {stop}) of shape {tuple(shape)}")
        sliced = shape.copy()
        sliced[dim] = stop - start
        if name in self.tensors:  # pytorch_model.bin: slice the mmap-backed tensor (reads only those pages)
            t = self.tensors[name]
            src = (t.flatten(0, 1) if t.dim() > len(shape) else t).narrow(dim, start, stop - start)
            if out is None:
                return src.clone(memory_format=torch.contiguous_format)
            if tuple(out.shape) != tuple(src.shape):
                raise ValueError(f"{name}: slice shape {tuple(src.shape)} != destination {tuple(out.shape)}")
            return out.copy_(src)
        direct = out is not None and out.dtype == e.dtype and out.is_contiguous() and out.device.type == "cpu"
        dst = out if direct else torch.empty(sliced, dtype=e.dtype)
        if tuple(dst.shape) != tuple(sliced):
            raise ValueError(f"{name}: slice shape {tuple(sliced)} != destination {tuple(dst.shape)}")
        row = e.row_bytes()  # bytes of one index along dim 0
        with open(e.file, "rb") as f:
            if dim == 0:  # one contiguous range per stored run (one run unless the rows are interleaved)
                r = 0
                for offset, n in e.row_runs(start, stop):
                    f.seek(offset)
                    _readinto(f, dst[r:r + n], n * row, e.file)
                    r += n
            else:
                rows = max(1, BLOCK_BYTES // max(row, 1))
                r = 0
                for offset, n in e.row_runs(0, shape[0]):
                    for b0 in range(0, n, rows):
                        b1 = min(n, b0 + rows)
                        block = torch.empty([b1 - b0] + shape[1:], dtype=e.dtype)
                        f.seek(offset + b0 * row)
                        _readinto(f, block, (b1 - b0) * row, e.file)
                        dst[r + b0:r + b1].copy_(block[:, start:stop])
                    r += n
        if out is not None and not direct:
            out.copy_(dst)
            return out
        return dst

    def _read_stacked(self, name: str, dim: int, start: int, stop: Optional[int],
                      out: Optional[torch.Tensor]) -> torch.Tensor:
        e, parts = self.entries[name], self.stacks[name]
        stop = e.shape[dim] if stop is None else stop
        if not 0 <= dim < len(e.shape) or not 0 <= start <= stop <= e.shape[dim]:
            raise ValueError(f"{name}: cannot slice dim {dim} [{start}, {stop}) of shape {e.shape}")
        sliced = list(e.shape)
        sliced[dim] = stop - start
        dst = torch.empty(sliced, dtype=e.dtype) if out is None else out
        if tuple(dst.shape) != tuple(sliced):
            raise ValueError(f"{name}: slice shape {tuple(sliced)} != destination {tuple(dst.shape)}")
        if dim == 0:
            for i, part in enumerate(parts[start:stop]):
                self.read(part, out=dst[i])
        else:
            for i, part in enumerate(parts):
                self.read(part, dim - 1, start, stop, out=dst[i])
        return dst


def _torch_load(path: Path) -> Dict[str, torch.Tensor]:
    """A pytorch_model.bin's tensors, memory-mapped; weights_only: a pickle that would run code is refused."""
    import pickle
    import zipfile

    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a zip-format PyTorch checkpoint (torch < 1.6's legacy format, or truncated): "
                        "re-save it with torch.save, or convert it to safetensors")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise UserError(f"{path} cannot be read as plain tensors ({str(e).splitlines()[0]}): a pickle carrying code "
                        "is refused, a truncated file cannot be read; convert it to safetensors from a trusted "
                        "copy") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UserError(f"{path} holds {type(state).__name__}, not a state dict of tensors")
    return state


def _readinto(f, t: torch.Tensor, nbytes: int, path: Path) -> None:
    view = memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")
    got = f.readinto(view) if nbytes else 0
    if got != nbytes:
        raise UserError(f"{path}: short read ({got} of {nbytes} bytes): the file is truncated")
