"""End-to-end trainer tests on gloo: teacher pretrain, distillation at several TP x DP x ZeRO layouts, resume."""
import json
import math
from pathlib import Path

import pytest
import torch

from dist_harness import run_distributed
from tiny_runs import tiny_overrides

pytestmark = pytest.mark.multiproc

STEPS = 6
# Layout agreement: fp32, same global batch and seed; reduction order differs across layouts (TP all-reduces, ZeRO
# bucketed reductions), so curves agree to round-off, not bit-for-bit. Measured: at most 1e-6 apart over 6 steps.
CURVE_ATOL = 2e-5
BIAS = ["model.qk_norm=false", "model.qkv_bias=true"]  # a Qwen2-shaped student
MQA = ["model.n_kv_heads=1", *BIAS]  # one key/value head: replicated over TP=2, its biases too
MOE = ["model.moe_experts=4", "model.moe_top_k=2", "model.d_ff=64", "model.moe_shared_ff=64",
       "train.moe_router_z_loss=0.01"]  # a mixture (with a shared expert, as Qwen2-MoE; and the router z-loss)
NEOX = [*BIAS, "model.norm_type=layer", "model.ffn_gated=false", "model.activation=gelu", "model.o_bias=true",
        "model.ffn_bias=true", "model.parallel_residual=true", "model.rope_fraction=0.25"]  # a Pythia-shaped student




def _load(overrides):
    from megadistill import config
    return config.load([], overrides)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(Path(run_dir) / "train.jsonl")]


def _check_teacher_frozen(objs):
    teacher = objs["teacher"]
    assert teacher is not None
    for p in teacher.module.parameters():
        assert not p.requires_grad and p.grad is None
    opt_params = {id(p) for g in objs["engine"].optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in teacher.module.parameters())
    # ZeRO wraps the torch optimizer: its inner state must only hold student (flattened) partitions
    inner = getattr(objs["engine"].optimizer, "optimizer", objs["engine"].optimizer)
    n_teacher = sum(p.numel() for p in teacher.module.parameters())
    n_state = sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)
    n_student = sum(getattr(p, "ds_numel", p.numel()) for p in objs["student"].parameters())  # ZeRO-3: ds_numel
    assert n_teacher > 0 and 0 < n_state <= n_student, (n_state, n_student, type(inner))
    # TP > 1 with teacher_prefetch (the default): the teacher's TP layers use a process group of their own over the
    # same ranks (its collectives never queue behind the student's); the student's layers use tp_group
    groups = objs["groups"]
    teacher_groups = {id(m.group) for m in teacher.module.modules() if getattr(m, "group", None) is not None}
    student_groups = {id(m.group) for m in objs["student"].modules() if getattr(m, "group", None) is not None}
    if groups.tp_size > 1:
        import torch.distributed as dist
        assert groups.teacher_tp_group is not None and groups.teacher_tp_group is not groups.tp_group
        assert teacher_groups == {id(groups.teacher_tp_group)} and student_groups == {id(groups.tp_group)}
        assert dist.get_process_group_ranks(groups.teacher_tp_group) == list(groups.tp_ranks)
    else:
        assert groups.teacher_tp_group is None


def _two_proc(rank, world, root):
    from megadistill.train.trainer import train
    root = Path(root)
    out = {}
    # 1) teacher: 3x wider than the student, trained longer so it is a real teacher; its loss must fall
    t_over = tiny_overrides(root / "teacher", "supervised", ["train.steps=30", "model.d_model=96", "model.n_heads=6",
                                                         "zero.stage=1", "parallel.tp_size=2"])
    train(_load(t_over))
    out["teacher_losses"] = _losses(root / "teacher")
    # 2) distillation at TP=1/DP=2 with ZeRO 1, 2, 3 and TP=2/DP=1; the teacher is loaded into each layout
    for name, extra in {"tp1_z1": ["zero.stage=1"], "tp1_z2": ["zero.stage=2"], "tp1_z3": ["zero.stage=3"],
                        "tp1_z2_offload": ["zero.stage=2", "zero.offload_optimizer=cpu"],
                        "tp2_z1": ["zero.stage=1", "parallel.tp_size=2"],
                        # sequence parallelism on the fused path: hidden states gathered from the sequence slices
                        "tp2_z0_fused_sp": ["zero.stage=0", "parallel.tp_size=2", "distill.fused=true",
                                            "distill.chunk_tokens=24", "parallel.sequence_parallel=true"],
                        # a Qwen2-shaped student (Q/K/V biases, no QK-norm): the reference of tp2dp2_z3_sp_bias
                        "tp1_z1_bias": ["zero.stage=1", *BIAS],
                        "tp1_z1_mqa": ["zero.stage=1", *MQA],  # the reference of tp2dp2_z3_sp_mqa
                        "tp1_z1_neox": ["zero.stage=1", *NEOX],
                        # a mixture of experts under DP=2 ZeRO-2 and -3 and TP=2 ZeRO-1 (its router's grads summed
                        # over TP; under ZeRO-3 its stacked experts partitioned and gathered for Experts.forward)
                        "tp1_z2_moe": ["zero.stage=2", *MOE], "tp1_z3_moe": ["zero.stage=3", *MOE],
                        "tp2_z1_moe": ["zero.stage=1", "parallel.tp_size=2", *MOE]}.items():
        d_over = tiny_overrides(root / name, "distill", [f"train.steps={STEPS}", f"distill.teacher={root / 'teacher'}"]
                            + extra)
        train(_load(d_over), inspect=_check_teacher_frozen)
        out[name] = _losses(root / name)
        if name.endswith("_moe"):  # the routers' balance and z-losses, logged per step (in the loss x 0.01 each)
            lines = [json.loads(line) for line in open(root / name / "train.jsonl")]
            out[name + "_aux"] = [[x["moe_aux"], x["moe_z"]] for x in lines]
    # 3) resume: stop after 3 steps (checkpoint), resume, and compare with the uninterrupted tp1_z2 run
    r_over = tiny_overrides(root / "resumed", "distill", [f"train.steps={STEPS}", f"distill.teacher={root / 'teacher'}",
                                                      "zero.stage=2"])
    first = train(_load(r_over + ["train.stop_after_steps=3"]))
    assert first.status == "stopped" and first.step == 3
    second = train(_load(r_over + ["train.resume=true"]))
    assert second.status == "finished" and second.step == STEPS
    out["resumed"] = _losses(root / "resumed")
    return out


def _four_proc(rank, world, root):
    from megadistill.train.trainer import train
    root = Path(root)
    out = {}
    for stage in (1, 2, 3):
        sp = stage == 2  # ZeRO-2 x TP=2 with the student and the teacher sequence-parallel
        name = f"tp2dp2_z{stage}" + ("_sp" if sp else "")
        over = tiny_overrides(root / name, "distill", [f"train.steps={STEPS}", f"distill.teacher={root / 'teacher'}",
                                                   f"zero.stage={stage}", "parallel.tp_size=2",
                                                   f"parallel.sequence_parallel={str(sp).lower()}",
                                                   # 5 eval windows -> 3 batches on 2 DP ranks: uneven shares must
                                                   # not hang ZeRO-3's per-forward all-gathers
                                                   "train.eval_tokens=160", "train.eval_interval=3"])
        train(_load(over), inspect=_check_teacher_frozen)
        out[name] = _losses(root / name)
    # the Qwen2-shaped student under ZeRO-3 x TP=2 with sequence parallelism: its Q/K/V biases are split over TP,
    # partitioned over DP and gathered for the Q/K/V entry as registered external parameters
    over = tiny_overrides(root / "tp2dp2_z3_sp_bias", "distill", [
        f"train.steps={STEPS}", f"distill.teacher={root / 'teacher'}", "zero.stage=3", "parallel.tp_size=2",
        "parallel.sequence_parallel=true", *BIAS])
    train(_load(over))
    out["tp2dp2_z3_sp_bias"] = _losses(root / "tp2dp2_z3_sp_bias")
    # the same with one key/value head for the two TP ranks: K / V replicated, their grads summed over TP, and
    # partitioned over DP by ZeRO-3
    over = tiny_overrides(root / "tp2dp2_z3_sp_mqa", "distill", [
        f"train.steps={STEPS}", f"distill.teacher={root / 'teacher'}", "zero.stage=3", "parallel.tp_size=2",
        "parallel.sequence_parallel=true", *MQA])
    train(_load(over))
    out["tp2dp2_z3_sp_mqa"] = _losses(root / "tp2dp2_z3_sp_mqa")
    # Pythia's block: LayerNorm gains and biases and the O / MLP-output biases replicated (their grads summed over TP
    # under SP), partitioned over DP
    over = tiny_overrides(root / "tp2dp2_z3_sp_neox", "distill", [
        f"train.steps={STEPS}", f"distill.teacher={root / 'teacher'}", "zero.stage=3", "parallel.tp_size=2",
        "parallel.sequence_parallel=true", *NEOX])
    train(_load(over))
    out["tp2dp2_z3_sp_neox"] = _losses(root / "tp2dp2_z3_sp_neox")
    over = tiny_overrides(root / "tp2dp2_teacher_z3", "distill", [
        f"train.steps={STEPS}", f"distill.teacher={root / 'teacher'}", "zero.stage=1", "parallel.tp_size=2",
        "distill.teacher_zero3=true"])
    train(_load(over))
    out["tp2dp2_teacher_z3"] = _losses(root / "tp2dp2_teacher_z3")
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    two = run_distributed(_two_proc, 2, str(root), timeout=900)[0]
    four = run_distributed(_four_proc, 4, str(root), timeout=900)[0]
    return root, {**two, **four}


def test_teacher_loss_falls(study):
    _, res = study
    losses = res["teacher_losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.3, losses


def test_layouts_agree(study):
    _, res = study
    ref = torch.tensor(res["tp1_z1"])
    assert len(ref) == STEPS and all(math.isfinite(x) for x in ref)
    for name in ("tp1_z2", "tp1_z3", "tp1_z2_offload", "tp2_z1", "tp2_z0_fused_sp", "tp2dp2_z1", "tp2dp2_z2_sp",
                 "tp2dp2_z3",
                 "tp2dp2_teacher_z3"):
        torch.testing.assert_close(torch.tensor(res[name]), ref, atol=CURVE_ATOL, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {res[name]} vs {res['tp1_z1']}\n{m}")


@pytest.mark.parametrize("kind", ["bias", "mqa", "neox"])
def test_qkv_bias_layouts_agree(study, kind):
    """The Qwen2-shaped student (its one-key/value-head form, a Pythia-shaped one): TP=2 x DP=2 ZeRO-3 + SP gives
    TP=1 ZeRO-1's curve, and its consolidated weights (biases gathered over TP from their ZeRO-3 partitions; the
    replicated K / V, O / MLP-output biases and LayerNorm biases taken from TP rank 0) equal that run's."""
    from safetensors.torch import load_file
    root, res = study
    ref = torch.tensor(res[f"tp1_z1_{kind}"])
    assert len(ref) == STEPS and all(math.isfinite(x) for x in ref)
    assert res[f"tp1_z1_{kind}"] != res["tp1_z1"]  # another model (no QK-norm; biases that train)
    torch.testing.assert_close(torch.tensor(res[f"tp2dp2_z3_sp_{kind}"]), ref, atol=CURVE_ATOL, rtol=0)
    a, b = (load_file(str(root / name / "model" / "model.safetensors"))
            for name in (f"tp1_z1_{kind}", f"tp2dp2_z3_sp_{kind}"))
    kv_rows = 16 * (1 if kind == "mqa" else 4)
    assert a["blocks.0.attn.wk.weight"].shape == b["blocks.0.attn.wk.weight"].shape == (kv_rows, 64)
    assert a.keys() == b.keys() and "blocks.0.attn.wk.bias" in a
    assert float(a["blocks.0.attn.wk.bias"].abs().min()) > 0  # trained away from their zero init
    if kind == "neox":  # and the Pythia block's other biases
        assert all(float(a[f"blocks.1.{n}.bias"].abs().min()) > 0 for n in ("attn.wo", "ffn.w1", "ffn.w2", "attn_norm"))
    for k in a:
        x, y = b[k], a[k]
        if not k.endswith("wk.bias"):
            # Adam turns round-off in near-zero gradients into LR-sized steps of single entries, by an amount that
            # depends on the CPU's BLAS (within 1e-4 on Intel CPUs; 3.6e-4 on an AMD EPYC), so whole tensors are
            # compared: measured within 4.1e-5 in relative norm; two rows of w1 swapped (a layout bug) would be 0.13
            assert float((x - y).norm()) <= 1e-3 * float(y.norm()), (k, float((x - y).norm() / y.norm()))
            continue
        # K biases are ill-conditioned: a shift common to all keys cancels in the softmax, and under RoPE the slowly
        # rotating (low-frequency) components nearly do, so their gradients are round-off that Adam scales to
        # LR-sized steps (one process, 1e-6 relative gradient noise: 2e-4 apart). With RoPE on 4 of each head's 16
        # dims (neox) the other 12 are exactly shift-invariant (no gradient but round-off: measured 1e-3 apart, the
        # rotated 4 within 1e-6): only the rotated dims are compared
        if kind == "neox":
            x, y = x.view(4, 16)[:, :4], y.view(4, 16)[:, :4]
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3, msg=k)


def test_moe_layouts_agree(study):
    """A mixture-of-experts student (4 experts, top 2) trains under DP=2 ZeRO-2 and ZeRO-3 and TP=2 ZeRO-1 along one
    curve, its balance and z-losses too."""
    _, res = study
    ref = torch.tensor(res["tp1_z2_moe"])
    assert len(ref) == STEPS and all(math.isfinite(x) for x in ref) and res["tp1_z2_moe"] != res["tp1_z1"]
    assert float(ref[-1]) < float(ref[0])
    aux = torch.tensor(res["tp1_z2_moe_aux"])  # [steps, (balance, z-loss)]
    assert aux.shape == (STEPS, 2) and float(aux[:, 0].min()) > 2  # two blocks, each >= 1 unless anti-balanced
    assert float(aux[:, 1].min()) > 1  # near 2 (log 4)^2 = 3.8: small router logits, logsumexp near log E per block
    for name in ("tp2_z1_moe", "tp1_z3_moe"):
        torch.testing.assert_close(torch.tensor(res[name]), ref, atol=CURVE_ATOL, rtol=0, msg=name)
        torch.testing.assert_close(torch.tensor(res[name + "_aux"]), aux, atol=1e-4, rtol=0, msg=name)


def test_resume_equals_uninterrupted(study):
    _, res = study
    assert res["resumed"] == res["tp1_z2"]  # bit-for-bit on CPU


def test_run_dir_contents(study):
    from megadistill.laws.records import read_records, validate_record
    root, _ = study
    run = root / "tp2dp2_z3"
    for f in ("config.yaml", "eval.jsonl", "train.jsonl", "DONE", "model/model.safetensors", "model/config.yaml"):
        assert (run / f).exists(), f
    recs, bad = read_records(run / "eval.jsonl")
    assert bad == 0 and recs
    rec = recs[-1]
    assert not validate_record(rec)
    assert rec["mode"] == "distill" and rec["teacher"]["run"] == "teacher"
    assert rec["tokens"] == STEPS * 8 * 32 and rec["params"] > 0 and rec["flops"] > 0
    assert math.isfinite(rec["eval_loss"]) and math.isfinite(rec["teacher"]["eval_loss"])
    assert (root / "tp1_z1" / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
