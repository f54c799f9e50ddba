"""`megadistill demo`: run the small study on a few worker processes (teachers, students, distillation), then report."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time

from pathlib import Path

from megadistill.errors import UserError

_QUEUE = None  # progress queue of a worker process (set by _worker_init)

log = logging.getLogger(__name__)


def _clean_incomplete(run_dir: Path) -> None:
    """A run dir without DONE and without a checkpoint holds nothing to resume: start it afresh (no duplicate logs)."""
    if run_dir.exists() and not (run_dir / "DONE").exists() and not (run_dir / "checkpoints" / "latest").exists():
        shutil.rmtree(run_dir)


def _worker_init(queue) -> None:
    """Each worker process: one thread (tiny matmuls are slower split over busy cores), quiet logs, a progress queue."""
    import torch

    torch.set_num_threads(1)
    logging.getLogger("megadistill").setLevel(logging.WARNING)
    global _QUEUE
    _QUEUE = queue


def _worker_train(name: str, cfg) -> str:
    """Run one training in a worker (its own single-process gloo world); progress goes to the parent's bars."""
    from megadistill.train.trainer import train

    _clean_incomplete(Path(cfg.train.run_dir))
    train(cfg, progress=lambda step, total: _QUEUE.put((name, step, total)))
    return name


def _execute(runs, workers: int) -> None:
    """Run the study on `workers` processes, each trainings back to back; a run starts once its teachers are done."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    done, pending, running = set(), list(runs), {}
    outer = tqdm(total=len(runs), desc="study", unit="run", position=0, dynamic_ncols=True)
    bars = {}
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(queue,)) as pool:
        while pending or running:
            for run in [r for r in pending if all(d in done for d in r.deps)][: workers - len(running)]:
                pending.remove(run)
                running[pool.submit(_worker_train, run.name, run.cfg)] = run
            finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            while not queue.empty():
                name, step, total = queue.get()
                bar = bars.get(name)
                if bar is None:
                    bar = bars[name] = tqdm(total=total, desc=name, unit="step", leave=False, dynamic_ncols=True)
                bar.update(step - bar.n)
            for fut in finished:
                run = running.pop(fut)
                fut.result()  # re-raise a worker's failure here
                done.add(run.name)
                if run.name in bars:
                    bars.pop(run.name).close()
                outer.update(1)
    outer.close()


def run_demo(out: Path, quick: bool, workers: int = 2) -> dict:
    from megadistill.data import describe_data
    from megadistill.demo.report import build_report
    from megadistill.demo.study import FULL, QUICK, plan_runs

    spec = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    spec_file = out / "study.json"
    spec_json = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    if spec_file.exists() and spec_file.read_text().strip() != spec_json:
        raise UserError(f"{out} holds runs of a different study design ({'full' if quick else '--quick'}); "
                        "choose another --out or delete it")
    spec_file.write_text(spec_json + "\n")
    runs = plan_runs(spec, out / "runs")
    t0 = time.time()
    _execute(runs, workers)
    train_wall = time.time() - t0
    first = runs[0].cfg
    data_info = describe_data(first.data, first.model.vocab_size, first.train.seq_len)
    flops_shape = {"n_ctx": first.train.seq_len, "n_vocab": first.model.vocab_size,
                   "rho": first.model.d_model / first.model.n_layers, "bounds": (1e3, 1e12)}
    spec_desc = {"runs": [r.name for r in runs], "teachers": [a.name for a in spec.teachers],
                 "students": [a.name for a in spec.students], **{k: getattr(spec, k) for k in (
                     "teacher_tokens_per_param", "student_tokens", "n_evals")}}
    summary = build_report(out, [Path(r.cfg.train.run_dir) for r in runs], data_info, spec_desc,
                           time.time() - t0, flops_shape)
    summary["train_wall_s"] = train_wall
    return summary


def _demo(args) -> int:
    out = Path(args.out)
    summary = run_demo(out, args.quick, args.workers)
    held = summary["distillation_held_out"]["mean_rel_error"]
    print(f"\nstudy done in {summary['wall_s']:.0f} s: {summary['n_points']} eval points")
    print(f"fitted E = {summary['fitted_E']:.4f} vs true entropy rate {summary['entropy_rate']:.4f} nats/token")
    print(f"distillation law held-out mean relative error {100 * held:.2f}%")
    if args.quick:
        print("(--quick: 5 runs are too few to identify the law's coefficients; run without --quick for the study)")
    print(f"report: {out / 'REPORT.md'} (figures, fits and table.csv beside it)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="run a small distillation scaling-law study on CPU and write REPORT.md",
                       epilog="example: megadistill demo --out runs/demo   "
                              "(--quick: 5 runs in about 15 s, too few to pin the law down)")
    p.add_argument("--out", default="runs/demo", help="study directory (reruns skip finished runs)")
    p.add_argument("--quick", action="store_true", help="a 5-run study for tests (about 15 s)")
    p.add_argument("--workers", type=int, default=2, help="training processes (one thread each)")
    p.set_defaults(func=_demo)
