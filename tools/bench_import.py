#!/usr/bin/env python
"""Time and peak RSS of building an hf: teacher from a random Qwen3-shaped bf16 checkpoint (made locally, sharded with
an index as HF writes it) at TP=1 in one process and TP=2 on two gloo processes; JSON.

Each rank reports its resident set before the load (python, torch, the meta-device model: the fixed overhead), its
peak after, and its bf16 shard bytes; goal: peak <= overhead + 1.3 x shard bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_checkpoint(folder: Path, d: int, layers: int, heads: int, kv: int, head_dim: int, ff: int, vocab: int,
                    shard_bytes: int) -> int:
    """Random bf16 tensors with Qwen3's names and config.json, in shards of ~shard_bytes; returns the param count."""
    from safetensors.torch import save_file

    from megadistill.hf.weights import write_json
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (heads * head_dim, d),
                       p + "self_attn.k_proj.weight": (kv * head_dim, d),
                       p + "self_attn.v_proj.weight": (kv * head_dim, d),
                       p + "self_attn.o_proj.weight": (d, heads * head_dim),
                       p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,),
                       p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                       p + "mlp.down_proj.weight": (d, ff)})
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, n_files, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n_files
        if shard:
            n_files += 1
            name = f"model-{n_files:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        total += t.numel()
        shard[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total * 2},
                                                          "weight_map": weight_map})
    write_json(folder / "config.json", {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": d, "intermediate_size": ff,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16", "max_position_embeddings": 4096})
    return total


def _load_rank(rank: int, world: int, folder: str, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megadistill import config
    from megadistill.parallel.groups import ParallelGroups
    from megadistill.train.teacher import load_teacher, teacher_source
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        groups = ParallelGroups.build(world)
    else:
        groups = ParallelGroups.single()
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    cfg = config.load([], ["train.mode=distill", "train.steps=1", f"distill.teacher=hf:{folder}",
                           "distill.teacher_dtype=bf16", f"model.vocab_size={vocab}", f"parallel.tp_size={world}",
                           "data.synthetic_branching=4"], world_size=world)
    src = teacher_source(cfg)
    torch.nn.Linear(2, 2, device="meta").to_empty(device="cpu")  # torch's lazy imports (sympy) count as overhead
    before = _rss_mib()
    t0 = time.perf_counter()
    teacher = load_teacher(cfg, groups, torch.device("cpu"), src)
    seconds = time.perf_counter() - t0
    shard = sum(p.numel() * p.element_size() for p in teacher.module.parameters())
    queue.put({"rank": rank, "seconds": round(seconds, 2), "rss_before_mib": round(before, 1),
               "peak_rss_mib": round(_peak_mib(), 1), "shard_bytes": shard, "shard_mib": round(shard / 2**20, 1)})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure(folder: Path, world: int):
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from dist_harness import free_port
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_load_rank, args=(r, world, str(folder), port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = sorted((queue.get() for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a loader process exited with {p.exitcode}")
    for r in out:
        r["overhead_plus_1p3_shard_mib"] = round(r["rss_before_mib"] + 1.3 * r["shard_bytes"] / 2**20, 1)
        r["goal_peak_within"] = r["peak_rss_mib"] <= r["overhead_plus_1p3_shard_mib"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=6144)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--shard-mib", type=int, default=512, help="size of each checkpoint file")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir, removed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp) / "qwen3-random"
        t0 = time.perf_counter()
        n = make_checkpoint(folder, args.d_model, args.layers, args.heads, args.kv_heads, args.head_dim, args.ffn,
                            args.vocab, args.shard_mib << 20)
        made = time.perf_counter() - t0
        result = {"params": n, "checkpoint_mib": round(2 * n / 2**20, 1),
                  "files": len(list(folder.glob("*.safetensors"))), "make_s": round(made, 1),
                  "tp1": measure(folder, 1), "tp2": measure(folder, 2)}
    result["goal_met"] = all(r["goal_peak_within"] for r in result["tp1"] + result["tp2"])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
