#!/usr/bin/env python
"""Benchmark the scaling-law fits and print JSON: the Chinchilla reproduction (4,500-start grid, 240 points), the
distillation fit on 700 simulated points (216,000-start paper grid) against an exhaustive L-BFGS-B loop over 500
random grid starts, and a timed plain L-BFGS-B loop extrapolated to the whole Chinchilla grid.

Usage: python tools/bench_fit.py [--seeds 0 1 2] [--exhaustive 500] [--plain-starts 100] [--quick]
Timings on a shared machine are noisy: the load average before and after is recorded with them.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megadistill.laws import api  # noqa: E402
from megadistill.laws.fit import fit_law, random_grid_starts  # noqa: E402
from megadistill.laws.forms import CHINCHILLA_EPOCH, SUPERVISED, LawData  # noqa: E402
from megadistill.laws.search import Problem, single_threaded_blas  # noqa: E402
from megadistill.laws.simulate import PAPER_SIZES, extrapolation_split, simulate, student_sizes  # noqa: E402

CHINCHILLA_CSV = REPO.parent / "shared" / "data" / "chinchilla_svg_extracted_data.csv"


def load_chinchilla(path: Path = CHINCHILLA_CSV) -> LawData:
    """Epoch's 245 points -> drop the 5 highest losses -> LawData with D = FLOP / (6 N)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    n = np.array([float(r["Model Size"]) for r in rows])
    c = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.argsort(loss)[:-5]
    return LawData(np.log(n[keep]), np.log(c[keep] / (6 * n[keep])), np.log(loss[keep]))


def bench_chinchilla(plain_starts: int) -> dict:
    data = load_chinchilla()
    t = time.perf_counter()
    fit = fit_law("supervised", data, huber_delta=1e-3, grid="chinchilla", fix={"gamma": 1})
    secs = time.perf_counter() - t
    dev = {k: abs(fit.coefficients[k] / v - 1) for k, v in CHINCHILLA_EPOCH.items() if k != "gamma"}
    out = {"n_points": len(data), "n_starts": fit.n_starts, "seconds": round(secs, 2),
           "coefficients": fit.coefficients, "objective": fit.objective,
           "epoch_reference": CHINCHILLA_EPOCH, "rel_deviation": dev}
    t = time.perf_counter()
    boot = fit_law("supervised", data, huber_delta=1e-3, grid="chinchilla", fix={"gamma": 1}, bootstrap=4096)
    out["bootstrap_4096"] = {"seconds": round(time.perf_counter() - t, 2), "intervals_90": boot.intervals}
    if plain_starts:
        # The plain loop the issue describes: scipy L-BFGS-B from each start, one process.
        starts = random_grid_starts("supervised", "chinchilla", plain_starts, seed=0, fix={"gamma": 1})
        problem = Problem(SUPERVISED, data, 1e-3, dict([SUPERVISED.fix_value("gamma", 1.0)]))
        t = time.perf_counter()
        with single_threaded_blas():
            best = min(problem.refine(s)[1] for s in starts)
        secs = time.perf_counter() - t
        out["plain_loop"] = {"starts_timed": plain_starts, "seconds": round(secs, 2),
                             "extrapolated_4500_starts_s": round(secs * 4500 / plain_starts, 1),
                             "best_objective": best}
    return out


def bench_distillation(seed: int, exhaustive: int) -> dict:
    teachers = list(PAPER_SIZES.values())[1:]  # 10 teachers, 198M-12.6B (with 143M as a student)
    rows = simulate(teacher_params=teachers, student_params=student_sizes(14), seed=seed)
    sup = api.fit_supervised(rows)
    dist = api.distill_rows(rows)
    t = time.perf_counter()
    fast = api.fit_distillation(rows, sup)
    secs = time.perf_counter() - t
    out = {"seed": seed, "n_points": len(dist), "supervised_fit_s": round(sup.seconds, 2),
           "fast": {"seconds": round(secs, 2), "n_starts": fast.n_starts, "objective": fast.objective,
                    "in_sample_mean_rel_error": fast.residuals["mean_rel_error"]}}
    if exhaustive:
        starts = random_grid_starts("distillation", "paper", exhaustive, seed=1000 + seed)
        t = time.perf_counter()
        slow = api.fit_distillation(rows, sup, starts=starts)
        secs = time.perf_counter() - t
        out["exhaustive"] = {"starts": exhaustive, "seconds": round(secs, 2), "objective": slow.objective}
        # Equal minima reached by different routes differ in the 8th digit (L-BFGS-B's ftol): 1 ppm is "no worse".
        out["objective_rel_diff"] = fast.objective / slow.objective - 1
        out["fast_no_worse"] = bool(out["objective_rel_diff"] <= 1e-6)
    train, test = extrapolation_split(rows, 2e9)
    held = api.fit_distillation(train)  # supervised law from the training rows too
    pred = api.predict_rows(held, test)
    out["extrapolation"] = {"students_fit_le": 2e9, "train_points": len(api.distill_rows(train)),
                            "heldout_points": len(pred), "seconds": round(held.seconds, 2), **api.error_summary(pred)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--exhaustive", type=int, default=500, help="random starts of the exhaustive baseline (0: skip)")
    ap.add_argument("--plain-starts", type=int, default=100, help="Chinchilla starts timed in a plain loop (0: skip)")
    ap.add_argument("--quick", action="store_true", help="no baselines (exhaustive 0, plain 0)")
    args = ap.parse_args(argv)
    if args.quick:
        args.exhaustive, args.plain_starts = 0, 0
    report = {"cpus": os.cpu_count(), "load_avg_before": os.getloadavg()}
    if CHINCHILLA_CSV.is_file():
        report["chinchilla"] = bench_chinchilla(args.plain_starts)
    else:
        report["chinchilla"] = {"skipped": f"{CHINCHILLA_CSV} not found"}
    report["distillation"] = [bench_distillation(s, args.exhaustive) for s in args.seeds]
    report["load_avg_after"] = os.getloadavg()
    print(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
