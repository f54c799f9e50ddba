"""Runs a function on N local gloo processes and re-raises the first worker failure in the test.

Workers are forked from a forkserver that has imported torch, DeepSpeed and the trainer once per test process: a
spawned worker spends ~6 s of CPU importing them (measured: a 2-process run of an import-only function took 6.6 s
spawned, 0.1 s forked from the preloaded server). The server only imports (no tensor math, so no OpenMP pool is
forked). Each worker takes the caller's current environment and working directory, as a spawned one would.
"""
import os
import pickle
import socket
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# imported once by the forkserver; a module missing here is imported by the worker instead (ImportError is ignored)
PRELOAD = ["torch", "torch.distributed", "deepspeed", "megadistill.train.trainer"]


def _context():
    if "forkserver" not in mp.get_all_start_methods():  # e.g. Windows: fresh interpreters, as before
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts: the first run_distributed
    return ctx


def _worker(rank, world_size, port, fn, args, queue, env):
    os.environ.clear()  # the caller's environment at this call (a forked worker would have the server's)
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecations inside DeepSpeed's collectives
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # by value: the queue's own pickler would hand tensors over as file descriptors this process must outlive
        # (the parent's unpickling then races the worker's exit: FileNotFoundError under load)
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0):
    """Run fn(rank, world_size, *args) on `world_size` gloo processes; return the list of results by rank.

    fn must be a module-level function (it is pickled to the workers, forked or spawned).
    """
    ctx = _context()
    queue = ctx.SimpleQueue()
    port = free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, env)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in range(world_size):
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"--- rank {rank} ---\n{payload}")
            break
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
