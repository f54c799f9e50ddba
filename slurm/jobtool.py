"""Helpers for the SLURM scripts: a run's resolved run dir, one manifest task, and a sweep's submission plan."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megadistill.errors import UserError

DONE = "DONE"  # megadistill.train.trainer.DONE: marker of a finished run dir (not imported: that pulls in torch)
MANIFEST = "manifest.jsonl"  # megadistill.laws.sweep.MANIFEST
_FIELDS = ("run", "config", "mode", "teacher", "depends_on")


def split_items(items: Sequence[str]) -> Tuple[List[str], List[str]]:
    """`a.yaml b.yaml key=value ...` -> (yaml paths, dotlist overrides), as `megadistill train` splits them."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def resolve_config(items: Sequence[str], world_size: Optional[int] = None):
    """The validated Config a `megadistill train ITEMS...` would run (world_size adds the layout checks)."""
    from megadistill import config
    paths, overrides = split_items(items)
    return config.load(paths, overrides, world_size=world_size)


def is_done(run_dir: str) -> bool:
    return (Path(run_dir) / DONE).is_file()


def read_manifest(path: str) -> Tuple[Path, List[Dict]]:
    """(manifest file, its lines); each line is checked for the fields the scripts use."""
    p = Path(path)
    p = p / MANIFEST if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"{p}: no such manifest; write one with `megadistill sweep SWEEP.yaml -o DIR`")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{n}: not a JSON line ({e.msg})") from None
        missing = [k for k in _FIELDS if k not in row]
        if missing:
            raise UserError(f"{p}:{n}: manifest line lacks {missing} (expected {list(_FIELDS)})")
        rows.append(row)
    if not rows:
        raise UserError(f"{p}: the manifest is empty")
    return p, rows


def _config_path(row: Dict, manifest: Path) -> str:
    """The run's config: as written (relative to the submit dir) or, failing that, beside the manifest."""
    cand = Path(row["config"])
    if not cand.is_file() and not cand.is_absolute():
        cand = manifest.parent / cand.name
    if not cand.is_file():
        raise UserError(f"{manifest}: run {row['run']!r}: config {row['config']!r} not found (also looked in "
                        f"{manifest.parent})")
    return os.path.abspath(cand)


def tasks(path: str, world_size_of: Optional[Callable[[str], int]] = None, overrides: Sequence[str] = ()) -> List[Dict]:
    """Manifest rows with absolute config paths, model sizes, run dirs and DONE flags; with world_size_of(size),
    each run's layout is also validated for that many processes."""
    manifest, rows = read_manifest(path)
    out: List[Dict] = []
    seen = set()
    for i, row in enumerate(rows):
        cfg_path = _config_path(row, manifest)
        ws = None
        try:
            cfg = resolve_config([cfg_path, *overrides])
            size = row.get("size") or cfg.model.size or ""
            if world_size_of is not None:
                ws = world_size_of(size)
                cfg.validate(ws)
        except UserError as e:
            where = f" on {ws} GPUs" if ws else ""
            raise UserError(f"run {row['run']!r} ({cfg_path}){where}: {e}") from None
        deps = list(row.get("depends_on") or [])
        unknown = [d for d in deps if d not in seen]
        if unknown:
            raise UserError(f"{manifest}: run {row['run']!r} depends on {unknown}, which are not earlier lines of "
                            "the manifest (teachers must come before their students)")
        seen.add(row["run"])
        run_dir = os.path.abspath(cfg.train.run_dir)
        out.append({"index": i, "run": row["run"], "config": cfg_path, "mode": row["mode"], "size": size,
                    "run_dir": run_dir, "depends_on": deps, "done": is_done(run_dir)})
    return out


def task(path: str, index: int) -> Tuple[str, str, str, str]:
    """(run, config, run_dir, teacher run_dir or '-') of manifest line `index` (an array task's SLURM_ARRAY_TASK_ID)."""
    manifest, rows = read_manifest(path)
    if not 0 <= index < len(rows):
        raise UserError(f"{manifest}: line index {index} out of range 0..{len(rows) - 1}")
    row = rows[index]
    cfg_path = _config_path(row, manifest)
    run_dir = os.path.abspath(resolve_config([cfg_path]).train.run_dir)
    teacher_dir = "-"
    if row.get("teacher"):
        match = [r for r in rows if r["run"] == row["teacher"]]
        if not match:
            raise UserError(f"{manifest}: run {row['run']!r} names teacher {row['teacher']!r}, which is not in it")
        teacher_dir = os.path.abspath(resolve_config([_config_path(match[0], manifest)]).train.run_dir)
    return row["run"], cfg_path, run_dir, teacher_dir


def parse_nodes_map(text: str) -> Dict[str, int]:
    """'12.6B=8,7.75B=4' -> {'12.6B': 8, '7.75B': 4}."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        size, _, n = part.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"NODES_MAP entry {part!r} is not SIZE=NODES (e.g. 12.6B=8)")
        out[size.strip()] = int(n)
    return out


def plan(path: str, nodes: int, nodes_map: Dict[str, int], gpus_per_node: int,
         overrides: Sequence[str] = ()) -> List[Tuple]:
    """Submission groups in dependency order: ('skip', run) for finished runs, then
    ('array', nodes, deps, indices, runs): one job array per (node count, unfinished dependencies)."""
    ts = tasks(path, world_size_of=lambda size: nodes_map.get(size, nodes) * gpus_per_node, overrides=overrides)
    n_of = {t["run"]: nodes_map.get(t["size"], nodes) for t in ts}
    done = {t["run"] for t in ts if t["done"]}
    lines: List[Tuple] = [("skip", t["run"]) for t in ts if t["done"]]
    groups: Dict[Tuple, List[Dict]] = {}
    for t in ts:
        if t["done"]:
            continue
        key = (n_of[t["run"]], tuple(d for d in t["depends_on"] if d not in done))
        groups.setdefault(key, []).append(t)
    # a group's dependencies are runs of earlier groups: order groups by their first manifest line
    for (n, deps), members in sorted(groups.items(), key=lambda kv: kv[1][0]["index"]):
        lines.append(("array", n, ",".join(deps) or "-", ",".join(str(t["index"]) for t in members),
                      ",".join(t["run"] for t in members)))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="slurm/jobtool.py", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run-dir", help="print the resolved train.run_dir of CONFIG.yaml [key=value ...]")
    p.add_argument("--world-size", type=int, default=None, help="also check the layout for this many processes")
    p.add_argument("items", nargs="+")
    p = sub.add_parser("task", help="print 'run<TAB>config<TAB>run_dir<TAB>teacher_run_dir' of manifest line INDEX")
    p.add_argument("manifest")
    p.add_argument("index", type=int)
    p = sub.add_parser("plan", help="print the submission plan of a manifest, one TAB-separated line per group")
    p.add_argument("manifest")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nodes-map", default="")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides given to every run")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run-dir":
            try:
                cfg = resolve_config(args.items, world_size=args.world_size)
            except UserError as e:
                where = f" (on {args.world_size} processes: nodes x GPUs per node)" if args.world_size else ""
                raise UserError(f"{e}{where}") from None
            print(os.path.abspath(cfg.train.run_dir))
        elif args.cmd == "task":
            print("\t".join(task(args.manifest, args.index)))
        else:
            for line in plan(args.manifest, args.nodes, parse_nodes_map(args.nodes_map), args.gpus_per_node,
                             args.overrides):
                print("\t".join(str(x) for x in line))
    except UserError as e:
        print(f"jobtool {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
