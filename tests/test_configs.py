"""Every YAML under configs/ loads and validates as composed; paper configs follow the paper; config errors name keys."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from megadistill import config
from megadistill.config import ConfigError
from megadistill.errors import UserError
from megadistill.model.sizes import PAPER_SIZES, params_of

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PAPER = CONFIGS / "paper"
LAYOUT_WORLD = re.compile(r"-(\d+)gpu\.yaml$")


def _all_yaml():
    return sorted(p.relative_to(ROOT).as_posix() for p in CONFIGS.rglob("*.yaml"))


def _compose(rel: str):
    """(paths in load order, world size or None) for a config file, as its usage line composes it."""
    path = ROOT / rel
    if "/layouts/" in rel:
        line = next(ln for ln in path.read_text().splitlines() if ln.startswith("# compose:"))
        base = [str(ROOT / p) for p in line.split(":", 1)[1].split()]
        return base + [str(path)], int(LAYOUT_WORLD.search(rel).group(1))
    return [str(path)], None


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_paper_configs", ROOT / "tools" / "gen_paper_configs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("rel", _all_yaml())
def test_config_file_validates(rel, tmp_path):
    if rel.startswith("configs/sweeps/"):  # sweep specs, not trainer configs: expand them into validated configs
        sweep = pytest.importorskip("megadistill.laws.sweep")
        spec = sweep.load_sweep(ROOT / rel)
        lines = sweep.write_sweep(spec, tmp_path / "sweep")
        assert lines and all(Path(ln["config"]).is_file() for ln in lines)
        return
    paths, world = _compose(rel)
    cfg = config.load(paths, [], world_size=world)
    assert cfg.model.n_heads * cfg.model.head_dim == cfg.model.d_model
    if world:
        dp = world // cfg.parallel.tp_size
        assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp) == 0


def test_every_paper_size_has_a_teacher_config():
    files = {p.stem for p in (PAPER / "teacher").glob("*.yaml")}
    assert files == set(PAPER_SIZES) and len(files) == 33


def test_every_teacher_config_fits_one_node_by_the_planner():
    """The generated single-node layouts (tools/gen_paper_configs.py) fit 8 x 80 GiB by plan-memory's estimate."""
    from megadistill.train import memory
    for path in sorted((PAPER / "teacher").glob("*.yaml")):
        cfg = config.load([str(path)], [], world_size=8)
        lay = memory.Layout(tp_size=1, zero_stage=cfg.zero.stage, micro_batch_size=cfg.train.micro_batch_size,
                            checkpointing=cfg.model.activation_checkpointing)
        mem = memory.estimate_layout(cfg.model, lay, 8, cfg.train.seq_len, cfg.train.global_batch_size, "bf16")
        assert mem["total"] <= 80 * 2 ** 30, (path.name, lay.describe(), mem["total"] / 2 ** 30)


@pytest.mark.parametrize("size", ["103M", "975M", "2.72B", "12.6B"])
def test_teacher_config_is_the_papers_recipe(size):
    cfg = config.load([str(PAPER / "teacher" / f"{size}.yaml")], [], world_size=8)  # a single 8-GPU node
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    assert m.size == size and m.attention == "flash" and m.vocab_size == 32768 and m.d_model == 128 * m.n_layers
    assert (o.lr, o.weight_decay, o.warmup_steps, o.schedule, o.final_lr_ratio, o.grad_clip) == \
        (1e-2, 1e-4, 2000, "cosine", 1e-3, 1.0)
    assert (t.mode, t.seq_len, t.tokens_per_param, t.precision, t.z_loss, t.steps, t.tokens) == \
        ("supervised", 4096, 20, "bf16", 1e-4, 0, 0)
    assert (d.source, d.hf_name, d.hf_config, d.split) == ("hf", "allenai/c4", "en", "teacher")
    assert t.run_dir == f"runs/paper/teacher-{size}"
    from megadistill.train.trainer import total_steps
    n = params_of(m)[0]
    steps = total_steps(cfg)
    # D = 20 N within one step's tokens, and well past the 2000 warmup steps
    assert abs(steps * t.global_batch_size * t.seq_len - 20 * n) <= t.global_batch_size * t.seq_len / 2
    assert steps > 3 * o.warmup_steps


def test_distillation_recipes():
    kd = config.load([str(PAPER / "distill.yaml")])
    assert (kd.train.mode, kd.distill.kd_weight, kd.distill.temperature, kd.data.split) == ("distill", 1.0, 1.0,
                                                                                           "student")
    assert kd.distill.top_k is None and kd.distill.top_p is None and not kd.distill.reverse
    assert kd.train.seq_len == 4096 and kd.optim.lr == 1e-2 and kd.train.z_loss == 1e-4
    top = config.load([str(PAPER / "distill-topk128.yaml")])
    assert (top.distill.top_k, top.distill.kd_weight) == (128, 0.7)
    sup = config.load([str(PAPER / "supervised.yaml")])
    assert (sup.train.mode, sup.data.split, sup.model.size) == ("supervised", "student", kd.model.size)


def test_layouts_cover_8_64_512_gpus():
    from megadistill.train.engine import deepspeed_config
    names = {p.name for p in (PAPER / "layouts").glob("*.yaml")}
    for kind in ("teacher-12.6B", "distill-2.72B-from-12.6B"):
        for n in (8, 64, 512):
            rel = f"configs/paper/layouts/{kind}-{n}gpu.yaml"
            assert Path(rel).name in names
            paths, world = _compose(rel)
            cfg = config.load(paths, [], world_size=world)
            assert cfg.model.size == ("12.6B" if kind.startswith("teacher") else "2.72B")
            assert cfg.train.precision == "bf16" and cfg.train.seq_len == 4096
            ds = deepspeed_config(cfg, world // cfg.parallel.tp_size)
            dp = world // cfg.parallel.tp_size
            assert ds["gradient_accumulation_steps"] * cfg.train.micro_batch_size * dp == cfg.train.global_batch_size
            if kind.startswith("distill"):
                assert cfg.distill.teacher_dtype == "bf16" and cfg.distill.teacher == "runs/paper/teacher-12.6B"


def test_adamw_kernel_follows_the_parameters_device():
    """CPU (and optimizer offload): foreach AdamW, as the golden curves were made; all-CUDA: the fused kernel (its
    equality with foreach on a GPU: tests/test_gpu.py)."""
    from megadistill.model.transformer import Transformer
    from megadistill.train.engine import adamw_implementation, build_optimizer
    cfg = config.load([], ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.head_dim=16",
                           "model.vocab_size=64", "model.ff_multiple=32", "train.steps=1"])
    opt = build_optimizer(Transformer(cfg.model), cfg)
    assert opt.defaults["foreach"] and not opt.defaults["fused"]
    from types import SimpleNamespace
    cuda = [SimpleNamespace(device=torch.device("cuda"))] * 2  # the choice reads only .device (no CUDA here)
    assert adamw_implementation(cuda) == {"fused": True}
    assert adamw_implementation(cuda, "cpu") == {"foreach": True}
    assert adamw_implementation([torch.nn.Parameter(torch.empty(2))]) == {"foreach": True}


def test_zero_stage_at_one_dp_rank():
    """One DP rank: fp32 runs the plain optimizer (stage 0); bf16 keeps ZeRO-1's flat optimizer (DeepSpeed's bf16
    path without ZeRO is per-parameter) unless zero.stage=0 asks for it; offload and DP > 1 keep the stage."""
    from megadistill.train.engine import effective_stage, zero_stage_at
    assert [zero_stage_at(s, 1, "fp32") for s in (0, 1, 2, 3)] == [0, 0, 0, 0]
    assert [zero_stage_at(s, 1, "bf16") for s in (0, 1, 2, 3)] == [0, 1, 1, 1]
    assert zero_stage_at(3, 2, "fp32") == 3 and zero_stage_at(2, 1, "fp32", offloaded=True) == 2
    cfg = config.load([], ["model.size=tiny-0.5M", "train.steps=1", "train.precision=bf16", "zero.stage=2"])
    assert effective_stage(cfg, 1) == 1 and effective_stage(cfg, 4) == 2
    from megadistill.train import memory  # the planner on one GPU: what the engine runs, ZeRO-1 first in bf16;
    # stage 0 in bf16 (bf16 gradient accumulation) only when bf16 accumulation is asked for
    for precision, accum, stages in (("bf16", "auto", [1]), ("bf16", "bf16", [1, 0]), ("fp32", "auto", [0])):
        rows = memory.plan("975M", gpus=1, global_batch_tokens=65536, precision=precision, micro_batches=(1,),
                           checkpointing=("off",), fused=(False,), grad_accum_dtype=accum)
        assert [r["layout"]["zero_stage"] for r in rows] == stages, (precision, accum)


def test_generated_configs_are_up_to_date():
    gen = _gen_module()
    rendered = gen.render(PAPER)
    stale = [rel for rel, text in rendered.items() if (PAPER / rel).read_text() != text]
    assert not stale, f"run `python tools/gen_paper_configs.py`: {stale} differ from their generated text"
    generated_dirs = {(PAPER / rel).parent for rel in rendered}
    on_disk = {p.relative_to(PAPER).as_posix() for d in generated_dirs for p in d.glob("*.yaml")}
    assert on_disk - {"recipe.yaml"} <= set(rendered), "a file in a generated directory is not generated any more"


# ---- config errors name the key ---------------------------------------------------------------------------------

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.head_dim=16", "model.ff_multiple=64",
        "model.vocab_size=128", "train.steps=2", "data.synthetic_branching=4"]


@pytest.mark.parametrize("overrides,world,needle", [
    (["train.stepz=3"], None, "'train.stepz'"),
    (["resume=true"], None, "unknown config key 'resume' (did you mean train.resume?)"),
    (["model.seq_len=64"], None, "(did you mean train.seq_len?)"),
    (["optim.lr=fast"], None, "'optim.lr'"),
    (["train.steps=many"], None, "'train.steps'"),
    (["parallel.tp_size=3"], None, "parallel.tp_size=3 does not divide model.n_heads=4"),
    (["model.vocab_size=130", "parallel.tp_size=4"], None, "does not divide model.vocab_size=130"),
    (["model.n_heads=12", "model.n_kv_heads=6", "parallel.tp_size=4"], None,
     "parallel.tp_size=4 neither divides model.n_kv_heads=6 nor is a multiple of it"),
    (["model.n_kv_heads=2", "model.qk_norm_scope=full", "parallel.tp_size=4"], None,
     "model.qk_norm_scope=full normalises k over all model.n_kv_heads=2 heads"),
    (["model.moe_experts=4", "model.moe_top_k=5"], None, "model.moe_top_k=5 in [1, moe_experts]"),
    (["model.moe_experts=4", "model.moe_top_k=2", "train.moe_aux_loss=-0.01"], None, "train.moe_aux_loss"),
    (["model.moe_experts=4", "model.moe_top_k=2", "train.moe_router_z_loss=-1e-3"], None, "train.moe_router_z_loss"),
    (["model.moe_shared_ff=64"], None, "model.moe_shared_ff=64 must be >= 0 and needs a mixture of experts"),
    (["model.moe_experts=4", "model.moe_top_k=2", "model.moe_shared_ff=66", "parallel.tp_size=4"], 4,
     "parallel.tp_size=4 does not divide model.moe_shared_ff=66"),
    (["model.moe_experts=4", "model.moe_top_k=2", "model.ffn_gated=false"], None, "takes gated experts"),
    (["model.moe_experts=4", "model.moe_top_k=2", "model.ffn_bias=true"], None, "without biases"),
    (["train.micro_batch_size=4", "train.global_batch_size=8"], 4, "train.global_batch_size=8"),
    (["train.mode=distill"], None, "distill.teacher"),
    (["model.norm_position=middle"], None, "model.norm_position='middle'"),
    (["model.qk_norm_scope=heads"], None, "model.qk_norm_scope='heads'"),
    (["model.rope_scaling=longrope", "model.rope_short_factor=[1,2]", "model.rope_long_factor=[1,2,3,4,5,6,7,8]"], None,
     "model.rope_short_factor must hold 8 positive factors"),
    (["model.nope_blocks=[5]"], None, "model.nope_blocks=[5] must list distinct block indices in [0, 2)"),
    (["model.logit_softcap=30", "distill.fused=true"], None, "model.logit_softcap=30.0 needs materialised logits"),
    (["model.rope_scaling=yarn", "model.rope_factor=4", "model.rope_beta_slow=40"], None,
     "model.rope_beta_slow=40.0 must be > 0 and < model.rope_beta_fast=32.0"),
])
def test_config_errors_name_the_key(overrides, world, needle):
    with pytest.raises(ConfigError) as e:
        config.load([], TINY + overrides, world_size=world)
    assert needle in str(e.value), str(e.value)


def test_tf32_key_and_the_mfu_peak_it_implies():
    from megadistill.train.metrics import peak_flops
    assert config.load([], TINY).train.tf32 is True and config.load([], TINY + ["train.tf32=false"]).train.tf32 is False
    cfg = config.load([], TINY)
    cfg.train.tf32 = "yes"  # set in code past omegaconf's type check
    with pytest.raises(ConfigError, match=r"train\.tf32='yes' must be true or false"):
        cfg.validate()
    h100 = "NVIDIA H100 80GB HBM3"
    assert peak_flops("bf16", name=h100) == 989e12 and peak_flops("bf16", False, name=h100) == 989e12
    assert peak_flops("fp32", True, name=h100) == 989e12 / 2  # TF32 tensor cores
    assert peak_flops("fp32", False, name=h100) == 67e12  # IEEE fp32
    assert peak_flops("fp32", name="a CPU") is None


def test_fewer_kv_heads_than_tp_ranks_validate():
    """One or two key/value heads over 4 TP ranks: replicated, a valid layout (the model test checks its values)."""
    for kv in (1, 2):
        cfg = config.load([], TINY + [f"model.n_kv_heads={kv}", "parallel.tp_size=4"], world_size=4)
        assert (cfg.model.n_kv_heads, cfg.parallel.tp_size) == (kv, 4)


def test_unknown_key_in_a_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        config.load([str(f)], TINY)
    assert "optim.lrr" in str(e.value) and "lr" in str(e.value)


def test_global_batch_error_names_micro_and_dp():
    with pytest.raises(ConfigError) as e:
        config.load([], TINY + ["train.micro_batch_size=4", "train.global_batch_size=8"], world_size=4)
    assert "train.micro_batch_size=4" in str(e.value) and "dp_size=4" in str(e.value)


def _export_teacher(out_dir: Path, vocab: int) -> dict:
    from megadistill.model.transformer import Transformer
    from megadistill.parallel.groups import ParallelGroups
    from megadistill.train import checkpoint
    tcfg = config.load([], TINY + [f"model.vocab_size={vocab}", "model.d_model=96", "model.n_heads=6"])
    torch.manual_seed(0)
    model = Transformer(tcfg.model, ParallelGroups.single().factory(device=torch.device("cpu")))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    checkpoint.write_weights(state, out_dir, config.to_yaml(tcfg))
    return state


def test_teacher_student_vocab_mismatch(tmp_path):
    from megadistill.parallel.groups import ParallelGroups
    from megadistill.train.teacher import load_teacher
    _export_teacher(tmp_path / "t256", vocab=256)
    student = config.load([], TINY + ["train.mode=distill", f"distill.teacher={tmp_path / 't256'}"])
    with pytest.raises(UserError) as e:
        load_teacher(student, ParallelGroups.single(), torch.device("cpu"))
    assert "vocab_size=256" in str(e.value) and "model.vocab_size=128" in str(e.value)
    # the matching teacher loads, frozen, with the exported weights
    state = _export_teacher(tmp_path / "t128", vocab=128)
    ok = config.load([], TINY + ["train.mode=distill", f"distill.teacher={tmp_path / 't128'}"])
    teacher = load_teacher(ok, ParallelGroups.single(), torch.device("cpu"))
    assert teacher.model_cfg.d_model == 96 and teacher.model_cfg.vocab_size == 128
    for name, p in teacher.module.named_parameters():
        assert not p.requires_grad
        torch.testing.assert_close(p.detach(), state[name])


def test_yaml_off_for_activation_checkpointing_means_off(tmp_path):
    """YAML 1.1 reads a bare `off` as false; the config must still mean 'off' (and `on` / true mean 'full')."""
    from megadistill import config
    path = tmp_path / "ckpt.yaml"
    path.write_text("model:\n  activation_checkpointing: off\ntrain:\n  steps: 1\n")
    assert config.load([str(path)]).model.activation_checkpointing == "off"
    assert config.load([], ["train.steps=1", "model.activation_checkpointing=off"]).model.activation_checkpointing == "off"
    assert config.load([], ["train.steps=1", "model.activation_checkpointing=true"]).model.activation_checkpointing == "full"


def test_named_size_and_a_contradicting_shape_key_is_an_error(tmp_path):
    """model.size fills the shape fields; a shape key given with another value must not be silently dropped."""
    f = tmp_path / "m.yaml"
    f.write_text("model:\n  size: tiny-0.5M\ntrain:\n  steps: 1\n")
    with pytest.raises(ConfigError, match=r"model.d_model=32 \(from the command line\) contradicts model.size"):
        config.load([str(f)], ["model.d_model=32"])
    g = tmp_path / "both.yaml"
    g.write_text("model:\n  size: tiny-0.5M\n  n_layers: 7\ntrain:\n  steps: 1\n")
    with pytest.raises(ConfigError, match=f"model.n_layers=7 \\(from {g}\\)"):
        config.load([str(g)])
    # agreeing values (a run's resolved config.yaml holds both) and model.size=null (shape by hand) are fine
    resolved = config.load([str(f)])
    assert resolved.model.d_model != 32
    again = tmp_path / "resolved.yaml"
    again.write_text(config.to_yaml(resolved))
    assert config.load([str(again)]).model == resolved.model
    assert config.load([str(f)], ["model.size=null", "model.d_model=32", "model.head_dim=8"]).model.d_model == 32


@pytest.mark.parametrize("kind", ["teacher-12.6B", "distill-2.72B-from-12.6B"])
@pytest.mark.parametrize("n", [8, 64, 512])
def test_layouts_are_the_planners_first_pick(kind, n):
    """Each layout file is what its header says: `megadistill plan-memory`'s #1 layout for that cluster, with the
    figures the header quotes (regenerate both when the memory or step-time model changes)."""
    from megadistill.train import memory
    rel = f"configs/paper/layouts/{kind}-{n}gpu.yaml"
    paths, world = _compose(rel)
    cfg = config.load(paths, [], world_size=world)
    header = (ROOT / rel).read_text().splitlines()
    cmd = next(ln for ln in header if "plan-memory" in ln)
    tokens = int(re.search(r"--global-batch-tokens (\d+)", cmd).group(1))
    assert tokens == cfg.train.global_batch_size * cfg.train.seq_len, cmd
    best = memory.plan(cfg.model.size, "12.6B" if kind.startswith("distill") else None, gpus=world,
                       seq_len=cfg.train.seq_len, global_batch_tokens=tokens)[0]
    lay = best["layout"]
    assert (lay["tp_size"], lay["zero_stage"], lay["micro_batch_size"], lay["checkpointing"], lay["fused"],
            lay["teacher_zero3"], lay["sequence_parallel"]) == (
        cfg.parallel.tp_size, cfg.zero.stage, cfg.train.micro_batch_size, cfg.model.activation_checkpointing,
        cfg.distill.fused, cfg.distill.teacher_zero3, cfg.parallel.sequence_parallel), (rel, best["describe"])
    quoted = next(ln for ln in header if ln.startswith("#   tp="))
    assert f"{best['memory']['total'] / 2 ** 30:.1f} GiB per GPU" in quoted, (quoted, best["memory"]["total"] / 2 ** 30)


@pytest.mark.parametrize("rel", ["configs/tiny/distill.yaml", "configs/paper/layouts/distill-2.72B-from-12.6B-512gpu.yaml"])
def test_to_yaml_and_to_dict_are_omegaconfs(rel):
    """config.to_yaml / to_dict (dataclasses + OmegaConf's dumper, fast) give OmegaConf's own text and dict."""
    from omegaconf import OmegaConf
    paths, world = _compose(rel)
    cfg = config.load(paths, [], world_size=world)
    cfg.train.run_dir = "runs/x"  # a str, a nested path key
    assert config.to_yaml(cfg) == OmegaConf.to_yaml(OmegaConf.structured(cfg))
    assert config.to_dict(cfg) == OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert config.from_dict(config.to_dict(cfg)) == cfg
