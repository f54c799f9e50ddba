"""Eval-record schema v1 (DESIGN.md): build, validate, append and read records; aggregate them into loss tables."""
from __future__ import annotations

import csv
import datetime as _dt
import glob
import json
import logging
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megadistill.errors import UserError
from megadistill.fileio import append_line
from megadistill.laws.flops import training_flops

log = logging.getLogger(__name__)

VERSION = 1
MODES = ("supervised", "distill")
EVAL_FILE = "eval.jsonl"
# Fields a record must carry for aggregation; the rest of the schema is checked only in strict mode.
NEEDED = ("run", "mode", "step", "tokens", "params", "eval_loss")
TABLE_COLUMNS = ("run", "mode", "step", "params", "tokens", "flops", "eval_loss",
                 "teacher_run", "teacher_params", "teacher_tokens", "teacher_loss")
_MAX_LINE_WARNINGS = 10  # per file; the rest are only counted


def make_record(run: str, mode: str, step: int, tokens: int, params: int, params_total: int, flops: float,
                eval_loss: float, eval_tokens: int, split: str = "student_val", teacher: Optional[dict] = None,
                config: Optional[dict] = None, time: Optional[str] = None) -> dict:
    """One eval record of schema v1; `teacher` is {"run", "params", "tokens", "eval_loss"} for distill runs.

    Raises UserError naming the field when a value does not fit the schema.
    """
    rec = {"version": VERSION, "run": run, "mode": mode, "step": int(step), "tokens": int(tokens),
           "params": int(params), "params_total": int(params_total), "flops": float(flops),
           "eval_loss": float(eval_loss), "eval_tokens": int(eval_tokens), "split": split,
           "teacher": None if teacher is None else dict(teacher), "config": dict(config or {}),
           "time": time or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    problems = validate_record(rec)
    if problems:
        raise UserError(f"eval record for run {run!r}: " + "; ".join(problems))
    return rec


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_record(rec, strict: bool = True) -> List[str]:
    """Problems of a record, each naming its field ([] when valid). NaN / inf losses are valid here: readers drop them.

    strict=False checks only what aggregation needs (NEEDED, plus the teacher block of distill records).
    """
    if not isinstance(rec, dict):
        return [f"record is a {type(rec).__name__}, expected a JSON object"]
    out = []

    def check(field, ok, what):
        if field not in rec:
            out.append(f"missing field {field!r}")
        elif not ok(rec[field]):
            out.append(f"field {field!r}={rec[field]!r} must be {what}")

    if strict or "version" in rec:
        check("version", lambda v: v == VERSION, f"{VERSION}")
    check("run", lambda v: isinstance(v, str) and v != "", "a non-empty string")
    check("mode", lambda v: v in MODES, f"one of {list(MODES)}")
    check("step", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    check("tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    check("params", lambda v: _is_int(v) and v > 0, "an integer > 0")
    check("eval_loss", _is_num, "a number")
    if strict:
        check("params_total", lambda v: _is_int(v) and v > 0, "an integer > 0")
        check("flops", lambda v: _is_num(v) and v >= 0, "a number >= 0")
        check("eval_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
        check("split", lambda v: isinstance(v, str), "a string")
        check("config", lambda v: isinstance(v, dict), "an object")
        check("time", lambda v: isinstance(v, str), "an ISO-8601 string")
    elif "flops" in rec and rec["flops"] is not None:
        check("flops", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    teacher = rec.get("teacher")
    if rec.get("mode") == "distill" and teacher is None:
        out.append("field 'teacher' must be an object {run, params, tokens, eval_loss} for mode 'distill'")
    if strict and "teacher" not in rec:
        out.append("missing field 'teacher'")
    if teacher is not None:
        if not isinstance(teacher, dict):
            out.append(f"field 'teacher'={teacher!r} must be null or an object")
        else:
            for field, ok, what in (("run", lambda v: isinstance(v, str), "a string"),
                                    ("params", lambda v: _is_int(v) and v > 0, "an integer > 0"),
                                    ("tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
                                    ("eval_loss", _is_num, "a number")):
                if field not in teacher:
                    out.append(f"missing field 'teacher.{field}'")
                elif not ok(teacher[field]):
                    out.append(f"field 'teacher.{field}'={teacher[field]!r} must be {what}")
    return out


def append_record(run_dir, record: dict) -> Path:
    """Append one record as a JSON line to <run_dir>/eval.jsonl (flush + fsync so a crash loses at most this line; a
    failed write, e.g. disk full, leaves no partial line and raises a UserError)."""
    problems = validate_record(record)
    if problems:
        raise UserError(f"eval record for run {record.get('run')!r}: " + "; ".join(problems))
    path = Path(run_dir) / EVAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    append_line(path, json.dumps(record, separators=(",", ":"), sort_keys=False))  # whole line or nothing
    return path


def read_records(path, stats: Optional[dict] = None) -> Tuple[List[dict], int]:
    """(valid records, number of skipped lines) of one eval.jsonl.

    Malformed JSON, records lacking a needed field (the warning names file, line and field) and non-finite losses
    are skipped with a warning; an unreadable file counts as one bad entry. Never raises on file content.
    """
    path = str(path)
    good, n_bad, n_nonfinite, n_warned = [], 0, 0, 0

    def warn(msg):
        nonlocal n_warned
        n_warned += 1
        if n_warned <= _MAX_LINE_WARNINGS:
            log.warning(msg)

    try:
        fh = open(path, "r", encoding="utf-8", errors="replace")
    except OSError as e:
        log.warning("%s: cannot read (%s); skipped", path, e.strerror or e)
        return [], 1
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                n_bad += 1
                warn(f"{path}:{lineno}: malformed JSON line skipped ({e.msg})")
                continue
            problems = validate_record(rec, strict=False)
            if problems:
                n_bad += 1
                warn(f"{path}:{lineno}: record skipped: {'; '.join(problems)}")
                continue
            losses = [rec["eval_loss"]] + ([rec["teacher"]["eval_loss"]] if rec.get("teacher") else [])
            if not all(math.isfinite(v) for v in losses):
                n_nonfinite += 1
                warn(f"{path}:{lineno}: non-finite loss {losses} of run {rec['run']!r} step {rec['step']} dropped")
                continue
            good.append(rec)
    if n_warned > _MAX_LINE_WARNINGS:
        log.warning("%s: %d more problems not shown", path, n_warned - _MAX_LINE_WARNINGS)
    if stats is not None:
        stats["n_bad"] = stats.get("n_bad", 0) + n_bad
        stats["n_nonfinite"] = stats.get("n_nonfinite", 0) + n_nonfinite
        stats["n_records"] = stats.get("n_records", 0) + len(good)
    return good, n_bad + n_nonfinite


def expand_paths(paths: Sequence[str]) -> List[Path]:
    """Run dirs (their eval.jsonl, or every eval.jsonl below), eval.jsonl / .csv files and globs -> files."""
    files: List[Path] = []
    for spec in paths:
        matches = sorted(glob.glob(str(spec), recursive=True)) if glob.has_magic(str(spec)) else [str(spec)]
        if not matches or not Path(matches[0]).exists():
            raise UserError(f"{spec}: no such file, run directory or glob match")
        for m in map(Path, matches):
            if m.is_dir():
                found = [m / EVAL_FILE] if (m / EVAL_FILE).is_file() else sorted(m.rglob(EVAL_FILE))
                if not found and len(matches) == 1:
                    raise UserError(f"{m}: directory holds no {EVAL_FILE} (is it a run directory?)")
                files.extend(found)
            else:
                files.append(m)
    seen, out = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def record_row(rec: dict) -> dict:
    """Table row of one record; flops fall back to the PAPER.md accounting when the record lacks them."""
    t = rec.get("teacher") or {}
    flops = rec.get("flops")
    if flops is None:
        flops = training_flops(rec["params"], rec["tokens"], t.get("params", 0.0), 0.0,
                               delta_lgt=1.0 if t else 0.0)
    return {"run": rec["run"], "mode": rec["mode"], "step": rec["step"], "params": rec["params"],
            "tokens": rec["tokens"], "flops": float(flops), "eval_loss": float(rec["eval_loss"]),
            "teacher_run": t.get("run"), "teacher_params": t.get("params"), "teacher_tokens": t.get("tokens"),
            "teacher_loss": t.get("eval_loss"), "teacher_cache": t.get("cache_id"),
            "cache_flops_per_token": (t["cache_flops"] / t["cache_tokens"]) if t.get("cache_tokens") else None}


def share_cache_flops(rows: List[dict]) -> List[dict]:
    """Charge each cached-teacher student its share of the one teacher forward that wrote its cache.

    A cached run's own flops exclude the teacher forward; the n distinct runs of `rows` that read one cache each
    add F_T D / n (D: the row's tokens), so students that all read the whole cache pay F_T D_cache once in total.
    """
    users: Dict[str, set] = {}
    for r in rows:
        if r.get("teacher_cache"):
            users.setdefault(r["teacher_cache"], set()).add(r["run"])
    for r in rows:
        if r.get("teacher_cache") and r.get("cache_flops_per_token"):
            r["flops"] = r["flops"] + r["cache_flops_per_token"] * r["tokens"] / len(users[r["teacher_cache"]])
    return rows


def aggregate(paths: Sequence[str], all_steps: bool = False, stats: Optional[dict] = None) -> List[dict]:
    """Rows (see TABLE_COLUMNS) from run dirs / eval.jsonl / CSV tables / globs: the last eval per run
    (highest step, latest line on ties) unless all_steps; records repeating a (run, step) of the same file (a requeued
    job) count once, the latest line; a record found identical (run, step, tokens, loss, time) in an earlier file (a
    copied run dir) counts once. Fills `stats` with n_files, n_records, n_bad, n_nonfinite, n_duplicate, n_copied.
    """
    stats = {} if stats is None else stats
    rows: List[dict] = []
    files = expand_paths(paths)
    stats["n_files"] = len(files)
    seen: Dict[tuple, Path] = {}  # identity of a record -> the first file holding it
    for f in files:
        if f.suffix.lower() == ".csv":
            rows.extend(read_table(f, stats))
            continue
        recs, _ = read_records(f, stats)
        ids = [(r["run"], r["step"], r["tokens"], r["eval_loss"], r.get("time")) for r in recs]
        copied = [i for i, k in enumerate(ids) if seen.get(k, f) != f]
        if copied:
            stats["n_copied"] = stats.get("n_copied", 0) + len(copied)
            log.warning("%s: %d records are identical to records of %s (a copied run dir?): counted once", f,
                        len(copied), seen[ids[copied[0]]])
            drop = set(copied)
            recs = [r for i, r in enumerate(recs) if i not in drop]
        for k in ids:
            seen.setdefault(k, f)
        # a requeued job re-evaluates the steps after its last checkpoint: one record per (run, step), the latest line
        by_step: Dict[Tuple[str, int], dict] = {}
        for r in recs:
            by_step[(r["run"], r["step"])] = r
        n_dup = len(recs) - len(by_step)
        if n_dup:
            stats["n_duplicate"] = stats.get("n_duplicate", 0) + n_dup
            log.warning("%s: %d records repeat a (run, step) already recorded (a requeued job): the latest kept",
                        f, n_dup)
        if all_steps:
            rows.extend(record_row(r) for r in by_step.values())
            continue
        last: Dict[str, dict] = {}
        for r in by_step.values():
            if r["run"] not in last or r["step"] >= last[r["run"]]["step"]:
                last[r["run"]] = r
        rows.extend(record_row(r) for r in last.values())
    if not rows:
        raise UserError(f"no usable eval records in {', '.join(map(str, files)) or 'the given paths'} "
                        f"({stats.get('n_bad', 0)} malformed lines, {stats.get('n_nonfinite', 0)} non-finite losses)")
    return share_cache_flops(rows)


def _num(v: Optional[str]) -> Optional[float]:
    if v is None or str(v).strip() in ("", "None", "null"):
        return None
    return float(v)


def read_table(path, stats: Optional[dict] = None) -> List[dict]:
    """Rows from a CSV: the aggregate table, or the short form with columns params,tokens,loss[,teacher_loss].

    Rows with non-finite losses are dropped with a warning; unparsable numbers name file, line and column.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such table file")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        loss_col = "eval_loss" if "eval_loss" in cols else "loss"
        missing = [c for c in ("params", "tokens", loss_col) if c not in cols]
        if missing:
            raise UserError(f"{path}: table lacks column(s) {missing}; need params,tokens,loss[,teacher_loss] "
                            f"or the columns written by `megadistill aggregate`")
        rows, n_nonfinite = [], 0
        for lineno, raw in enumerate(reader, 2):
            try:
                vals = {c: _num(raw.get(c)) for c in ("params", "tokens", loss_col, "flops", "step",
                                                      "teacher_params", "teacher_tokens", "teacher_loss")}
            except ValueError:
                bad = next(c for c in raw if c in cols and c not in ("run", "mode", "teacher_run")
                           and _try_float(raw[c]) is False)
                raise UserError(f"{path}:{lineno}: column {bad!r} value {raw[bad]!r} is not a number") from None
            for c in ("params", "tokens", loss_col):
                if vals[c] is None:
                    raise UserError(f"{path}:{lineno}: column {c!r} is empty")
            losses = [vals[loss_col]] + ([vals["teacher_loss"]] if vals["teacher_loss"] is not None else [])
            if not all(math.isfinite(v) for v in losses):
                n_nonfinite += 1
                log.warning("%s:%d: non-finite loss %s dropped", path, lineno, losses)
                continue
            if vals["params"] <= 0 or vals["tokens"] <= 0:
                raise UserError(f"{path}:{lineno}: params and tokens must be > 0 "
                                f"(got {vals['params']}, {vals['tokens']})")
            mode = raw.get("mode") or ("distill" if vals["teacher_loss"] is not None else "supervised")
            flops = vals["flops"]
            if flops is None:
                flops = training_flops(vals["params"], vals["tokens"], vals["teacher_params"] or 0.0, 0.0,
                                       delta_lgt=1.0 if vals["teacher_params"] else 0.0)
            rows.append({"run": raw.get("run") or f"{path.stem}:{lineno}", "mode": mode,
                         "step": int(vals["step"]) if vals["step"] is not None else None,
                         "params": vals["params"], "tokens": vals["tokens"], "flops": float(flops),
                         "eval_loss": vals[loss_col], "teacher_run": raw.get("teacher_run") or None,
                         "teacher_params": vals["teacher_params"], "teacher_tokens": vals["teacher_tokens"],
                         "teacher_loss": vals["teacher_loss"]})
    if stats is not None:
        stats["n_nonfinite"] = stats.get("n_nonfinite", 0) + n_nonfinite
        stats["n_records"] = stats.get("n_records", 0) + len(rows)
    return rows


def _try_float(v) -> bool:
    try:
        _num(v)
        return True
    except ValueError:
        return False


def write_table(rows: Iterable[dict], path, columns: Sequence[str] = TABLE_COLUMNS) -> Path:
    """Write rows as CSV with `columns` (None -> empty cell); extra keys of the rows are ignored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in columns])
    return path


def _cell(v) -> str:
    """CSV text of a value: floats at full precision (repr round-trips), numpy scalars as Python numbers."""
    if v is None:
        return ""
    kind = getattr(getattr(v, "dtype", None), "kind", "")
    if isinstance(v, float) or kind == "f":
        return repr(float(v))
    if kind in ("i", "u"):
        return str(int(v))
    return str(v)
