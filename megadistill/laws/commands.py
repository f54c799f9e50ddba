"""CLI verbs of the scaling-law toolkit: aggregate, fit, predict, plan, sweep, plot (plain functions re-exported)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from megadistill.errors import UserError
from megadistill.laws.api import (aggregate, error_summary, fit_distillation, fit_supervised,  # noqa: F401
                                  predict, predict_rows, read_table)
from megadistill.laws.fit import FitResult
from megadistill.laws.flops import SCENARIOS
from megadistill.laws.forms import PAPER_DISTILLATION, PAPER_SUPERVISED
from megadistill.laws.planner import Plan, answer_line, plan  # noqa: F401
from megadistill.laws.records import TABLE_COLUMNS, write_table

log = logging.getLogger(__name__)


def _out(msg: str = "") -> None:
    print(msg, flush=True)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def _parse_fix(items: Sequence[str]) -> Dict[str, float]:
    out = {}
    for item in items or ():
        for part in item.split(","):
            name, eq, value = part.partition("=")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                eq = ""
            if not eq or not name.strip():
                raise UserError(f"--fix {part!r} is not NAME=VALUE (e.g. --fix gamma=1)")
    return out


def _parse_grid(spec: str):
    if spec in ("paper", "chinchilla"):
        return spec
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--grid {spec!r} is neither paper, chinchilla nor a grid file (JSON/YAML {{name: [values]}})")
    import yaml
    try:
        grid = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"--grid {spec}: not valid JSON/YAML ({e})") from None
    if not isinstance(grid, dict):
        raise UserError(f"--grid {spec}: must map coefficient names to lists of start values")
    return grid


def load_rows(paths: Sequence[str], all_steps: bool = False) -> List[dict]:
    """Rows from tables, run dirs or eval.jsonl files, printing the skipped-line counts."""
    stats: dict = {}
    rows = aggregate(paths, all_steps=all_steps, stats=stats)
    if stats.get("n_bad") or stats.get("n_nonfinite"):
        print(f"skipped {stats.get('n_bad', 0)} malformed lines and dropped {stats.get('n_nonfinite', 0)} "
              f"non-finite losses", file=sys.stderr)
    if stats.get("n_duplicate") or stats.get("n_copied"):
        print(f"counted once: {stats.get('n_duplicate', 0)} re-evaluated (run, step) records of requeued jobs and "
              f"{stats.get('n_copied', 0)} records repeated in copied run dirs", file=sys.stderr)
    return rows


def load_fits(paths: Sequence[str]) -> Tuple[Dict[str, float], Dict[str, float]]:
    """(supervised, distillation) coefficients from fit.json files, the paper's Table 6 where none given."""
    sup, dist = None, None
    for p in paths or ():
        f = FitResult.load(p)
        if f.law == "supervised":
            sup = f.coefficients
        else:
            dist = f.coefficients
            sup = sup or f.supervised
    return dict(sup or PAPER_SUPERVISED), dict(dist or PAPER_DISTILLATION)


def format_fit(fit: FitResult) -> str:
    lines = [f"{fit.law} law fitted to {fit.n_points} points (Huber delta {fit.huber_delta:g}, grid {fit.grid}: "
             f"{fit.n_starts} starts, {fit.n_refined} refined, {fit.seconds:.1f} s)"]
    for k, v in fit.coefficients.items():
        ci = fit.intervals.get(k) if fit.intervals else None
        tag = " (fixed)" if k in fit.fixed else (f"  90% CI [{ci[0]:.6g}, {ci[1]:.6g}]" if ci else "")
        lines.append(f"  {k:>6} = {v:.6g}{tag}")
    r = fit.residuals
    lines.append(f"objective {fit.objective:.6g}; in-sample relative error: mean {100 * r['mean_rel_error']:.3f}%, "
                 f"max {100 * r['max_rel_error']:.3f}%")
    lines += [f"warning: {w}" for w in fit.warnings]
    return "\n".join(lines)


# -- verbs ------------------------------------------------------------------------------------------------

def cmd_aggregate(args) -> int:
    rows = load_rows(args.paths, args.all_steps)
    write_table(rows, args.output)
    _out(f"wrote {len(rows)} rows to {args.output}")
    return 0


def cmd_fit(args) -> int:
    rows = load_rows(args.input)
    fix, grid = _parse_fix(args.fix), _parse_grid(args.grid)
    if args.law == "supervised" and args.supervised_fit:
        raise UserError("--supervised-fit is only for --law distillation")
    kw = dict(fix=fix, huber_delta=args.huber_delta, grid=grid, bootstrap=args.bootstrap, workers=args.workers,
              n_refine=args.n_refine, seed=args.seed)
    if args.law == "supervised":
        fit = fit_supervised(rows, **kw)
    else:
        sup = None
        if args.supervised_fit:
            sf = FitResult.load(args.supervised_fit)
            if sf.law != "supervised":
                raise UserError(f"--supervised-fit {args.supervised_fit} holds a {sf.law} fit, not a supervised one")
            sup = sf
        fit = fit_distillation(rows, sup, **kw)
    fit.save(args.output)
    _out(format_fit(fit))
    _out(f"wrote {args.output}")
    return 0


def cmd_predict(args) -> int:
    fit = FitResult.load(args.fit)
    out = predict_rows(fit, load_rows(args.input))
    s = error_summary(out)
    cols = [c for c in TABLE_COLUMNS if c != "flops"] + ["predicted_loss", "rel_error"]
    if args.output:
        write_table(out, args.output, cols)
        _out(f"wrote {len(out)} predictions to {args.output}")
    else:
        _out(f"{'run':<40} {'params':>10} {'tokens':>10} {'teacher_L':>9} {'loss':>8} {'predicted':>9} {'rel_err':>8}")
        for r in out:
            tl = f"{r['teacher_loss']:.4f}" if r.get("teacher_loss") is not None else "-"
            rel = f"{100 * r['rel_error']:+.3f}%" if r["rel_error"] is not None else "-"
            _out(f"{str(r['run'])[:40]:<40} {r['params']:>10.4g} {r['tokens']:>10.4g} {tl:>9} "
                 f"{r['eval_loss']:>8.4f} {r['predicted_loss']:>9.4f} {rel:>8}")
    _out(f"{s['n']} rows: mean relative error {100 * s['mean_rel_error']:.3f}%, max {100 * s['max_rel_error']:.3f}%")
    return 0


def format_plan(p: Plan) -> str:
    s = p.supervised
    return "\n".join([
        f"scenario {p.scenario}, compute {p.compute:.4g} FLOPs",
        f"  distil:    N_S={p.student_params:.4g} D_S={p.student_tokens:.4g} N_T={p.teacher_params:.4g} "
        f"D_T={p.teacher_tokens:.4g} L_T={p.teacher_loss:.4f} -> L_S={p.student_loss:.4f} (FLOPs {p.flops:.4g})",
        f"  supervise: N={s['params']:.4g} D={s['tokens']:.4g} -> L={s['loss']:.4f}",
        f"  answer: {answer_line(p)}  (L_distil - L_supervised)"])


def cmd_plan(args) -> int:
    sup, dist = load_fits(args.fit)
    p = plan(args.compute, args.scenario, args.student_params, sup, dist, students_per_cache=args.students_per_cache)
    if args.answer:
        _out(answer_line(p))
    elif args.json:
        _out(json.dumps(p.to_dict(), indent=2))
    else:
        _out(format_plan(p))
    return 0


def cmd_sweep(args) -> int:
    from megadistill.laws.sweep import expand, load_sweep, write_sweep
    spec = load_sweep(args.sweep)
    runs = expand(spec)
    if args.dry_run:
        for r in runs:
            _out(f"{r.name:<60} {r.mode:<10} N={r.params:.4g} D={r.tokens:.4g} FLOPs={r.flops:.4g}")
        _out(f"{len(runs)} runs (dry run, nothing written)")
        return 0
    lines = write_sweep(spec, args.output, runs)
    n_t = sum(1 for r in runs if any(r.name == x.teacher.name for x in runs if x.teacher))
    _out(f"wrote {len(lines)} run configs ({sum(r.mode == 'distill' for r in runs)} distillation, {n_t} teachers) "
         f"and {Path(args.output) / 'manifest.jsonl'}; total {sum(r.flops for r in runs):.4g} FLOPs")
    return 0


def cmd_plot(args) -> int:
    from megadistill.laws import plots
    sup, dist = load_fits(args.fit)
    kind = args.kind
    if kind in ("fit", "isoflop", "capacity-gap") and not args.input:
        raise UserError(f"plot {kind} needs --in TABLE")
    if kind == "fit":
        if len(args.fit) != 1:
            raise UserError("plot fit needs exactly one --fit fit.json")
        plots.plot_fit(load_rows(args.input), FitResult.load(args.fit[0]), args.output)
    elif kind == "isoflop":
        plots.plot_isoflop(load_rows(args.input), args.output, sup if args.fit else None)
    elif kind == "capacity-gap":
        plots.plot_capacity_gap(load_rows(args.input), args.output, (dist, sup) if args.fit else None)
    elif kind == "allocation":
        plots.plot_allocation(plots.compute_grid(*args.compute_range, args.points), args.output,
                              args.scenario or list(SCENARIOS), args.student_params[0] if args.student_params else None,
                              sup, dist)
    elif kind == "crossover":
        plots.plot_crossover(args.student_params or [1e8, 3e8, 1e9, 3e9], plots.compute_grid(*args.compute_range,
                             args.points), args.output, (args.scenario or ["best-case"])[0], sup, dist)
    _out(f"wrote {args.output}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("aggregate", help="collect eval records into a loss table (CSV)")
    p.add_argument("paths", nargs="+", help="run dirs, eval.jsonl files, CSV tables or globs")
    p.add_argument("-o", "--output", required=True, help="table.csv to write")
    p.add_argument("--all-steps", action="store_true", help="keep every eval, not only the last per run")
    p.set_defaults(func=cmd_aggregate)

    p = subparsers.add_parser("fit", help="fit the supervised (Eq. 1) or distillation (Eq. 8) law")
    p.add_argument("--law", choices=("supervised", "distillation"), required=True)
    p.add_argument("--in", dest="input", nargs="+", required=True, help="table CSV (or run dirs / eval.jsonl)")
    p.add_argument("-o", "--output", required=True, help="fit.json to write")
    p.add_argument("--fix", action="append", default=[], help="NAME=VALUE in natural units, e.g. gamma=1 (repeatable)")
    p.add_argument("--huber-delta", type=_positive_float, default=1e-4, help="Huber delta in log space (paper 1e-4)")
    p.add_argument("--grid", default="paper", help="paper | chinchilla | FILE (JSON/YAML {coefficient: [starts]})")
    p.add_argument("--bootstrap", type=int, default=0, help="resamples for 90%% intervals (paper: 4096)")
    p.add_argument("--supervised-fit", help="fit.json of the supervised law giving Ltilde_S (distillation)")
    p.add_argument("--n-refine", type=int, default=8, help="distinct screened minima polished with L-BFGS-B")
    p.add_argument("--workers", type=int, default=None, help="processes (default: up to 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_fit)

    p = subparsers.add_parser("predict", help="predicted loss and relative error per row of a table")
    p.add_argument("--fit", required=True, help="fit.json")
    p.add_argument("--in", dest="input", nargs="+", required=True, help="table CSV (or run dirs / eval.jsonl)")
    p.add_argument("-o", "--output", help="write predictions as CSV instead of printing them")
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("plan", help="compute-optimal distillation vs supervised training at a budget")
    p.add_argument("--compute", type=_positive_float, required=True, help="FLOPs budget")
    p.add_argument("--scenario", choices=list(SCENARIOS), default="best-case")
    p.add_argument("--student-params", type=_positive_float, help="fix the student size N_S")
    p.add_argument("--students-per-cache", type=_positive_float, default=1.0,
                   help="students sharing one offline teacher cache (teacher-inference scenarios: each pays 1/n)")
    p.add_argument("--fit", nargs="+", default=[], help="fit.json files (default: the paper's Table 6)")
    p.add_argument("--answer", action="store_true", help="print one line: distil|supervise and L_distil - L_sup")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = subparsers.add_parser("sweep", help="expand a sweep YAML into trainer configs + manifest.jsonl")
    p.add_argument("sweep", help="sweep YAML (see configs/sweeps/)")
    p.add_argument("-o", "--output", required=True, help="directory for <run>.yaml and manifest.jsonl")
    p.add_argument("--dry-run", action="store_true", help="list the runs without writing")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser("plot", help="PNG figures: fit, isoflop, capacity-gap, allocation, crossover")
    p.add_argument("kind", choices=("fit", "isoflop", "capacity-gap", "allocation", "crossover"))
    p.add_argument("--in", dest="input", nargs="+", help="table CSV (or run dirs / eval.jsonl)")
    p.add_argument("--fit", nargs="+", default=[], help="fit.json files (default for planner plots: Table 6)")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), help="scenarios (allocation, crossover)")
    p.add_argument("--student-params", nargs="+", type=_positive_float, help="student sizes (crossover, allocation)")
    p.add_argument("--compute-range", nargs=2, type=_positive_float, default=[1e19, 1e25], metavar=("LO", "HI"))
    p.add_argument("--points", type=int, default=13, help="compute levels across the range")
    p.set_defaults(func=cmd_plot)
