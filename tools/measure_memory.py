#!/usr/bin/env python
"""Measure the real trainer's peak memory on CPU (fresh gloo processes per case) and compare with megadistill.train.memory.

What is measured, and why it is the estimate's counterpart. Each case runs `megadistill.train.trainer.train` for 2
steps in fresh processes (1 or 2 gloo ranks, torch threads = 1); rank 0 is measured. Baseline: the resident set size
after imports, the process group and two steps of a throw-away DeepSpeed engine at the case's ZeRO stage(s) (this
pays DeepSpeed's one-time CPU costs: its lazily built comm op with shared-memory buffers, ~160 MB, and ZeRO's
first-engine set-up on gloo, ~46 MB; on a GPU the planner's fixed allowance covers the CUDA/NCCL equivalents). The
kernel's RSS high-water mark (VmHWM) is reset after step 1 (writing 5 to /proc/self/clear_refs) and read after step 2
of 3, so the peak covers step 2: the steady state (torch creates Adam's states in step 1's optimizer step, after that
step's backward), with distill.teacher_prefetch's forward of step 3's first micro-batch inside it (a run's last step
prefetches nothing).
measured = VmHWM - baseline = every tensor live at the worst moment of a step (weights, gradients, optimizer states,
teacher, activations, loss buffers, ZeRO buffers) + the run's host-side runtime memory (gloo and DeepSpeed staging,
Python objects: 20-75 MB in 2-process runs, ~0 in 1-process runs), against `estimate()["modeled"]`. glibc's
MALLOC_MMAP_THRESHOLD_ is pinned to 64 KiB so every tensor buffer is its own mmap, returned to the kernel when freed
(the dynamic threshold would otherwise park freed tensors in the heap and inflate RSS beyond live memory).
zero.bucket_size is set below the model size so ZeRO's torch.empty bucket is fully written (RSS counts only touched
pages; a GPU allocator reserves all of it).

`--trace` also counts live tensor storages through a TorchDispatchMode (exact bytes, the CPU counterpart of
torch.cuda.max_memory_allocated; storages freed = finalised) and prints the largest ones at the peak; `--loss`
compares the loss phase alone (a direct forward/backward of the objective on a 1-block model, every mode, dtype
and loss form) with memory.loss_bytes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import queue as queue_mod
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List

MIB = 2 ** 20
# student: 4 blocks, d=512, V=8192: 21.2M stored params; teacher: 6 blocks, d=768: 55.1M
STUDENT = ["model.n_layers=4", "model.d_model=512", "model.n_heads=8", "model.head_dim=64", "model.ff_multiple=64",
           "model.vocab_size=8192"]
TEACHER = ["model.n_layers=6", "model.d_model=768", "model.n_heads=12", "model.head_dim=64", "model.ff_multiple=64",
           "model.vocab_size=8192"]
SEQ, MB = 256, 4

# name -> (world size, overrides); "distill" cases get a teacher written beforehand
CASES: Dict[str, tuple] = {
    "sup_z0_w1": (1, ["zero.stage=0"]),
    "sup_z0_w1_gas2": (1, ["zero.stage=0", f"train.global_batch_size={2 * MB}"]),
    "sup_z1_w2_full_fused": (2, ["zero.stage=1", "model.activation_checkpointing=full", "distill.fused=true"]),
    "sup_z1_w2_gas2": (2, ["zero.stage=1", f"train.global_batch_size={4 * MB}"]),
    "sup_z2_w2": (2, ["zero.stage=2"]),
    "sup_z1_w2_bf16": (2, ["zero.stage=1", "train.precision=bf16"]),
    "sup_z0_w1_bf16": (1, ["zero.stage=0", "train.precision=bf16"]),
    "sup_z1_w1_bf16": (1, ["zero.stage=1", "train.precision=bf16"]),  # one rank, bf16: the ZeRO-1 optimizer
    # bf16 gradients accumulated in fp32 (train.grad_accum_dtype=auto): ZeRO-1 is DeepSpeed's BF16_Optimizer (full
    # fp32 gradient buffer), ZeRO-2/3 accumulate fp32 partitions; the bf16 opt-out keeps ZeRO's bf16 buffers
    "sup_z1_w2_bf16_gas2": (2, ["zero.stage=1", "train.precision=bf16", f"train.global_batch_size={4 * MB}"]),
    "sup_z1_w2_bf16_gas2_bf16acc": (2, ["zero.stage=1", "train.precision=bf16", f"train.global_batch_size={4 * MB}",
                                        "train.grad_accum_dtype=bf16"]),
    "sup_z2_w2_bf16_gas2": (2, ["zero.stage=2", "train.precision=bf16", f"train.global_batch_size={4 * MB}"]),
    "sup_z3_w2_bf16_gas2": (2, ["zero.stage=3", "train.precision=bf16", f"train.global_batch_size={4 * MB}"]),
    # fp32 accumulation, bf16 reductions (train.grad_reduce_dtype=bf16)
    "sup_z1_w2_bf16_gas2_bf16reduce": (2, ["zero.stage=1", "train.precision=bf16", f"train.global_batch_size={4 * MB}",
                                           "train.grad_reduce_dtype=bf16"]),
    "sup_z3_w2_bf16_gas2_bf16reduce": (2, ["zero.stage=3", "train.precision=bf16", f"train.global_batch_size={4 * MB}",
                                           "train.grad_reduce_dtype=bf16"]),
    "sup_z3_w2": (2, ["zero.stage=3"]),
    "sup_tp2_z1": (2, ["zero.stage=1", "parallel.tp_size=2"]),
    "sup_tp2_z1_sp": (2, ["zero.stage=1", "parallel.tp_size=2", "parallel.sequence_parallel=true"]),
    "kd_z0_w1_fused_full": (1, ["train.mode=distill", "zero.stage=0", "distill.fused=true",
                                "model.activation_checkpointing=full"]),
    "kd_z1_w2": (2, ["train.mode=distill", "zero.stage=1"]),
    "kd_z2_w2_teacher_z3": (2, ["train.mode=distill", "zero.stage=2", "distill.teacher_zero3=true"]),
    "kd_z2_w2_teacher_z3_noprefetch": (2, ["train.mode=distill", "zero.stage=2", "distill.teacher_zero3=true",
                                           "distill.teacher_prefetch=false"]),
    "kd_z3_w2_fused": (2, ["train.mode=distill", "zero.stage=3", "distill.fused=true"]),
}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def case_overrides(name: str, root: Path) -> List[str]:
    world, extra = CASES[name]
    gbs = [o for o in extra if o.startswith("train.global_batch_size=")]
    tp = int(next((o.split("=")[1] for o in extra if o.startswith("parallel.tp_size=")), 1))
    over = STUDENT + [f"train.seq_len={SEQ}", f"train.micro_batch_size={MB}", "train.steps=3",
                      f"train.eval_tokens={SEQ * MB * (world // tp)}",  # one eval batch per DP rank
                      "optim.warmup_steps=1", f"train.run_dir={root / name}", "data.synthetic_branching=4",
                      "train.progress=false", "zero.bucket_size=1000000", "train.save=false"]
    if not gbs:
        over.append(f"train.global_batch_size={MB * (world // tp)}")
    if "train.mode=distill" in extra:
        over += [f"distill.teacher={root / 'teacher'}", "data.split=student"]
    return over + list(extra)


def write_teacher(root: Path) -> Path:
    """A random teacher export (model.safetensors + config.yaml): memory does not depend on its training."""
    import torch
    from megadistill import config
    from megadistill.model.transformer import Transformer
    from megadistill.train import checkpoint
    out = root / "teacher"
    if not (out / checkpoint.WEIGHTS).is_file():
        cfg = config.load([], TEACHER + ["train.steps=1"])
        torch.manual_seed(0)
        state = {k: v.detach().clone() for k, v in Transformer(cfg.model).state_dict().items()}
        checkpoint.write_weights(state, out, config.to_yaml(cfg))
        (out / "meta.json").write_text(json.dumps({"run": "teacher", "tokens": 0}) + "\n")
    return out


def _warm_up_engine(stage: int, world: int) -> None:
    """Two steps of a throw-away DeepSpeed engine on a 64x64 Linear at this ZeRO stage: pays DeepSpeed's one-time
    CPU costs (its lazily built comm op with shared-memory buffers, ~160 MB; ZeRO's first-engine set-up on gloo,
    ~46 MB) before the baseline, as the planner's fixed GPU allowance covers the CUDA/NCCL equivalents."""
    import deepspeed
    import torch
    lin = torch.nn.Linear(64, 64)
    engine, *_ = deepspeed.initialize(model=lin, optimizer=torch.optim.AdamW(lin.parameters()), config={
        "train_batch_size": world, "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 10 ** 6, "allgather_bucket_size": 10 ** 6}},
        dist_init_required=False)
    for _ in range(2):
        engine.backward(engine(torch.randn(1, 64)).sum())
        engine.step()
    engine.destroy()


def _worker(rank: int, world: int, port: int, overrides: List[str], trace: bool, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from megadistill import config
        from megadistill.train.trainer import train
        cfg = config.load([], overrides)
        dp = world // cfg.parallel.tp_size
        stages = {cfg.zero.stage if dp > 1 else 0} | ({3} if cfg.distill.teacher_zero3 and dp > 1 else set())
        for stage in sorted(stages):
            _warm_up_engine(stage, world)
        gc.collect()
        res: Dict = {"baseline": _status_bytes("VmRSS")}
        tracker = LiveTensors() if trace else None

        def progress(step: int, total: int) -> None:
            if step == 1:
                res["rss_after_step1"] = _status_bytes("VmRSS")
                res["tensors_after_step1"] = tracker.cur if tracker is not None else None
                _reset_peak()
                if tracker is not None:
                    tracker.start_window()
            if step == 2:
                res["peak"] = _status_bytes("VmHWM")
                if tracker is not None:
                    res["trace_peak"], res["trace_top"] = tracker.peak_in_window, tracker.top()

        t0 = time.time()
        if tracker is not None:
            with tracker:
                train(cfg, progress=progress)
        else:
            train(cfg, progress=progress)
        res["seconds"] = time.time() - t0
        queue.put((rank, "ok", res))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_case(name: str, root: Path, trace: bool = False, timeout: float = 600.0) -> Dict:
    """Run one case in fresh processes; return rank 0's {baseline, peak, measured, seconds} (bytes)."""
    import multiprocessing as mp
    world, extra = CASES[name]
    if "train.mode=distill" in extra:
        write_teacher(root)
    shutil.rmtree(root / name, ignore_errors=True)  # a finished run dir would make train() skip
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc at the children's start-up
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    over = case_overrides(name, root)
    procs = [ctx.Process(target=_worker, args=(r, world, port, over, trace, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors, deadline = {}, [], time.time() + timeout
    while len(results) < world and not errors:
        try:
            rank, status, payload = queue.get(timeout=2.0)
        except queue_mod.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.time() > deadline:
                errors.append(f"workers exited with codes {dead} (or timed out after {timeout:.0f} s) "
                              "without a result")
            continue
        (results.__setitem__(rank, payload) if status == "ok" else errors.append(f"rank {rank}:\n{payload}"))
    for p in procs:
        p.join(timeout=5 if errors else 60)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError(f"case {name} failed:\n" + "\n".join(errors))
    r = results[0]
    r["measured"] = r["peak"] - r["baseline"]
    return r


def estimate_case(name: str, root: Path) -> Dict:
    from megadistill import config
    from megadistill.train.memory import estimate
    world, extra = CASES[name]
    cfg = config.load([], case_overrides(name, root), world_size=world)
    teacher = config.load([], TEACHER + ["train.steps=1"]).model if cfg.train.mode == "distill" else None
    return estimate(cfg, world, teacher=teacher, device="cpu")  # as run here: train.compile=auto is off


def compare(names: List[str], root: Path, trace: bool = False) -> List[Dict]:
    rows = []
    for name in names:
        got = run_case(name, root, trace=trace)
        est = estimate_case(name, root)
        row = {"case": name, "measured_mib": got["measured"] / MIB, "estimated_mib": est["modeled"] / MIB,
               "rel_error": est["modeled"] / got["measured"] - 1.0, "phase": est["phase"],
               "seconds": got["seconds"],
               "terms_mib": {k: est[k] / MIB for k in ("student_weights", "gradients", "optimizer_states",
                                                        "teacher_weights", "activations", "logits_loss",
                                                        "zero_buffers", "step_transient")}}
        if trace:
            row["traced_mib"] = got["trace_peak"] / MIB
            row["trace_top"] = got["trace_top"]
        rows.append(row)
    return rows


class LiveTensors:
    """TorchDispatchMode counting live tensor storages (freed = storage finalised); peak since start_window()."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer._record(out, func.__name__)
                return out

        self.mode, self.live, self.cur, self.peak_in_window, self.snapshot = _Mode(), {}, 0, 0, []
        self.window = False

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def track(self, tensors) -> None:
        """Count storages that already exist (e.g. parameters), so views of them are not mistaken for new memory."""
        self._record(list(tensors), "existing")

    def start_window(self) -> None:
        self.window, self.peak_in_window = True, self.cur

    def _record(self, out, op: str) -> None:
        import weakref
        import torch
        from torch.utils._pytree import tree_flatten
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            s = t.untyped_storage()
            key = id(s)
            if key in self.live:
                continue
            nb = s.nbytes()
            self.live[key] = (nb, op, tuple(t.shape), str(t.dtype).replace("torch.", ""))
            self.cur += nb
            weakref.finalize(s, self._free, key, nb)
            if self.window and self.cur > self.peak_in_window:
                self.peak_in_window, self.snapshot = self.cur, list(self.live.values())

    def _free(self, key, nb) -> None:
        if self.live.pop(key, None) is not None:
            self.cur -= nb

    def top(self, k: int = 20) -> List[str]:
        agg: Dict[tuple, List[int]] = {}
        for nb, op, shape, dt in self.snapshot:
            a = agg.setdefault((op, shape, dt), [0, 0])
            a[0] += nb
            a[1] += 1
        rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:k]
        return [f"{nb / MIB:8.1f} MiB x{n:<3d} {op} {list(shape)} {dt}" for (op, shape, dt), (nb, n) in rows]


def loss_peak(mode: str, precision: str, teacher_dtype, fused: bool, vocab: int = 16384, tokens: int = 1024,
              chunk: int = 256):
    """(measured, modelled) peak bytes of one objective forward+backward on a 1-block model (TP=1): the live tensor
    bytes above the weights, against memory.loss_bytes + memory.activation_bytes."""
    import torch
    from megadistill import config
    from megadistill.model.transformer import Transformer
    from megadistill.train import memory
    from megadistill.train.objective import Objective, teacher_outputs
    cfg = config.load([], ["model.n_layers=1", "model.d_model=64", "model.n_heads=2", "model.head_dim=32",
                           f"model.vocab_size={vocab}", "train.steps=1", f"train.mode={mode}",
                           "distill.teacher=unused", f"distill.fused={str(fused).lower()}",
                           f"distill.chunk_tokens={chunk}"])
    torch.manual_seed(0)
    student, teacher = Transformer(cfg.model), Transformer(cfg.model).requires_grad_(False)
    if precision == "bf16":
        student = student.bfloat16()
    if teacher_dtype == "bf16":
        teacher = teacher.bfloat16()
    ids = torch.randint(0, vocab, (1, tokens))
    with LiveTensors() as tracker:
        tracker.track(list(student.parameters()) + list(teacher.parameters()))
        tracker.start_window()
        before = tracker.cur
        extra = teacher_outputs(teacher, cfg, ids, None) if mode == "distill" else {}
        loss, _ = Objective(student, cfg)(ids, ids, None, **extra)
        del extra
        loss.backward()
        peak = tracker.peak_in_window - before
    wb = 2 if precision == "bf16" else 4
    est = memory.loss_bytes(tokens, cfg.model, 1, wb, fused, chunk, cfg.model if mode == "distill" else None,
                            tb=2 if teacher_dtype == "bf16" else 4)
    return peak, est + memory.activation_bytes(cfg.model, tokens, 1, wb)


def loss_table() -> List[Dict]:
    """Measured vs modelled loss-phase peaks for every objective variant (the `--loss` report)."""
    rows = []
    for mode, tdtype in (("supervised", None), ("distill", "fp32"), ("distill", "bf16")):
        for prec in ("fp32", "bf16"):
            for fused in (False, True):
                peak, est = loss_peak(mode, prec, tdtype, fused)
                rows.append({"mode": mode, "student": prec, "teacher": tdtype, "fused": fused,
                             "measured_mib": round(peak / MIB, 2), "modelled_mib": round(est / MIB, 2),
                             "error": round(est / peak - 1, 4)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="all", help=f"comma-separated subset of: {', '.join(CASES)}")
    ap.add_argument("--trace", action="store_true", help="also trace live tensor bytes (slower)")
    ap.add_argument("--loss", action="store_true", help="compare the loss phase alone with the model, per objective variant, and exit")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.loss:
        for row in loss_table():
            print(json.dumps(row), flush=True)
        return 0
    names = list(CASES) if args.cases == "all" else args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown cases {unknown}; known: {list(CASES)}", file=sys.stderr)
        return 2
    root = Path(args.workdir or tempfile.mkdtemp(prefix="measure_memory_"))
    for row in compare(names, root, trace=args.trace):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
