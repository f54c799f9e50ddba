"""Offline teacher logits: write a top-k cache of one teacher forward over the student split, train students from it.

Layout of a cache dir:
  manifest.json                      teacher id, tokenizer / data hashes, seq_len, k, streams, windows, complete flag
  stream{r:03d}-{i:06d}.safetensors  windows [i W, (i + 1) W) of stream r: ids [W, s, k] int32, logprobs [W, s, k]
                                     fp32 (tau = 1, descending), tail [W, s] fp32 (log of the mass off the k ids);
                                     metadata: blake2b digest of the three tensors' bytes, data hash
A stream is the window sequence one loader serves: synthetic data has one, layout-independent (global window
position, as SyntheticLoader numbers them); text data has one per student DP rank (each packs its own share), so a
text cache is written for one student dp_size. Shards are written atomically (temp name, fsync, rename); a shard
file that exists is complete, so a re-run after a kill continues with the missing shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megadistill import config as config_mod
from megadistill.config import Config
from megadistill.data import build_eval_batches, build_train_loader
from megadistill.data.loader import SHUFFLE_BLOCK
from megadistill.errors import UserError
from megadistill.parallel.cached_loss import check_cached_options, top_k_logprobs
from megadistill.parallel.groups import ParallelGroups
from megadistill.train import checkpoint

log = logging.getLogger(__name__)

PREFIX = "cache:"
MANIFEST = "manifest.json"
VERSION = 1
_KEYS = ("teacher_id", "tokenizer_hash", "data_hash", "seq_len", "k", "vocab_size", "streams", "shard_windows",
         "windows_per_stream")  # what a re-run must agree on


class CacheError(UserError):
    """A teacher cache that is missing, incomplete, corrupt or does not match the run."""


def is_cache(teacher: Optional[str]) -> bool:
    return bool(teacher) and str(teacher).startswith(PREFIX)


def _blake(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def tokenizer_hash(cfg: Config) -> str:
    """Synthetic: the language itself; text: the bytes of the tokenizer's files."""
    d = cfg.data
    if d.source == "synthetic":
        keys = ("synthetic_order", "synthetic_branching", "synthetic_zipf", "synthetic_doc_len", "synthetic_seed")
        return _blake({**{k: getattr(d, k) for k in keys}, "vocab": cfg.model.vocab_size})
    h = hashlib.blake2b(digest_size=8)
    root = Path(d.tokenizer)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def data_hash(cfg: Config) -> str:
    """Everything that decides the student's token stream and the teacher's view of it."""
    data = config_mod.to_dict(cfg)["data"]
    return _blake({"data": data, "seq_len": cfg.train.seq_len, "seed": cfg.train.seed,
                   "vocab": cfg.model.vocab_size})


def _digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def shard_path(root: Path, stream: int, index: int) -> Path:
    return Path(root) / f"stream{stream:03d}-{index:06d}.safetensors"


def _write_shard(path: Path, tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> None:
    from safetensors.torch import save

    blob = save(tensors, metadata={**meta, "digest": _digest(tensors)})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_shard(path: Path, data_h: str) -> Dict[str, torch.Tensor]:
    """The shard's tensors, checked: CacheError naming the file if it is missing, truncated, corrupt or foreign."""
    from safetensors.torch import load

    if not path.is_file():
        raise CacheError(f"teacher cache shard {path} is missing: re-run `megadistill teacher-cache` on the same -o "
                         "to complete the cache")
    raw = path.read_bytes()
    try:
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8: 8 + n]).get("__metadata__", {})
        tensors = load(raw)
    except Exception as e:  # safetensors raises its own error types for torn headers and short buffers
        raise CacheError(f"teacher cache shard {path} is truncated or corrupt ({type(e).__name__}: {e}); delete it "
                         "and re-run `megadistill teacher-cache` on the same -o to rewrite it") from None
    if meta.get("data_hash") != data_h:
        raise CacheError(f"teacher cache shard {path} belongs to another cache (data hash {meta.get('data_hash')} "
                         f"!= {data_h})")
    if meta.get("digest") != _digest(tensors):
        raise CacheError(f"teacher cache shard {path} is corrupt (content digest mismatch); delete it and re-run "
                         "`megadistill teacher-cache` on the same -o to rewrite it")
    return tensors


# ----------------------------------------------------------------------------------------------------- writer

def _stream_loader(cfg: Config, stream: int, n_streams: int, shard_windows: int):
    return build_train_loader(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len,
                              micro_batch_size=shard_windows, dp_rank=stream, dp_size=n_streams, seed=cfg.train.seed)


def write_cache(cfg: Config, teacher_spec: str, out_dir: str, top_k: int = 128, tokens: Optional[int] = None,
                student_dp: int = 1, shard_windows: int = 64, max_shards: int = 0) -> Dict:
    """Run the teacher over cfg's student split in loader order and write the top-k cache to out_dir.

    cfg: the student's config (data, seq_len, seed, vocab; parallel.tp_size and distill.teacher_dtype are the
    writer's layout); every rank of the job calls it. The teacher is loaded by train.teacher.load_teacher, so any
    teacher spec it accepts works. tokens: stream tokens to cover (default: the student's training tokens).
    student_dp: the student's dp_size (text data only: one stream per DP rank). max_shards > 0: stop after writing
    that many new shards on this rank (a time-limited job; re-run to continue). Returns the manifest.
    """
    from megadistill.parallel.init import init_distributed
    from megadistill.train.evaluate import evaluate
    from megadistill.train.metrics import forward_flops
    from megadistill.train.teacher import load_teacher
    from megadistill.train.trainer import total_steps

    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    if info.world_size % cfg.parallel.tp_size:
        raise UserError(f"parallel.tp_size={cfg.parallel.tp_size} does not divide the world size {info.world_size}")
    if shard_windows < 1:
        raise UserError(f"--shard-windows {shard_windows} must be >= 1")
    cfg.distill.teacher, cfg.distill.teacher_zero3 = teacher_spec, False
    groups = ParallelGroups.build(cfg.parallel.tp_size)
    n_streams = 1 if cfg.data.source == "synthetic" else int(student_dp)
    seq_len = cfg.train.seq_len
    want = tokens or total_steps(cfg) * cfg.train.global_batch_size * seq_len
    windows = math.ceil(math.ceil(want / seq_len) / n_streams / shard_windows) * shard_windows  # per stream
    n_shards = windows // shard_windows
    root = Path(out_dir)
    manifest = {"version": VERSION, "teacher_id": teacher_spec, "tokenizer_hash": tokenizer_hash(cfg),
                "data_hash": data_hash(cfg), "seq_len": seq_len, "k": int(top_k), "vocab_size": cfg.model.vocab_size,
                "streams": n_streams, "shard_windows": shard_windows, "windows_per_stream": windows,
                "tokens": windows * n_streams * seq_len, "source": cfg.data.source,
                "teacher_dtype": cfg.distill.teacher_dtype, "complete": False}
    old = _read_manifest(root) if (root / MANIFEST).is_file() else None
    if old is not None:
        diff = [k for k in _KEYS if old.get(k) != manifest[k]]
        if diff:
            what = ", ".join(f"{k}: {old.get(k)!r} vs {manifest[k]!r}" for k in diff)
            raise CacheError(f"{root} holds a teacher cache with other settings ({what}): choose another -o or "
                             "delete it")
        if old.get("complete"):
            return old
    if not 1 <= top_k <= cfg.model.vocab_size:
        raise UserError(f"--top-k {top_k} must lie in [1, model.vocab_size={cfg.model.vocab_size}]")
    teacher = load_teacher(cfg, groups, info.device)
    manifest["teacher"] = {"run": teacher.run, "params": teacher.params, "tokens": teacher.tokens,
                           "own_eval_loss": teacher.eval_loss,
                           "flops_per_token": forward_flops(teacher.model_cfg, seq_len)}
    if info.rank == 0 and old is None:
        root.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    if dist.is_initialized():
        dist.barrier()
    done = {p.name for p in root.glob("stream*.safetensors")}  # listed once: TP peers must take the same decisions
    writer = groups.tp_rank == 0
    micro = cfg.train.micro_batch_size
    written = 0
    for stream in range(n_streams):
        loader = _stream_loader(cfg, stream, n_streams, shard_windows)
        for index in range(n_shards):
            mine = (stream * n_shards + index) % groups.dp_size == groups.dp_rank
            if cfg.data.source == "synthetic":
                if not mine:
                    continue
                loader.step = index  # random access: global windows [index W, (index + 1) W)
            batch = next(loader)  # text: sequential, so every shard is packed (cheap) even when skipped
            path = shard_path(root, stream, index)
            if not mine or path.name in done or (max_shards and written >= max_shards):
                continue
            parts = {"ids": [], "logprobs": [], "tail": []}
            for lo in range(0, shard_windows, micro):
                ids = batch["input_ids"][lo: lo + micro].to(info.device)
                doc = batch["doc_ids"][lo: lo + micro] if cfg.data.document_mask else None  # host: build_mask
                with torch.no_grad():
                    top_ids, lp, tail = top_k_logprobs(teacher.module(ids, doc), top_k, groups.tp_group)
                b = ids.shape[0]
                parts["ids"].append(top_ids.view(b, seq_len, top_k).to(torch.int32).cpu())
                parts["logprobs"].append(lp.view(b, seq_len, top_k).cpu())
                parts["tail"].append(tail.view(b, seq_len).cpu())
            if writer:
                _write_shard(path, {k: torch.cat(v) for k, v in parts.items()},
                             {"data_hash": manifest["data_hash"], "stream": str(stream), "index": str(index)})
            written += 1
        close = getattr(loader, "close", None)
        if close:
            close()
    if dist.is_initialized():
        dist.barrier()
    missing = [(s, i) for s in range(n_streams) for i in range(n_shards) if not shard_path(root, s, i).is_file()]
    if not missing:
        batches = build_eval_batches(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=seq_len,
                                     n_tokens=cfg.train.eval_tokens, batch_size=micro)
        manifest["teacher"]["eval_loss"] = evaluate(teacher.module, batches, groups, cfg, info.device)["eval_loss"]
        manifest["complete"] = True
        if info.rank == 0:
            checkpoint.atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    if dist.is_initialized():
        dist.barrier()
    manifest["missing_shards"] = len(missing)
    return manifest


# ----------------------------------------------------------------------------------------------------- reader

def _read_manifest(root: Path) -> Dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{root} is not a teacher cache (no {MANIFEST}): write one with `megadistill teacher-cache`")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path} is corrupt ({e}); re-run `megadistill teacher-cache`") from None
    if m.get("version") != VERSION:
        raise CacheError(f"{path} has cache version {m.get('version')!r}; this megadistill reads {VERSION}")
    return m


@dataclass
class CachedTeacher:
    """Stands in for train.teacher.Teacher in a run whose teacher is a cache: no module, no engine."""

    cache: "TeacherCache"
    run: str
    params: int
    tokens: int
    eval_loss: Optional[float]  # the teacher's eval loss on this student's eval split (measured by the writer)
    module: None = None
    engine: None = None
    model_cfg: None = None

    def record_block(self) -> Dict:
        """Eval-record fields of the teacher block saying the logits came from a cache (and what it cost once)."""
        m = self.cache.manifest
        return {"cache": str(self.cache.root), "cache_id": m["data_hash"] + ":" + str(m["teacher_id"]),
                "cache_k": m["k"], "cache_tokens": m["tokens"],
                "cache_flops": m["teacher"]["flops_per_token"] * m["tokens"]}


class TeacherCache:
    """Read access to a complete cache: (ids, logprobs, tail) of stream windows, shards verified on first load."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.manifest = _read_manifest(self.root)
        if not self.manifest.get("complete"):
            raise CacheError(f"teacher cache {self.root} is incomplete (the writer was stopped or killed): re-run "
                             "`megadistill teacher-cache` with the same arguments to finish it")
        self._shards: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}

    def check(self, cfg: Config, dp_size: int) -> None:
        """CacheError naming what differs if the cache was not written for cfg's student stream, before any compute."""
        m = self.manifest
        for key, mine in (("seq_len", cfg.train.seq_len), ("vocab_size", cfg.model.vocab_size),
                          ("tokenizer_hash", tokenizer_hash(cfg)), ("data_hash", data_hash(cfg))):
            if m[key] != mine:
                raise CacheError(f"teacher cache {self.root} does not match this run: its {key} is {m[key]!r}, the "
                                 f"run's is {mine!r} (data.*, train.seq_len, train.seed, model.vocab_size and the "
                                 "tokenizer must be those the cache was written with)")
        if m["streams"] > 1 and m["streams"] != dp_size:
            raise CacheError(f"teacher cache {self.root} was written for a text stream per DP rank of dp_size "
                             f"{m['streams']}; this run has dp_size {dp_size}: re-write it with --student-dp {dp_size}")
        from megadistill.train.trainer import total_steps
        need = total_steps(cfg) * cfg.train.global_batch_size // (dp_size if m["streams"] > 1 else 1)
        if need > m["windows_per_stream"]:
            raise CacheError(f"teacher cache {self.root} covers {m['tokens']} tokens; this run needs "
                             f"{need * m['streams'] * cfg.train.seq_len}: re-write it with --tokens of at least that")

    def read(self, stream: int, positions: np.ndarray) -> Dict[str, torch.Tensor]:
        w = self.manifest["shard_windows"]
        rows = {"ids": [], "logprobs": [], "tail": []}
        for p in np.asarray(positions).tolist():
            key = (stream, p // w)
            if key not in self._shards:
                self._shards[key] = read_shard(shard_path(self.root, *key), self.manifest["data_hash"])
                if len(self._shards) > 2:
                    self._shards.pop(next(iter(self._shards)))
            for name in rows:
                rows[name].append(self._shards[key][name][p % w])
        return {f"teacher_{k}": torch.stack(v) for k, v in rows.items()}


class CachedTeacherLoader:
    """Wraps a training loader: each batch also carries the cached teacher entries of exactly its windows.

    State is the inner loader's (so resume stays exact); the cache is indexed by what the inner loader will serve.
    """

    def __init__(self, inner, cache: TeacherCache):
        self.inner, self.cache = inner, cache

    def _next_positions(self) -> Tuple[int, np.ndarray]:
        inner = self.inner
        if getattr(inner, "kind", None) == "synthetic":
            return 0, inner._positions(inner.step)
        start = inner.block * SHUFFLE_BLOCK + inner.index  # windows of this rank's stream served so far
        return inner.dp_rank, start + np.arange(inner.micro_batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        stream, pos = self._next_positions()
        batch = next(self.inner)
        batch.update(self.cache.read(stream, pos))
        return batch

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.inner.load_state_dict(d)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def open_cache(cfg: Config, groups: ParallelGroups) -> CachedTeacher:
    """The cached teacher of cfg (distill.teacher=cache:DIR), checked against the run before any compute."""
    d = cfg.distill
    check_cached_options(d.temperature, d.top_p, d.reverse)
    if d.fused:
        raise UserError("distill.fused=true with a cached teacher is not supported: the cached loss reads the "
                        "student logits; set distill.fused=false")
    cache = TeacherCache(d.teacher[len(PREFIX):])
    cache.check(cfg, groups.dp_size)
    if d.top_k is not None and d.top_k > cache.manifest["k"]:
        raise UserError(f"distill.top_k={d.top_k} exceeds the cache's k={cache.manifest['k']}")
    t = cache.manifest["teacher"]
    return CachedTeacher(cache=cache, run=t["run"], params=t["params"], tokens=t["tokens"],
                         eval_loss=t.get("eval_loss"))


def cached_outputs(batch: dict, device, to=None) -> Dict[str, torch.Tensor]:
    """Objective.forward kwargs of a cached-teacher batch; to(tensor) moves one to the device (default .to(device))."""
    to = to or (lambda t: t.to(device))
    return {k: to(batch[k]) for k in ("teacher_ids", "teacher_logprobs", "teacher_tail")}


def cache_summary(root: str) -> List[str]:
    m = _read_manifest(Path(root))
    per_token = m["k"] * 8 + 4
    return [f"teacher cache {root}: {m['tokens']} tokens, k={m['k']}, {m['streams']} stream(s), "
            f"{per_token} bytes/token, complete={m['complete']}"]
