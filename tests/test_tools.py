"""Smoke tests of the benchmark tools at tiny shapes, so they keep running against the code they measure."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = proc.stdout.index("{")  # DeepSpeed may print before the JSON
    return json.loads(proc.stdout[start:])


def test_bench_train_tiny():
    r = _run("tools/bench_train.py", "--d-model", "32", "--layers", "1", "--heads", "2", "--teacher-d-model", "48",
             "--teacher-layers", "1", "--vocab", "128", "--seq-len", "32", "--batch", "2", "--steps", "2",
             "--threads", "1", "--compile", "--compile-backend", "aot_eager")
    for k in ("supervised_step_s", "distill_step_s", "teacher_forward_s", "hf_llama_step_s", "ours_model_only_step_s",
              "supervised_compiled_step_s", "compile_first_step_s"):
        assert r[k] > 0, (k, r)
    assert r["compile_backend"] == "aot_eager" and r["compiled_speedup_over_eager"] > 0
    assert r["tokens_per_step"] == 64 and r["teacher_params"] > r["student_params"]
    assert isinstance(r["goal_supervised_at_least_hf_speed"], bool)


def test_gpu_check_tiny_runs_the_trainer_path(tmp_path):
    """tools/gpu_check.py --tiny on CPU: random teachers written (bf16) and loaded, supervised and distill runs of
    the matrix through the real trainer, the per-run figures and the distill-overhead table; --out holds the same
    report (rewritten after each run, no temp file left)."""
    out = tmp_path / "gpu.json"
    r = _run("tools/gpu_check.py", "--tiny", "--variants", "eager", "--runs", "supervised_546M,distill_546M_from_1.82B",
             "--steps", "4", "--profile", "supervised_546M@eager", "--out", str(out), timeout=600)
    assert json.loads(out.read_text()) == r and r["complete"] and os.listdir(tmp_path) == ["gpu.json"]
    assert r["device"] == "cpu" and r["tiny"] and set(r["runs"]) == {"supervised_546M@eager",
                                                                     "distill_546M_from_1.82B@eager"}
    for run in r["runs"].values():
        assert run["micro_batches_per_step"] == 4 and run["tokens_per_step"] == 4 * 2 * 128, run
        assert run["step_time_s"] > 0 and run["final_loss"] == run["final_loss"] and "error" not in run, run
    assert r["runs"]["distill_546M_from_1.82B@eager"]["size"] == "tiny-0.5M"
    prof = r["profile"]  # where the profiled step's time went: categories summing to the whole, top ops named
    assert prof["run"] == "supervised_546M@eager" and abs(sum(prof["shares"].values()) - 1) < 1e-3, prof
    assert prof["shares"].get("matmul", 0) > 0 and prof["top"] and prof["busy_s_per_step"] > 0, prof
    g = r["goals"]  # read off the runs: no 975M run and no loss kernels here, the overhead ratio measured
    assert not g["mfu_975M_supervised_ge_0.45"]["measured"] and not g["fused_loss_no_slower_than_naive"]["measured"]
    assert g["distill_overhead_le_1.10"]["measured"] and "distill_546M_from_1.82B@eager" in g[
        "distill_overhead_le_1.10"]["ratios"], g
    kd = r["distill_overhead"]["distill_546M_from_1.82B@eager"]
    assert kd["teacher_forward_at_student_rate_s"] > 0 and "overhead_over_teacher_forward" in kd, kd


def test_bench_loss_tiny():
    r = _run("tools/bench_loss.py", "--tokens", "256", "--hidden", "32", "--vocab", "512", "--chunk", "64",
             "--iters", "1", "--threads", "1", "--cases", "naive", "autograd", "logits", "fused")
    res = r["results"]["256"]
    losses = [res[c]["loss"] for c in ("naive", "autograd", "logits", "fused")]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0]), res  # the same objective in every form
    assert "logits_peak_over_naive" in r["goals"]["256"]


def test_bench_import_tiny():
    r = _run("tools/bench_import.py", "--d-model", "64", "--layers", "1", "--heads", "4", "--kv-heads", "2",
             "--head-dim", "16", "--ffn", "96", "--vocab", "256", "--shard-mib", "1")
    assert r["files"] >= 1 and r["params"] > 0
    assert len(r["tp1"]) == 1 and len(r["tp2"]) == 2
    # each TP=2 rank holds about half the weights (norm gains are replicated)
    full = r["tp1"][0]["shard_bytes"]
    assert full == 2 * r["params"]  # bf16, nothing more
    assert all(0.45 * full <= x["shard_bytes"] <= 0.6 * full for x in r["tp2"])
    assert isinstance(r["goal_met"], bool)


def test_bench_moe_tiny():
    """Both paths run the same function (grouped GEMM vs the loop over experts, same routing); in bf16 too, and there
    the grouped path compiled (aot_eager: eager's aten ops through dynamo, the same numbers)."""
    for dtype in ("fp32", "bf16"):
        extra = ["--compile-backend", "aot_eager"] if dtype == "bf16" else []
        r = _run("tools/bench_moe.py", "--device", "cpu", "--dtype", dtype, "--tokens", "64", "--d", "32",
                 "--experts", "8", "--d-ff", "16", "--top-k", "2", "--iters", "1", *extra)
        assert r["grouped_err_vs_loop"] < (1e-6 if dtype == "fp32" else 1e-2), r
        assert r["grouped_ms"] > 0 and r["loop_ms"] > 0 and r["experts"] == 8 and r["dtype"].startswith(
            {"fp32": "float32", "bf16": "bfloat16"}[dtype])
        assert ("compiled_ms" in r) == bool(extra)
    assert r["compiled_err_vs_grouped"] == 0.0 and r["compiled_speedup_over_grouped"] > 0, r
    # torch._grouped_mm on this CPU: every group layout (aligned or not, empty groups) as the loop
    assert r["probe"] is True and set(r["group_layouts"]) == {"multiples_of_16", "multiples_of_8", "unaligned"}
    assert all(v["err"] < 1e-2 for v in r["group_layouts"].values()), r["group_layouts"]


def test_bench_cache_tiny():
    r = _run("tools/bench_cache.py", "--teacher", "48", "1", "2", "--student", "32", "1", "2", "--vocab", "128",
             "--students", "2", "--steps", "2", "--seq-len", "32", "--batch", "2", "--top-k", "16", "--threads", "1")
    assert r["online_students_s"] > 0 and r["cache_write_s"] > 0 and r["cached_students_s"] > 0
    assert r["bytes_per_token"] == 16 * 8 + 4 and r["cache_tokens"] == 2 * 2 * 32
    assert r["bytes_per_token"] <= r["bytes_per_token_on_disk"] < r["bytes_per_token"] + 8  # + the shard headers
    assert len(r["final_loss_cached"]) == 2 and r["student_params"][1] > r["student_params"][0]


def test_gpu_check_dry_run_validates_the_run_matrix():
    """Every trainer run of tools/gpu_check.py (sizes x compile x kernels, distill teachers) is a valid config."""
    r = _run("tools/gpu_check.py", "--dry-run", timeout=120)
    runs = {p["run"]: p for p in r["dry_run"]}
    for name in ("supervised_975M", "supervised_1.82B", "distill_546M_from_1.82B", "distill_975M_from_4.82B"):
        assert {f"{name}@compile", f"{name}@eager"} <= set(runs), sorted(runs)
    assert runs["supervised_975M@compile_liger"]["kernels"] == "liger"
    assert runs["supervised_975M@compile_docs_flex"]["attention"] == "flex"
    assert runs["supervised_975M@compile_docs"]["attention"] == "sdpa"
    assert runs["supervised_975M@eager"]["compile"] == "false" and runs["supervised_975M@compile"]["compile"] == "true"
    assert runs["distill_975M_from_4.82B@compile"]["teacher"] == "4.82B"
    # 4 x 4096-token micro-batches, 4 per optimizer step by default (the optimizer shared as in a sweep)
    assert all(p["tokens_per_step"] == 4 * 4096 * 4 and p["micro_batches_per_step"] == 4 for p in runs.values())


def test_gpu_check_goals_read_off_a_result():
    """The goal table gpu_check prints, from a result shaped like a GPU run's."""
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_check
    result = {"runs": {"supervised_975M@compile": {"mfu_paper_flops": 0.47},
                       "supervised_975M@eager": {"mfu_paper_flops": 0.31}, "supervised_975M@compile_liger": {},
                       # bf16 accumulation: timed, not the goal's (the default accumulates in fp32)
                       "supervised_975M@compile_bf16accum": {"mfu_paper_flops": 0.49},
                       # document-masked attention skips work F(N) counts: timed, not the goal's
                       "supervised_975M@compile_docs_flex": {"mfu_paper_flops": 0.52}},
              "distill_overhead": {"distill_546M_from_1.82B@compile": {"overhead_over_teacher_forward": 1.04},
                                   "distill_975M_from_4.82B@compile": {"skipped": "no supervised run"}},
              "loss_kernels": {"ratios": {"8192": {"fused_compiled_time_over_naive": 0.8},
                                          "32768": {"fused_compiled_time_over_naive": 1.2}}}}
    g = gpu_check.goals(result)
    assert g["compiled_block_matches_eager"] == {"measured": False, "met": False}
    assert gpu_check.goals({"compile": {"ok": True}})["compiled_block_matches_eager"]["met"]
    assert g["mfu_975M_supervised_ge_0.45"] == {"measured": True, "best_run": "supervised_975M@compile", "mfu": 0.47,
                                                "met": True}
    assert g["distill_overhead_le_1.10"]["met"] and list(g["distill_overhead_le_1.10"]["ratios"]) == [
        "distill_546M_from_1.82B@compile"]
    assert g["fused_loss_no_slower_than_naive"]["measured"] and not g["fused_loss_no_slower_than_naive"]["met"]


def test_gpu_check_noprefetch_variant_compares_with_the_compiled_supervised_run():
    """distill ...@compile_noprefetch (teacher in line, no side stream) is set against supervised ...@compile, and
    stays out of the overhead goal, which judges the default (prefetching) runs."""
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_check
    runs = {"supervised_546M@compile": {"step_time_s": 1.0},
            "distill_546M_from_1.82B@compile": {"step_time_s": 1.5, "size": "546M", "teacher_size": "1.82B"},
            "distill_546M_from_1.82B@compile_noprefetch": {"step_time_s": 1.8, "size": "546M", "teacher_size": "1.82B"}}
    over = gpu_check.distill_overheads(runs)
    on, off = over["distill_546M_from_1.82B@compile"], over["distill_546M_from_1.82B@compile_noprefetch"]
    assert on["teacher_forward_at_student_rate_s"] == off["teacher_forward_at_student_rate_s"] > 0
    assert abs(on["overhead_s"] - 0.5) < 1e-12 and abs(off["overhead_s"] - 0.8) < 1e-12
    g = gpu_check.goals({"runs": runs, "distill_overhead": over})["distill_overhead_le_1.10"]
    assert list(g["ratios"]) == ["distill_546M_from_1.82B@compile"]


def test_gpu_wheels_pins_are_the_tested_versions():
    """tools/gpu_wheels.sh pins each wheel it carries to a GPU machine; those pins are the versions this environment
    runs the suite with (and pydantic-core the one pydantic asks for), so the GPU check runs the code that was tested."""
    import importlib.metadata as md
    import re

    text = (REPO / "tools" / "gpu_wheels.sh").read_text()
    pins = dict(re.findall(r"([A-Za-z][\w.-]*)==([\w.]+)", " ".join(
        m for m in re.findall(r"^(?:PURE|BINARY|BUILT)=\(([^)]*)\)", text, flags=re.M | re.S))))
    assert {"deepspeed", "omegaconf", "pydantic", "pydantic-core", "hjson", "liger-kernel"} <= set(pins), pins
    for name, version in pins.items():
        assert md.version(name) == version, f"tools/gpu_wheels.sh pins {name}=={version}, tested {md.version(name)}"
    core = [r for r in md.requires("pydantic") if r.replace("_", "-").startswith("pydantic-core")]
    assert core and pins["pydantic-core"] in core[0], core
    assert not any(n for n in md.requires("omegaconf") or [] if "extra ==" not in n and
                   not n.lower().startswith(("pyyaml", "typing"))), "omegaconf needs a wheel the list lacks"
