"""Benchmark of the distillation loss (forward + backward): peak resident memory and time, printed as one JSON object.

Cases, each in a fresh subprocess: (a) naive dense (full logits, log_softmax, KL), (b) ours autograd-composed
(vocab_parallel_kl_div on materialised logits, the reference), (c) ours single-pass on materialised logits
(logits_distill_loss, inplace: the trainer's default), (d) ours chunked fused-linear with the eager chunk kernel,
(d') the same with the compiled kernel (fused_compiled; logits_compiled for c), (e) Liger-Kernel's
LigerFusedLinearJSDLoss with beta=0 (forward KL), and ours (c, d) at TP=2 per rank on 2 gloo processes.
Objective everywhere: mean over tokens of KL(p_T || q_S) at tau = 1 from student hidden [T, d] x head [V, d] and
teacher hidden [T, d] x head [V, d] (lambda = 1; z-loss 0 because Liger has none), fp32 (--dtype bf16: bf16 inputs,
logits computed from them, losses in fp32).

loss_kernel_check(device, tokens) (importable; --kernel-check here) times naive vs single-pass eager vs single-pass
compiled (and Liger on CUDA when importable) for the fused-linear form: on CUDA in this process (bf16, d 2048,
vocab 32768, torch.cuda peak memory above the inputs), on CPU through the subprocess cases above (small shapes).

Memory: the kernel's high-water mark of the process's resident set (VmHWM), reset through /proc/self/clear_refs
right before the measured iterations, minus the resident set at that moment (inputs and warm-up already in place).
The workers run with MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB so every tensor buffer is its own mmap that is
returned to the kernel on free: the resident set then tracks live tensor memory instead of glibc's cached heap.
Time: wall clock of the fastest measured iteration after one warm-up (which also absorbs Liger's torch.compile):
on a shared machine the fastest run is the least disturbed one; all runs are listed, with the process CPU time
(all threads; less sensitive to other jobs) of the fastest.

Usage: python tools/bench_loss.py [--tokens 2048 8192] [--iters 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time

CASES = ["naive", "autograd", "logits", "fused", "liger", "tp2_logits", "tp2_fused", "fused_compiled",
         "logits_compiled"]
DEFAULT_CASES = CASES[:7]


# ------------------------------------------------------------------------------------------------ measurement

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status")


def _reset_peak() -> int:
    """Trim the heap, reset the high-water mark to the current resident set and return it (KiB)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def _measure(step, iters: int) -> dict:
    step()  # warm-up: allocator, thread pools, Liger's torch.compile
    base = _reset_peak()
    times, cpu, loss = [], [], None
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = _status_kib("VmHWM") - base
    return {"peak_mib": round(peak / 1024, 1), "time_s": round(min(times), 3),
            "times_s": [round(t, 3) for t in times], "cpu_s": round(min(cpu), 3), "loss": loss}


# ------------------------------------------------------------------------------------------------------ cases

def _make_step(case: str, n_tok: int, hidden: int, vocab: int, chunk, group=None, rank=0, world=1,
               device="cpu", dtype="fp32", z_loss: float = 0.0):
    """Inputs on `device` in `dtype` and one forward + backward of `case`; chunk None = each loss's own default."""
    import torch
    import torch.nn.functional as F
    from megadistill.parallel.fused_loss import fused_linear_distill_loss, logits_distill_loss
    from megadistill.parallel.vocab_parallel import vocab_parallel_kl_div

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n_tok, hidden, generator=g).to(device, dt).requires_grad_(True)
    h_t = torch.randn(n_tok, hidden, generator=g).to(device, dt)
    w_full = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 4.0  # logits of std ~4
    w_t_full = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 4.0
    y = torch.randint(0, vocab, (n_tok,), generator=g).to(device)
    cols = slice(rank * vocab // world, (rank + 1) * vocab // world)
    w = w_full[cols].to(device, dt).requires_grad_(True)  # this rank's head shard
    w_t = w_t_full[cols].to(device, dt)
    del w_full, w_t_full
    kernel = "compiled" if case.endswith("_compiled") else "eager"
    case = case[:-len("_compiled")] if case.endswith("_compiled") else case
    liger = None
    if case == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0,
                                        **({} if chunk is None else {"chunk_size": chunk}))

    def step():
        h.grad = w.grad = None
        if case == "naive":
            z = (h @ w.t()).float()  # [T, V]
            with torch.no_grad():
                z_t = (h_t @ w_t.t()).float()
            loss = F.kl_div(F.log_softmax(z, -1), F.log_softmax(z_t, -1), log_target=True, reduction="sum") / n_tok
            if z_loss:
                loss = loss + z_loss * (torch.logsumexp(z, -1) ** 2).mean()
        elif case == "autograd":
            with torch.no_grad():
                z_t = h_t @ w_t.t()  # [T, V/tp]
            loss = vocab_parallel_kl_div(h @ w.t(), z_t, group).sum() / n_tok
            del z_t
        elif case == "logits":
            with torch.no_grad():
                z_t = h_t @ w_t.t()  # [T, V/tp], consumed as scratch
            loss, _ = logits_distill_loss(h @ w.t(), z_t, y, group, kd_weight=1.0, temperature=1.0, z_loss=z_loss,
                                          chunk_tokens=chunk, inplace=True, loss_kernel=kernel)
            del z_t
        elif case == "fused":
            loss, _ = fused_linear_distill_loss(h, w, h_t, w_t, y, group, kd_weight=1.0, temperature=1.0,
                                                z_loss=z_loss, chunk_tokens=chunk, loss_kernel=kernel)
        else:
            loss = liger(h, w, h_t, w_t, y)
        loss.backward()
        if world > 1:  # the caller's copy_to_tp_region backward: complete the hidden-state gradient
            torch.distributed.all_reduce(h.grad, group=group)
        return float(loss.detach())

    return step


def _tp_rank(rank, world, port, args, queue):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        step = _make_step(args.case[len("tp2_"):], args.tokens[0], args.hidden, args.vocab, args.chunk,
                          dist.group.WORLD, rank, world, dtype=args.dtype)
        dist.barrier()
        queue.put((rank, _measure(step, args.iters)))
    except BaseException as e:  # report instead of leaving the parent waiting on the queue
        queue.put((rank, {"error": repr(e)}))
        raise
    finally:
        dist.destroy_process_group()


def worker(args) -> dict:
    """Run one case in this (fresh) process; TP cases spawn their ranks from here."""
    import torch
    if not args.case.startswith("tp2_"):
        torch.set_num_threads(args.threads)
        if args.case == "liger":
            try:
                import liger_kernel.chunked_loss  # noqa: F401
            except ImportError as e:
                return {"skipped": f"liger-kernel not importable: {e}"}
        return _measure(_make_step(args.case, args.tokens[0], args.hidden, args.vocab, args.chunk, dtype=args.dtype),
                        args.iters)
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_tp_rank, args=(r, 2, port, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    per_rank = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    ranks = [per_rank[r] for r in sorted(per_rank)]
    if any("error" in r for r in ranks):
        return {"error": [r.get("error") for r in ranks]}
    return {"peak_mib": max(r["peak_mib"] for r in ranks), "time_s": max(r["time_s"] for r in ranks),
            "cpu_s": max(r["cpu_s"] for r in ranks), "loss": ranks[0]["loss"], "per_rank": ranks}


# ----------------------------------------------------------------------------------------------------- driver

def run_case(case: str, n_tok: int, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--case", case, "--tokens", str(n_tok),
           "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--chunk", str(args.chunk),
           "--iters", str(args.iters), "--threads", str(args.threads), "--dtype", args.dtype]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-800:]}
    res = json.loads(lines[-1][len("RESULT "):])
    print(f"[bench_loss] T={n_tok} {case}: {res} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    return res


def _goals(r: dict) -> dict:
    a, c, d = r.get("naive", {}), r.get("fused", {}), r.get("liger", {})
    if "peak_mib" not in a or "peak_mib" not in c:
        return {"note": "naive or fused case failed"}
    out = {"fused_peak_over_naive": round(c["peak_mib"] / a["peak_mib"], 3),
           "fused_time_over_naive": round(c["time_s"] / a["time_s"], 3)}
    for case in ("autograd", "logits", "fused_compiled", "logits_compiled"):
        if "peak_mib" in r.get(case, {}):
            out[f"{case}_peak_over_naive"] = round(r[case]["peak_mib"] / a["peak_mib"], 3)
            out[f"{case}_time_over_naive"] = round(r[case]["time_s"] / a["time_s"], 3)
    out["peak_le_0.3x_naive"] = out["fused_peak_over_naive"] <= 0.3
    out["time_le_1.2x_naive"] = out["fused_time_over_naive"] <= 1.2
    if "peak_mib" in d:
        out["fused_peak_over_liger"] = round(c["peak_mib"] / d["peak_mib"], 3)
        out["fused_time_over_liger"] = round(c["time_s"] / d["time_s"], 3)
        out["peak_le_liger"] = c["peak_mib"] <= d["peak_mib"]
        out["time_le_1.0x_liger"] = out["fused_time_over_liger"] <= 1.0
    return out


# ------------------------------------------------------------------------------------- loss kernel check

def _cuda_case(case: str, n_tok: int, d: int, vocab: int, dtype: str, z_loss: float, repeats: int) -> dict:
    import statistics

    import torch
    if case == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except ImportError as e:
            return {"skipped": f"liger-kernel not importable: {e}"}
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    step = _make_step(case, n_tok, d, vocab, None, device="cuda", dtype=dtype, z_loss=z_loss)
    inputs = torch.cuda.memory_allocated() - base
    loss = step()  # warm-up: torch.compile, cuBLAS heuristics, the caching allocator
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = step()  # float(loss) synchronises
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - start
    del step
    return {"ms": round(1e3 * statistics.median(times), 2), "ms_all": [round(1e3 * t, 2) for t in times],
            "peak_gib": round(peak / 2 ** 30, 3), "inputs_gib": round(inputs / 2 ** 30, 3), "loss": loss}


def chunk_kernel_check(device: str = "cpu", dtypes=("fp32", "bf16"), chunk: int = 1024, vocab: int = 32768,
                       repeats: int = 5) -> dict:
    """The per-chunk kernel alone (no GEMMs): eager _chunk (fp32 copies of the logits, as its callers make them) vs
    chunk_compiled on the same [chunk, vocab] student / teacher logits, KD tau=1 + z-loss with the gradient; best ms."""
    import torch
    from megadistill.parallel.fused_loss import _chunk, _options, _row_weights
    from megadistill.parallel.loss_kernel import chunk_compiled
    cuda = device == "cuda"

    def best(fn):
        fn()
        ts = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return round(1e3 * min(ts), 2)

    g = torch.Generator().manual_seed(0)
    z0, t0 = (torch.randn(chunk, vocab, generator=g) * 4 for _ in range(2))
    y = torch.randint(0, vocab, (chunk,), generator=g).to(device)
    row_w = _row_weights(y)
    out = {"chunk": chunk, "vocab": vocab}
    for name in dtypes:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        z, t = z0.to(device, dt), t0.to(device, dt)
        o = _options(None, 1.0, 1.0, 1e-4, None, None, False, chunk, 256, "compiled", vocab, dt, device, chunk)
        e = best(lambda: _chunk(z.float().clone() if dt == torch.float32 else z.float(),
                                t.float().clone() if dt == torch.float32 else t.float(), y, row_w, o, True))
        c = best(lambda: chunk_compiled(z, t, y, row_w, o, True, True, dt))
        out[name] = {"eager_ms": e, "compiled_ms": c, "compiled_over_eager": round(c / e, 3)}
    return out


def loss_kernel_check(device: str = "cuda", tokens=(8192, 16384, 32768), d: int = 2048, vocab: int = 32768,
                      dtype: str = "bf16", z_loss: float = 1e-4, repeats: int = 5, threads: int = 2,
                      chunk: int = 1024, chunk_kernel: bool = True) -> dict:
    """Naive vs single-pass eager vs single-pass compiled (vs Liger on CUDA, when importable) for the fused-linear
    distillation loss (KL at tau = 1, lambda = 1, plus z_loss: Liger has none and runs without), forward + backward.

    CUDA: in this process, median ms over `repeats` after a warm-up, peak torch.cuda memory above the persistent state
    (inputs, parameter grads of the previous step); each loss picks its own chunk (eager 1024, compiled from memory).
    CPU: each case in a fresh subprocess (see the module doc: fastest time, RSS peak), at `chunk` tokens, z-loss 0.
    chunk_kernel adds chunk_kernel_check (the per-chunk kernel alone, fp32 and bf16, in this process).
    Returns {"results": {tokens: {case: {...}}}, "ratios": {tokens: {...}}, "chunk_kernel": {...}}; ratios < 1 are
    better than naive."""
    cases = ["naive", "fused", "fused_compiled"] + (["liger"] if device == "cuda" else [])
    out = {"device": device, "d": d, "vocab": vocab, "dtype": dtype, "results": {}, "ratios": {}}
    if device == "cuda":
        import torch
        out["gpu"] = torch.cuda.get_device_name()
        out["z_loss"] = z_loss
        for n in tokens:
            out["results"][str(n)] = {c: _cuda_case(c, n, d, vocab, dtype, z_loss, repeats) for c in cases}
        key_t, key_m = "ms", "peak_gib"
    else:
        args = argparse.Namespace(hidden=d, vocab=vocab, chunk=chunk, iters=repeats, threads=threads, dtype=dtype,
                                  timeout=1800.0)
        out["z_loss"] = 0.0
        for n in tokens:
            out["results"][str(n)] = {c: run_case(c, n, args) for c in cases}
        key_t, key_m = "time_s", "peak_mib"
    for n, r in out["results"].items():
        a = r["naive"]
        rat = {}
        for c in cases[1:]:
            if key_t in r[c] and key_t in a:
                rat[f"{c}_time_over_naive"] = round(r[c][key_t] / a[key_t], 3)
                rat[f"{c}_peak_over_naive"] = round(r[c][key_m] / max(a[key_m], 1e-9), 3)
        if key_t in r["fused"] and key_t in r["fused_compiled"]:
            rat["compiled_time_over_eager"] = round(r["fused_compiled"][key_t] / r["fused"][key_t], 3)
        rat["compiled_no_slower_than_naive"] = rat.get("fused_compiled_time_over_naive", 9.9) <= 1.0
        out["ratios"][n] = rat
    if chunk_kernel:
        out["chunk_kernel"] = chunk_kernel_check(device, chunk=chunk if device != "cuda" else 2048, vocab=vocab)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="token counts (default 2048 8192; --kernel-check: 8192 16384 32768 on CUDA, 1024 4096 CPU)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default 512; --kernel-check on CUDA 2048)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=1024, help="token chunk of the fused losses (ours and Liger's)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="inputs' dtype (default fp32; --kernel-check on CUDA bf16)")
    ap.add_argument("--iters", type=int, default=3, help="measured iterations per case (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per case (split across TP ranks)")
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=CASES)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    ap.add_argument("--kernel-check", action="store_true",
                    help="naive vs single-pass eager vs compiled (and Liger on CUDA): loss_kernel_check")
    ap.add_argument("--no-chunk-kernel", action="store_true", help="--kernel-check without chunk_kernel_check")
    ap.add_argument("--device", default=None, help="--kernel-check device (default cuda if available, else cpu)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kernel_check:
        import torch
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = device == "cuda"
        report = loss_kernel_check(device, tuple(args.tokens or ((8192, 16384, 32768) if cuda else (1024, 4096))),
                                   d=args.hidden or (2048 if cuda else 256), vocab=args.vocab,
                                   dtype=args.dtype or ("bf16" if cuda else "fp32"), repeats=args.iters,
                                   threads=args.threads, chunk=args.chunk, chunk_kernel=not args.no_chunk_kernel)
        report.update(bench="loss_kernel", torch=torch.__version__, cpus=os.cpu_count(),
                      cpu=platform.processor() or platform.machine())
        print(json.dumps(report))
        return 0
    args.tokens = args.tokens or [2048, 8192]
    args.hidden = args.hidden or 512
    args.dtype = args.dtype or "fp32"
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    import torch
    results = {str(t): {c: run_case(c, t, args) for c in args.cases} for t in args.tokens}
    report = {
        "bench": "loss", "objective": f"mean_t KL(p_T || q_S), tau=1, lambda=1, z_loss=0; forward + backward, "
                                      f"{args.dtype}",
        "hidden": args.hidden, "vocab": args.vocab, "chunk_tokens": args.chunk, "iters": args.iters,
        "threads": args.threads, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory": "peak RSS increase over the measured iterations (VmHWM after clear_refs, mmap-only allocator)",
        "note": "CPU timings on a machine shared with other jobs: noisy; tp2_* report the max over the 2 ranks "
                "(1 thread each), including the all-reduce of the hidden-state gradient; liger runs with its default "
                "compiled=True (torch.compile on CPU), compilation absorbed by the warm-up iteration",
        "results": results,
        "goals": {t: _goals(r) for t, r in results.items()},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
