"""Sweep design: expand a sweep YAML (IsoFLOP profiles, tokens-per-parameter ratios, teacher x student grids) into
one resolved trainer config per run plus manifest.jsonl, teachers before the students that need them."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from megadistill.errors import UserError
from megadistill.laws.flops import forward_flops_per_token

MANIFEST = "manifest.jsonl"
_TOP_KEYS = {"name", "run_root", "base", "base_files", "overrides", "supervised", "teachers", "students"}


@dataclass
class Run:
    """One planned training run."""
    name: str
    mode: str  # supervised | distill
    size: str  # model size name (megadistill.model.sizes)
    tokens: int
    split: str  # teacher | student
    teacher: Optional["Run"] = None
    params: int = 0
    params_total: int = 0
    flops: float = 0.0
    config_path: str = ""
    extra: Dict = field(default_factory=dict)


def _label(x: float) -> str:
    """Compact, filesystem-safe number label: 20 -> '20', 1e+18 -> '1e18', 2.5 -> '2.5'."""
    if float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    mant, exp = f"{x:.3g}".split("e") if "e" in f"{x:.3g}" else (f"{x:.3g}", "")
    return mant + ("e" + str(int(exp)) if exp else "")


def _as_list(v, key: str) -> list:
    if v is None:
        return []
    out = v if isinstance(v, list) else [v]
    if not out:
        raise UserError(f"sweep key {key!r} is an empty list")
    return out


def _numbers(v, key: str) -> List[float]:
    out = []
    for x in _as_list(v, key):
        try:
            x = float(x)
        except (TypeError, ValueError):
            raise UserError(f"sweep key {key!r}: {x!r} is not a number") from None
        if not (math.isfinite(x) and x > 0):
            raise UserError(f"sweep key {key!r}: {x} must be a positive number")
        out.append(x)
    return out


def _sizes(block: dict, key: str) -> List[str]:
    sizes = [str(s) for s in _as_list(block.get("sizes"), f"{key}.sizes")]
    if not sizes:
        raise UserError(f"sweep block {key!r} needs `sizes: [names]` (model size names, e.g. tiny-2M or 546M)")
    return sizes


def load_sweep(path) -> dict:
    """Read and shape-check a sweep YAML; UserError names the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such sweep file")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: a sweep is a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = set(spec) - _TOP_KEYS
    if unknown:
        raise UserError(f"{path}: unknown sweep key(s) {sorted(unknown)}; valid keys: {sorted(_TOP_KEYS)}")
    if not (spec.get("supervised") or spec.get("teachers")):
        raise UserError(f"{path}: the sweep plans no runs; give `supervised:` blocks and/or `teachers:` + `students:`")
    if spec.get("students") and not spec.get("teachers"):
        raise UserError(f"{path}: `students:` needs `teachers:` to distil from")
    spec.setdefault("name", path.stem)
    spec.setdefault("run_root", f"runs/{spec['name']}")
    return spec


class _Sizer:
    """Per-size facts of a sweep's runs: (N, N_total) through megadistill.model.sizes, and the FLOPs-accounting
    arguments of the resolved config (context = train.seq_len, vocabulary, aspect ratio d_model / n_layers), so
    that tiny CPU models are costed by their own shapes; for the paper's sizes these equal the PAPER.md defaults."""

    def __init__(self, spec: dict):
        self.files = [str(f) for f in _as_list(spec.get("base_files"), "base_files")]
        self.common = _common_overrides(spec)
        self.cache: Dict[str, tuple] = {}
        self.configs: Dict[str, object] = {}

    def __call__(self, size: str) -> tuple:
        if size not in self.cache:
            from megadistill.config import load
            try:
                from megadistill.model.sizes import params_of
            except ImportError as e:
                raise UserError(f"model sizes are unavailable ({e}); megadistill.model.sizes counts "
                                f"parameters") from None
            probe = self.common + [f"model.size={json.dumps(size)}", "train.mode=supervised", "train.tokens=1",
                                   "train.steps=0"]
            try:
                cfg = load(self.files, probe)
            except UserError as e:
                raise UserError(f"sweep size {size!r}: {e}") from None
            n, n_total = (int(v) for v in params_of(cfg.model))
            kw = {"n_ctx": cfg.train.seq_len, "n_vocab": cfg.model.vocab_size,
                  "rho": cfg.model.d_model / cfg.model.n_layers}
            self.cache[size] = (n, n_total, kw)
            self.configs[size] = cfg
        return self.cache[size]

    def config(self, size: str):
        """A fresh copy of the resolved base config of a size (per-run fields still to be set)."""
        self(size)
        return copy.deepcopy(self.configs[size])


def _common_overrides(spec: dict) -> List[str]:
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise UserError("sweep key 'base' must be a mapping of trainer config keys")
    return _dotlist(base) + [str(o) for o in _as_list(spec.get("overrides"), "overrides")]


def _defaults(spec: dict) -> dict:
    spec = dict(spec)
    spec.setdefault("name", "sweep")
    spec.setdefault("run_root", f"runs/{spec['name']}")
    return spec


def expand(spec: dict) -> List[Run]:
    """The runs of a sweep, teachers first; identical runs (same mode, size, tokens, split, teacher) merged."""
    spec = _defaults(spec)
    name, sizer = spec["name"], _Sizer(spec)
    runs: Dict[tuple, Run] = {}

    def add(run: Run) -> Run:
        key = (run.mode, run.size, run.tokens, run.split, run.teacher.name if run.teacher else None)
        return runs.setdefault(key, run)

    def token_plans(block: dict, key: str, size: str):
        n, _, kw = sizer(size)
        for m in _numbers(block.get("tokens_per_param"), f"{key}.tokens_per_param"):
            yield f"M{_label(m)}", int(round(m * n))
        for c in _numbers(block.get("compute"), f"{key}.compute"):
            d = int(round(c / (3.0 * forward_flops_per_token(n, **kw))))  # IsoFLOP: 3 F(N) D = C
            if d < 1:
                raise UserError(f"{key}.compute={c:g} buys less than one token for size {size}")
            yield f"C{_label(c)}", d

    teachers: List[Run] = []
    t_block = spec.get("teachers") or {}
    if t_block:
        if not isinstance(t_block, dict):
            raise UserError("sweep key 'teachers' must be a mapping {sizes, tokens_per_param | compute}")
        if "tokens_per_param" not in t_block and "compute" not in t_block:
            t_block = dict(t_block, tokens_per_param=20)  # Chinchilla-optimal teachers (PAPER.md, M = 20)
        for size in _sizes(t_block, "teachers"):
            for lab, d in token_plans(t_block, "teachers", size):
                teachers.append(add(Run(f"{name}-teacher-{size}-{lab}", "supervised", size, d, "teacher")))
    for i, block in enumerate(_as_list(spec.get("supervised"), "supervised")):
        key = f"supervised[{i}]"
        if not isinstance(block, dict) or not ("tokens_per_param" in block or "compute" in block):
            raise UserError(f"sweep block {key} needs sizes and tokens_per_param (ratios) and/or compute (IsoFLOP)")
        split = block.get("split", "student")
        if split not in ("teacher", "student"):
            raise UserError(f"sweep key {key}.split={split!r} must be teacher or student")
        for size in _sizes(block, key):
            for lab, d in token_plans(block, key, size):
                add(Run(f"{name}-sup-{size}-{lab}" + ("-tsplit" if split == "teacher" else ""),
                        "supervised", size, d, split))
    s_block = spec.get("students") or {}
    if s_block:
        if not isinstance(s_block, dict) or not ("tokens_per_param" in s_block or "compute" in s_block):
            raise UserError("sweep key 'students' needs sizes and tokens_per_param and/or compute")
        pick = [str(s) for s in _as_list(s_block.get("teachers"), "students.teachers")]
        unknown = [s for s in pick if s not in {t.size for t in teachers}]
        if unknown:
            raise UserError(f"students.teachers {unknown} are not among the teachers' sizes")
        for size in _sizes(s_block, "students"):
            for lab, d in token_plans(s_block, "students", size):
                for t in teachers:
                    if pick and t.size not in pick:
                        continue
                    add(Run(f"{name}-kd-{size}-{lab}-from-{t.name[len(name) + 1:]}", "distill", size, d,
                            "student", teacher=t))
    ordered = sorted(runs.values(), key=lambda r: (r.mode == "distill", r not in teachers))
    for r in ordered:
        r.params, r.params_total, kw = sizer(r.size)
        r.flops = 3.0 * forward_flops_per_token(r.params, **kw) * r.tokens
        if r.teacher:  # a student's run also pays the teacher forward on each of its tokens (delta_Lgt = 1)
            t_params, _, t_kw = sizer(r.teacher.size)
            r.flops += forward_flops_per_token(t_params, **t_kw) * r.tokens
    return ordered


def _dotlist(d: dict, prefix: str = "") -> List[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_dotlist(v, key + "."))
        else:
            out.append(f"{key}={json.dumps(v)}")
    return out


def write_sweep(spec: dict, out_dir, runs: Optional[Sequence[Run]] = None) -> List[dict]:
    """Write <out_dir>/<run>.yaml (resolved, validated trainer configs) and <out_dir>/manifest.jsonl."""
    from megadistill.config import to_yaml

    spec = _defaults(spec)
    runs = expand(spec) if runs is None else list(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizer = _Sizer(spec)
    root = Path(spec["run_root"])
    lines = []
    for r in runs:
        cfg = sizer.config(r.size)  # base files + base + overrides, resolved for the size
        t = cfg.train
        t.mode, t.run_dir, t.run_name, t.tokens, t.steps, t.tokens_per_param = (
            r.mode, str(root / r.name), r.name, int(r.tokens), 0, 0.0)
        cfg.data.split = r.split
        cfg.distill.teacher = str(root / r.teacher.name) if r.teacher else None
        try:
            cfg.validate()
        except UserError as e:
            raise UserError(f"sweep run {r.name}: {e}") from None
        r.config_path = str(out_dir / f"{r.name}.yaml")
        Path(r.config_path).write_text(to_yaml(cfg))
        lines.append({"run": r.name, "config": r.config_path, "mode": r.mode,
                      "teacher": r.teacher.name if r.teacher else None,
                      "depends_on": [r.teacher.name] if r.teacher else [], "size": r.size, "split": r.split,
                      "params": r.params, "tokens": r.tokens, "flops": r.flops})
    with open(out_dir / MANIFEST, "w") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    return lines


def read_manifest(path) -> List[dict]:
    """Lines of a manifest.jsonl (a sweep dir or the file itself)."""
    path = Path(path)
    path = path / MANIFEST if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path}: no such manifest")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
