"""Hugging Face interop: hf: teachers equal transformers' logits (TP 1 and 2), distillation from them through the real
trainer, `export --format hf` loads in transformers, import(export(x)) == x, and named errors for bad folders."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from dist_harness import run_distributed
from hf_models import (GEMMA2_CAPS, GEMMA3_WINDOW, MISTRAL_WINDOW, PHI3_ORIGINAL_MAX, PHI3_PARTIAL, PHI3_WINDOW,
                       NEOX_ROTARY, OLMO_CLIP, SHARED_WIDTH, VARIANTS, edit_config, hf_logits, make_hf, to_bin)
from tiny_runs import tiny_overrides

from megadistill import config
from megadistill.cli import main
from megadistill.errors import UserError
from megadistill.parallel.groups import ParallelGroups

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))


def _teacher_cfg(tmp, folder, extra=()):
    return config.load([], tiny_overrides(Path(tmp) / "student", "distill", ["train.steps=1", f"distill.teacher=hf:{folder}",
                                                                           *extra]))


def _shapeless(overrides):
    """tiny_overrides without its model.* shape keys (model.size=hf:PATH gives the shape)."""
    return [o for o in overrides if not o.startswith("model.")]


def _load(cfg, groups=None):
    from megadistill.train.teacher import load_teacher
    return load_teacher(cfg, groups or ParallelGroups.single(), torch.device("cpu"))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Every variant saved once, with its transformers logits on IDS."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (family, kv, tied) in VARIANTS.items():
        model = make_hf(root / name, family, kv, tied, seed=len(out))
        out[name] = (root / name, hf_logits(model, IDS))
    # Pythia's intermediate revisions ship as PyTorch pickles: the same weights in 3 pytorch_model-*.bin shards
    out["neox_bin"] = (to_bin(root / "neox_parallel", root / "neox_bin", shards=3), out["neox_parallel"][1])
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_teacher_logits_equal_transformers_tp1(hf_dirs, tmp_path, name):
    folder, ref = hf_dirs[name]
    teacher = _load(_teacher_cfg(tmp_path, folder))
    with torch.no_grad():
        ours = teacher.module(IDS)
    assert_close(ours, ref)
    assert all(not p.requires_grad for p in teacher.module.parameters())
    family, kv, tied = VARIANTS[name]
    m = teacher.model_cfg
    neox = family in ("neox", "neox_seq")  # LayerNorms, a plain MLP, biases on every linear
    assert (m.n_kv_heads, m.tie_embeddings, m.qk_norm, m.qkv_bias) == (
        kv, tied, family in ("qwen3", "olmo2", "gemma3", "qwen3_moe", "olmoe"),
        family in ("qwen2", "llama_bias", "stablelm", "qwen2_moe") or neox)
    moe = family in ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")
    assert (m.moe_experts, m.moe_top_k, m.moe_norm_topk, m.moe_shared_ff) == (
        (4, 2, family not in ("olmoe", "qwen2_moe"), SHARED_WIDTH if family == "qwen2_moe" else 0) if moe
        else (0, 0, True, 0))
    if family == "qwen2_moe":  # the shared expert and its gate are read (random in the checkpoint: they matter)
        with torch.no_grad():
            for block in teacher.module.blocks:
                block.ffn.shared.gate.weight.fill_(-30.0)  # sigmoid ~ 0: the shared expert's output dropped
            assert (teacher.module(IDS) - ref).abs().max() > 1e-3
    assert (m.o_bias, m.ffn_bias) == ((True, True) if neox or family == "llama_bias" else (False, False))
    assert (m.norm_type, m.ffn_gated, m.parallel_residual) == (
        ("layer", False, family == "neox") if neox else ("layer_noaffine", True, False) if family == "olmo"
        else ("layer", True, False) if family == "stablelm" else ("rms", True, False))
    assert m.qkv_clip == (OLMO_CLIP if family in ("olmo", "olmoe") else 0.0)
    if family in ("olmo", "olmoe"):  # the clamp bites: without it the logits differ
        for block in teacher.module.blocks:
            block.attn.clip = 0.0
        with torch.no_grad():
            assert (teacher.module(IDS) - ref).abs().max() > 1e-3
    if neox:
        assert m.activation == ("gelu" if family == "neox" else "gelu_tanh") and m.norm_eps == 1e-5
    olmo2 = family == "olmo2"  # post-norm blocks, QK-norm gains over all heads' dims (split over TP like the heads)
    gemma = family in ("gemma2", "gemma3")  # sandwich norms (Gemma 2 without QK-norm, softcapped)
    assert (m.norm_position, m.qk_norm_scope) == (("post", "full") if olmo2 else ("pre", "full") if family == "olmoe"
                                                  else ("sandwich", "head") if gemma else ("pre", "head"))
    assert (m.attn_softcap, m.logit_softcap) == (GEMMA2_CAPS if family == "gemma2" else (0.0, 0.0))
    assert m.nope_blocks == ([1] if family == "smollm3" else [])
    if gemma:  # 1 + w gains, GeGLU, x sqrt(64) embeddings, query_pre_attn_scalar, per-block windows
        assert (m.norm_offset, m.activation, m.embed_scale, m.attn_scale_dim) == (1.0, "gelu_tanh", 8.0, 24)
        assert m.layer_types == ["sliding", "full"]
    if family == "gemma3":
        assert (m.layer_types, m.rope_local_base, m.rope_factor) == (["sliding", "full"], 10000.0, 8.0)
    assert teacher.module.blocks[0].attn.q_norm is None or teacher.module.blocks[0].attn.q_norm.weight.shape == (
        (4 * m.head_dim,) if m.qk_norm_scope == "full" else (m.head_dim,))
    assert m.sliding_window == {"mistral": MISTRAL_WINDOW, "phi3": PHI3_WINDOW, "gemma3": GEMMA3_WINDOW,
                                "gemma2": GEMMA3_WINDOW}.get(family, 0)
    assert m.rope_fraction == {"phi3": PHI3_PARTIAL, "neox": NEOX_ROTARY, "neox_seq": NEOX_ROTARY,
                               "stablelm": NEOX_ROTARY}.get(family, 1.0)
    if m.norm_type == "layer":  # LayerNorm biases loaded (drawn at random)
        assert float(teacher.module.blocks[1].ffn_norm.bias.abs().min()) > 0
    if m.qkv_bias:  # the biases are loaded (drawn at random in the checkpoint, so the logits depend on them)
        assert float(teacher.module.blocks[0].attn.wk.bias.abs().sum()) > 0
    if m.o_bias:  # and the O / FFN / LayerNorm ones
        block = teacher.module.blocks[1]
        biases = [block.attn.wo.bias, block.ffn.w1.bias, block.ffn.w2.bias] + (
            [block.attn_norm.bias, teacher.module.norm.bias] if neox else [block.ffn.w3.bias])
        assert all(float(b.abs().min()) > 0 for b in biases)
    if family == "phi3":  # one Q/K/V matrix and one gate/up matrix per layer, read as row views
        assert m.rope_scaling == "longrope" and m.rope_attention_factor == pytest.approx(2 ** 0.5)  # 256 / 16
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()  # short factors: up to PHI3_ORIGINAL_MAX tokens
        with torch.no_grad():
            assert_close(teacher.module(IDS[:, :PHI3_ORIGINAL_MAX]), hf_logits(hf, IDS[:, :PHI3_ORIGINAL_MAX]))
        from megadistill.hf.safetensors_io import SafetensorsFolder
        names = set(SafetensorsFolder(folder).entries)
        assert "model.layers.1.self_attn.qkv_proj.weight" in names and "model.layers.1.mlp.gate_up_proj.weight" in names
        assert "model.layers.1.self_attn.q_proj.weight" not in names
    assert m.rope_scaling == {"llama": "llama3", "phi3": "longrope", "qwen2": "yarn", "gemma3": "linear"}.get(
        family, "default")
    if family == "qwen2":
        assert (m.rope_factor, m.rope_original_max_position) == (4.0, 32768)
        assert m.rope_attention_factor == pytest.approx(0.1 * math.log(4) + 1)  # transformers' default
    if tied:
        assert teacher.module.head.weight is teacher.module.embed.weight
    # N (biases, full-width QK-norms and sandwich norms counted) + the stored vocabulary matrices = the checkpoint
    from megadistill.hf.safetensors_io import SafetensorsFolder
    from megadistill.model.sizes import params_of
    stored = sum(math.prod(e.shape) for e in SafetensorsFolder(folder).entries.values())
    assert params_of(m)[0] + (1 if tied else 2) * m.vocab_size * m.d_model == stored


def test_sharded_bf16_checkpoint_streams(tmp_path):
    """A checkpoint split over several files (with the index) in bf16 -> a bf16 teacher equal to transformers'."""
    model = make_hf(tmp_path / "sharded", "qwen3", 2, False, seed=3, max_shard_size="40KB", dtype=torch.bfloat16)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    teacher = _load(_teacher_cfg(tmp_path, tmp_path / "sharded", ["distill.teacher_dtype=bf16"]))
    assert all(p.dtype == torch.bfloat16 for p in teacher.module.parameters())
    ref = {k: v for k, v in model.state_dict().items()}
    assert torch.equal(teacher.module.blocks[1].attn.wk.weight, ref["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(teacher.module.head.weight, ref["lm_head.weight"])


def test_pytorch_bin_checkpoints_are_read(hf_dirs, tmp_path):
    """pytorch_model.bin (one file, or shards with their index) is a teacher equal to transformers' (GPT-NeoX's
    interleaved Q/K/V split from it too; at TP=2 in test_tp2_logits_and_distillation_from_hf_teacher); a pickle that
    would run code, a legacy-format file or a folder without weights is a named error."""
    from megadistill.hf.safetensors_io import SafetensorsFolder
    folder, ref = hf_dirs["neox_bin"]
    assert not list(folder.glob("*.safetensors")) and len(list(folder.glob("*.bin"))) == 3
    single = to_bin(hf_dirs["llama_biases"][0], tmp_path / "single")
    for path, want in ((folder, ref), (single, hf_dirs["llama_biases"][1])):
        teacher = _load(_teacher_cfg(tmp_path, path))
        with torch.no_grad():
            assert_close(teacher.module(IDS), want)
    evil = tmp_path / "evil"
    shutil.copytree(single, evil)

    class Payload:  # unpickling it would call print: torch.load(weights_only=True) refuses
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Payload()}, evil / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot be read as plain tensors .*a pickle carrying code is refused"):
        SafetensorsFolder(evil)
    (evil / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a zip-format PyTorch checkpoint"):
        SafetensorsFolder(evil)
    (evil / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match="has no model.safetensors .* nor pytorch_model.bin"):
        SafetensorsFolder(evil)


def test_interleaved_rows_read_as_parts(tmp_path):
    """GPT-NeoX's query_key_value ([heads, (q, k, v), hd] rows) read as three tensors: any row range (a TP rank's
    heads), column slices, 1-D biases and casts equal slicing the de-interleaved tensor; a shape config.json does not
    imply is a named error."""
    from safetensors.torch import save_file

    from megadistill.hf.safetensors_io import BLOCK_BYTES, SafetensorsFolder
    h, hd, d = 4, 3, 5
    w, b = torch.randn(h * 3 * hd, d), torch.randn(h * 3 * hd)
    save_file({"qkv.weight": w, "qkv.bias": b, "other": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    st = SafetensorsFolder(tmp_path)
    for kind, t in (("weight", w), ("bias", b)):
        st.split_interleaved(f"qkv.{kind}", {f"q.{kind}": hd, f"k.{kind}": hd, f"v.{kind}": hd}, h)
        per_head = t.reshape(h, 3, hd, *t.shape[1:])
        for i, part in enumerate("qkv"):
            ref = per_head[:, i].reshape(h * hd, *t.shape[1:])
            assert st.shape(f"{part}.{kind}") == tuple(ref.shape)
            assert torch.equal(st.read(f"{part}.{kind}"), ref)
            for lo, hi in ((0, 6), (6, 12), (2, 7), (4, 5)):  # whole heads (TP ranks) and ranges across runs
                assert torch.equal(st.read(f"{part}.{kind}", 0, lo, hi), ref[lo:hi])
            if kind == "weight":
                assert torch.equal(st.read(f"{part}.{kind}", 1, 1, 4), ref[:, 1:4])
                out = torch.empty(6, d, dtype=torch.bfloat16)
                st.read(f"{part}.{kind}", 0, 6, 12, out=out)
                assert torch.equal(out, ref[6:].bfloat16())
    assert BLOCK_BYTES > 0 and "qkv.weight" not in st and "other" in st
    st2 = SafetensorsFolder(tmp_path)
    with pytest.raises(UserError, match=r"qkv.weight has shape \(36, 5\), but config.json implies 4 heads x 6 rows"):
        st2.split_interleaved("qkv.weight", {"q.weight": 2, "k.weight": 2, "v.weight": 2}, 4)


def test_stacked_parts_read_as_one_tensor(tmp_path):
    """A mixture's per-expert matrices, spread over two shard files, read as one [E, rows, cols] tensor: slices along
    the expert dim, the rows (a column-parallel TP rank's) and the columns (a row-parallel one's), and a cast into a
    destination, equal slicing torch.stack of them; the parts answer only through the stack; a missing expert or
    one of another shape is a named error."""
    from safetensors.torch import save_file

    from megadistill.hf.safetensors_io import INDEX, SafetensorsFolder
    parts = {f"e.{i}.w": torch.randn(4, 6) for i in range(3)}
    save_file({"e.0.w": parts["e.0.w"], "e.1.w": parts["e.1.w"]}, str(tmp_path / "a.safetensors"))
    save_file({"e.2.w": parts["e.2.w"], "odd.w": torch.zeros(4, 5)}, str(tmp_path / "b.safetensors"))
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"e.0.w": "a.safetensors", "e.1.w": "a.safetensors",
                                                             "e.2.w": "b.safetensors", "odd.w": "b.safetensors"}}))
    st = SafetensorsFolder(tmp_path)
    st.stack("e.w", list(parts))
    ref = torch.stack(list(parts.values()))
    assert st.shape("e.w") == (3, 4, 6) and "e.1.w" not in st and len(st.files()) == 2
    assert torch.equal(st.read("e.w"), ref)
    assert torch.equal(st.read("e.w", 0, 1, 3), ref[1:3])
    assert torch.equal(st.read("e.w", 1, 2, 4), ref[:, 2:4])
    out = torch.empty(3, 4, 3, dtype=torch.bfloat16)
    st.read("e.w", 2, 3, 6, out=out)
    assert torch.equal(out, ref[:, :, 3:].bfloat16())
    with pytest.raises(UserError, match=r"x.w stacks 2 tensors but 1 are missing \(\['e.3.w'\]\)"):
        SafetensorsFolder(tmp_path).stack("x.w", ["e.0.w", "e.3.w"])
    with pytest.raises(UserError, match=r"odd.w has shape \(4, 5\) .* unlike e.0.w's \(4, 6\)"):
        SafetensorsFolder(tmp_path).stack("x.w", ["e.0.w", "odd.w"])


# ---------------------------------------------------------------- TP=2 and the trainer, on 2 gloo processes

def _tp2_and_training(rank, world, root, variants):
    from megadistill.train.trainer import train
    root = Path(root)
    out = {"logits": {}}
    groups = ParallelGroups.build(2)
    for name, folder in variants.items():  # the teacher split over 2 TP ranks: gathered logits = transformers'
        cfg = config.load([], tiny_overrides(root / "probe", "distill", ["train.steps=1", f"distill.teacher=hf:{folder}",
                                                                        "parallel.tp_size=2"]), world_size=2)
        teacher = _load(cfg, groups)
        with torch.no_grad():
            local = teacher.module(IDS)  # [b, s, V/2]
        parts = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(parts, local.contiguous())
        out["logits"][name] = torch.cat(parts, dim=-1)
        assert local.shape[-1] == 64
    # a mixture as a ZeRO-3 teacher at DP=2: its stacked experts partitioned over the ranks and gathered for
    # Experts.forward like any module's parameters; logits = transformers'
    z3 = config.load([], tiny_overrides(root / "probe_z3", "distill", [
        "train.steps=1", f"distill.teacher=hf:{variants['mixtral_gqa']}", "zero.stage=3", "distill.teacher_zero3=true"]),
        world_size=2)
    teacher = _load(z3, ParallelGroups.build(1))
    experts = teacher.module.blocks[0].ffn.experts.w1
    assert teacher.engine is not None and experts.numel() == 0 and experts.ds_numel == 4 * 32 * 64  # partitioned
    with torch.no_grad():
        out["z3_mixtral"] = teacher.module(IDS)
    # a student initialised from an HF folder (its shape from model.size=hf:PATH) computes the HF model at TP=2
    from megadistill.parallel.init import init_distributed
    from megadistill.train.trainer import build, release
    src = f"hf:{variants['llama_gqa_tied']}"
    live = build(config.load([], _shapeless(tiny_overrides(root / "init", "supervised")) + [
        "train.steps=1", f"model.size={src}", f"train.init_from={src}", "parallel.tp_size=2"], world_size=2),
        init_distributed("gloo"))
    with torch.no_grad():
        local = live.student(IDS)
    parts = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(parts, local.contiguous())
    out["student_init"] = torch.cat(parts, dim=-1)
    release(live)
    teacher = f"hf:{variants['qwen3_gqa']}"
    gemma2 = f"distill.teacher=hf:{variants['gemma2_gqa_tied']}"  # windows of 8 in 32 tokens, softcapped logits
    mixtral = f"distill.teacher=hf:{variants['mixtral_gqa']}"  # a mixture of 4 experts, split over TP
    for name, extra in {"tp2_dp1": ["parallel.tp_size=2", "zero.stage=1"],
                        "tp1_dp2_teacher_z3": ["zero.stage=3", "distill.teacher_zero3=true"],
                        "tp2_gemma2_teacher": ["parallel.tp_size=2", "zero.stage=1", gemma2],
                        # its sharper random distributions spike at 3e-2 within 12 steps
                        "tp2_mixtral_teacher": ["parallel.tp_size=2", "zero.stage=2", mixtral,
                                                "optim.lr=1e-2"]}.items():
        over = tiny_overrides(root / name, "distill", ["train.steps=12", f"distill.teacher={teacher}",
                                                       "optim.lr=3e-2", "train.eval_interval=12", *extra])
        train(config.load([], over))
        out[name] = [json.loads(line)["loss"] for line in open(root / name / "train.jsonl")]
        out[name + "_record"] = json.loads((root / name / "eval.jsonl").read_text().splitlines()[-1])
    return out


@pytest.mark.multiproc
def test_tp2_logits_and_distillation_from_hf_teacher(hf_dirs, tmp_path):
    variants = {name: str(folder) for name, (folder, _) in hf_dirs.items()}
    out = run_distributed(_tp2_and_training, 2, str(tmp_path), variants, timeout=900)[0]
    for name, (_, ref) in hf_dirs.items():
        assert_close(out["logits"][name], ref, msg=name)
    assert_close(out["student_init"], hf_dirs["llama_gqa_tied"][1])
    assert_close(out["z3_mixtral"], hf_dirs["mixtral_gqa"][1])
    for name in ("tp2_dp1", "tp1_dp2_teacher_z3", "tp2_gemma2_teacher", "tp2_mixtral_teacher"):
        losses = out[name]
        assert len(losses) == 12 and all(map(lambda x: x == x, losses))
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, (name, losses)
        rec = out[name + "_record"]
        assert rec["mode"] == "distill" and rec["teacher"]["run"] == (
            "gemma2_gqa_tied" if "gemma2" in name else "mixtral_gqa" if "mixtral" in name else "qwen3_gqa")
        assert rec["teacher"]["eval_loss"] > 0 and rec["flops_teacher_inference"] > 0


# ---------------------------------------------------------------- export --format hf and the round trip

def _train_worker(rank, world, run_dir, extra):
    from megadistill.train.trainer import train
    train(config.load([], tiny_overrides(run_dir, "supervised", ["train.steps=3", "model.size=null", *extra])))


def _train_tiny(run_dir, extra):
    """In a spawned process: a run leaves torch.distributed initialised (and MASTER_PORT bound) in its process."""
    run_distributed(_train_worker, 1, str(run_dir), list(extra), timeout=600)


EXPORT_ARCH = {"qwen3_gqa_tied": "Qwen3ForCausalLM", "llama_rope3": "LlamaForCausalLM",
               "qwen2_gqa_tied": "Qwen2ForCausalLM", "phi3_partial": "Phi3ForCausalLM",
               "olmo2_post": "Olmo2ForCausalLM", "gemma3_sandwich": "Gemma3ForCausalLM",
               "gptneox_pythia": "GPTNeoXForCausalLM", "olmo1_clip": "OlmoForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM"}
NEOX = {"norm_type": "layer", "ffn_gated": False, "activation": "gelu", "parallel_residual": True, "qk_norm": False,
        "qkv_bias": True, "o_bias": True, "ffn_bias": True, "rope_fraction": 0.25}
MOE = {"moe_experts": 4, "moe_top_k": 2, "d_ff": 32}  # a mixture of 4 experts of width 32, top 2


@pytest.mark.parametrize("shape", [
    ["model.n_kv_heads=2", "model.tie_embeddings=true"],  # -> Qwen3ForCausalLM (QK-norm), GQA, tied
    ["model.qk_norm=false", "model.rope_scaling=llama3", "model.rope_factor=8", "model.rope_original_max_position=64",
     "model.rope_base=10000"],  # -> LlamaForCausalLM with llama3 RoPE
    ["model.qk_norm=false", "model.qkv_bias=true", "model.n_kv_heads=2", "model.tie_embeddings=true",
     "model.rope_scaling=yarn", "model.rope_factor=4", "model.rope_original_max_position=256", "model.rope_base=10000",
     "model.rope_attention_factor=1.2", "model.rope_beta_fast=16"],  # -> Qwen2 with yarn
    ["model.qk_norm=false", "model.rope_fraction=0.5", "model.n_kv_heads=2", "model.rope_scaling=longrope",
     "model.rope_short_factor=[1,1.5,2,4]", "model.rope_long_factor=[2,3,5,8]", "model.rope_original_max_position=16",
     "model.rope_attention_factor=1.2"],  # -> Phi3 (fused matrices written, longrope)
    ["model.norm_position=post", "model.qk_norm_scope=full", "model.n_kv_heads=2"],  # -> OLMo 2
    ["model.norm_position=sandwich", "model.norm_offset=1", "model.activation=gelu_tanh", "model.embed_scale=8",
     "model.attn_scale_dim=24", "model.sliding_window=8", "model.layer_types=[sliding,full]",
     "model.rope_local_base=10000", "model.tie_embeddings=true", "model.n_kv_heads=2"],  # -> Gemma 3
    [f"model.{k}={str(v).lower()}" for k, v in NEOX.items()],  # -> GPT-NeoX (Pythia's block)
    ["model.qk_norm=false", "model.norm_type=layer_noaffine", "model.qkv_clip=0.5", "model.norm_eps=1e-5"],  # -> OLMo 1
    ["model.moe_experts=4", "model.moe_top_k=2", "model.d_ff=64", "model.n_kv_heads=2"],  # -> Qwen3-MoE
], ids=list(EXPORT_ARCH))
def test_export_hf_loads_in_transformers_and_round_trips(tmp_path, shape, request):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megadistill.train.teacher import teacher_model_config
    from megadistill.model.transformer import Transformer
    from megadistill.train.checkpoint import load_sharded_weights

    run = tmp_path / "run"
    _train_tiny(run, shape)
    assert main(["export", str(run), "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    arch = json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"][0]
    assert arch == EXPORT_ARCH[request.node.callspec.id]
    assert type(hf).__name__ == arch
    # our model from the run's weights (what eval uses) vs transformers on the exported folder
    tcfg = teacher_model_config(run / "model")
    ours = Transformer(tcfg.model).eval()
    load_sharded_weights(ours, run / "model", ParallelGroups.single())
    if tcfg.model.qkv_bias:  # trained from 0: the export carries biases that matter
        assert float(ours.blocks[0].attn.wq.bias.detach().abs().min()) > 0
    if tcfg.model.o_bias:
        assert float(ours.blocks[0].attn.wo.bias.detach().abs().min()) > 0
    with torch.no_grad():
        assert_close(hf(IDS).logits, ours(IDS))
        gen = hf.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 11)
    # round trip: import(export(x)) == x, bit for bit, and the same model config
    assert main(["import", f"hf:{tmp_path / 'hf'}", "-o", str(tmp_path / "back")]) == 0
    a, b = load_file(str(run / "model" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    back = teacher_model_config(tmp_path / "back").model
    for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size", "rope_base",
                "rope_scaling", "rope_factor", "rope_fraction", "rope_short_factor", "rope_long_factor",
                "rope_attention_factor", "rope_beta_fast", "rope_beta_slow", "rope_truncate", "norm_eps", "qk_norm",
                "qk_norm_scope", "norm_position", "norm_offset", "activation", "embed_scale", "attn_scale_dim",
                "sliding_window", "layer_types", "rope_local_base", "qkv_bias", "tie_embeddings", "o_bias", "ffn_bias",
                "norm_type", "ffn_gated", "parallel_residual", "qkv_clip", "moe_experts", "moe_top_k",
                "moe_norm_topk"):
        assert getattr(back, key) == getattr(tcfg.model, key), key


@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2_gqa_tied", "phi3_gqa", "olmo2_gqa", "gemma3_gqa_tied",
                                  "neox_parallel", "olmoe_mha"])
def test_import_dir_is_a_teacher(hf_dirs, tmp_path, name):
    """`megadistill import` writes a model dir that distill.teacher accepts (Q/K/V biases, fused Phi-3 matrices
    split); bf16 import casts."""
    folder, ref = hf_dirs[name]
    assert main(["import", f"hf:{folder}", "-o", str(tmp_path / "imp"), "--dtype", "fp32"]) == 0
    teacher = _load(config.load([], tiny_overrides(tmp_path / "s", "distill", ["train.steps=1",
                                                                           f"distill.teacher={tmp_path / 'imp'}"])))
    with torch.no_grad():
        assert_close(teacher.module(IDS), ref)
    assert main(["import", f"hf:{folder}", "-o", str(tmp_path / "imp16"), "--dtype", "bf16"]) == 0
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(str(tmp_path / "imp16" / "model.safetensors")).values()} == {torch.bfloat16}


def test_student_init_needs_the_same_architecture(hf_dirs, tmp_path):
    from megadistill.config import ConfigError
    from megadistill.model.transformer import Transformer
    from megadistill.train.init_weights import load_student_init
    src = f"hf:{hf_dirs['qwen3_gqa'][0]}"
    cfg = config.load([], tiny_overrides(tmp_path, "supervised", ["train.steps=1", f"train.init_from={src}"]))
    with pytest.raises(ConfigError, match=f"model.n_kv_heads=4 vs 2.*set model.size='{src}'"):
        load_student_init(Transformer(cfg.model), cfg, ParallelGroups.single())
    cfg = config.load([], _shapeless(tiny_overrides(tmp_path, "supervised")) + [
        "train.steps=1", f"model.size={src}", f"train.init_from={src}"])
    assert (cfg.model.n_kv_heads, cfg.model.head_dim, cfg.model.qk_norm) == (2, 24, True)
    student = Transformer(cfg.model)
    load_student_init(student, cfg, ParallelGroups.single())
    with torch.no_grad():
        assert_close(student(IDS), hf_dirs["qwen3_gqa"][1])
    with pytest.raises(ConfigError, match="contradicts model.size"):  # an explicit key against the HF shape
        config.load([], tiny_overrides(tmp_path, "supervised", ["train.steps=1", f"model.size={src}"]))


def test_sliding_window_student_trains_past_its_window_and_exports(hf_dirs, tmp_path):
    """Mistral attends to its last MISTRAL_WINDOW tokens (the TP=1 / TP=2 logits tests check that against transformers
    on 24 tokens). A `model.size=hf:` student with train.seq_len=32, twice its window, initialises to transformers'
    function on 32 tokens, the window changes the logits there (so it is not silently full attention), and its
    export keeps the window."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from megadistill.hf.config import from_model_config
    from megadistill.model.transformer import Transformer
    from megadistill.train.init_weights import load_student_init
    folder, _ = hf_dirs["mistral_gqa"]
    src = f"hf:{folder}"
    cfg = config.load([], _shapeless(tiny_overrides(tmp_path, "supervised")) + [
        "train.steps=1", "train.seq_len=32", f"model.size={src}", f"train.init_from={src}"])
    assert cfg.model.sliding_window == MISTRAL_WINDOW < cfg.train.seq_len
    student = Transformer(cfg.model)
    load_student_init(student, cfg, ParallelGroups.single())
    full = Transformer(dataclasses.replace(cfg.model, sliding_window=0))
    full.load_state_dict(student.state_dict())
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(3))
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        ours, theirs, unwindowed = student(ids), hf_logits(hf, ids), full(ids)
    assert_close(ours, theirs)
    assert_close(unwindowed[:, :MISTRAL_WINDOW], ours[:, :MISTRAL_WINDOW])  # the window restricts nothing yet
    assert (unwindowed[:, MISTRAL_WINDOW:] - ours[:, MISTRAL_WINDOW:]).abs().max() > 1e-3  # past it, it does
    exported = from_model_config(cfg.model, 128)
    assert exported["architectures"] == ["MistralForCausalLM"] and exported["sliding_window"] == MISTRAL_WINDOW


def test_gemma3_multimodal_checkpoint_is_a_text_teacher(tmp_path):
    """Gemma 3 4B-27B ship as Gemma3ForConditionalGeneration: its text model (text_config, which on the hub omits keys
    at Gemma3TextConfig's defaults; tensors under language_model.model.*) is the teacher, the vision tower unread.
    Logits equal the multimodal model's on text at TP=1; import writes the text model only."""
    from transformers import AutoModelForImageTextToText, Gemma3TextConfig

    from megadistill.hf.config import GEMMA3_TEXT_DEFAULTS
    folder = tmp_path / "gemma3_mm"
    make_hf(folder, "gemma3_mm", 2, True, seed=5)
    cfg = json.loads((folder / "config.json").read_text())
    for key in ("rms_norm_eps", "hidden_activation", "tie_word_embeddings"):  # at their defaults: dropped (hub)
        cfg["text_config"].pop(key)
    (folder / "config.json").write_text(json.dumps(cfg))
    hf = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
    teacher = _load(_teacher_cfg(tmp_path, folder))
    assert teacher.model_cfg.norm_position == "sandwich" and teacher.model_cfg.tie_embeddings
    with torch.no_grad():
        assert_close(teacher.module(IDS), hf_logits(hf, IDS))
    assert main(["import", f"hf:{folder}", "-o", str(tmp_path / "imported")]) == 0
    from safetensors.torch import load_file
    assert not [k for k in load_file(str(tmp_path / "imported" / "model.safetensors")) if "vision" in k]
    defaults = Gemma3TextConfig()  # the table text_config is completed from is transformers' own defaults
    assert {k: getattr(defaults, k) for k in GEMMA3_TEXT_DEFAULTS} == GEMMA3_TEXT_DEFAULTS


def test_qwen2_use_sliding_window_windows_the_last_blocks(hf_dirs, tmp_path):
    """Qwen2 / Qwen3 with use_sliding_window=true window the blocks from max_window_layers on (transformers' rule):
    imported as model.layer_types, logits equal transformers' past the window."""
    from transformers import AutoModelForCausalLM
    folder = tmp_path / "qwen2_windows"
    shutil.copytree(hf_dirs["qwen2_gqa_tied"][0], folder)
    edit_config(folder, use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None)  # v4-style
    teacher = _load(_teacher_cfg(tmp_path, folder))
    assert (teacher.model_cfg.sliding_window, teacher.model_cfg.layer_types) == (8, ["full", "sliding"])
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        ours = teacher.module(IDS)
    assert_close(ours, hf_logits(hf, IDS))
    assert (ours - hf_dirs["qwen2_gqa_tied"][1]).abs().max() > 1e-3  # the window changed block 1's attention
    moe = tmp_path / "qwen2_moe_windows"  # Qwen2-MoE's own default: every other block from the first, below
    shutil.copytree(hf_dirs["qwen2_moe_gqa"][0], moe)  # max_window_layers
    edit_config(moe, use_sliding_window=True, sliding_window=8, max_window_layers=2, layer_types=None)
    teacher = _load(_teacher_cfg(tmp_path, moe))
    assert (teacher.model_cfg.sliding_window, teacher.model_cfg.layer_types) == (8, ["sliding", "full"])
    with torch.no_grad():
        assert_close(teacher.module(IDS), hf_logits(AutoModelForCausalLM.from_pretrained(str(moe)).eval(), IDS))


@pytest.mark.parametrize("over", [
    {"qk_norm": False, "qkv_bias": True, "sliding_window": 8, "layer_types": ["full", "sliding", "sliding"]},
    {"sliding_window": 8},  # Qwen3, every block windowed
    {"qk_norm": False, "sliding_window": 8},  # Mistral
    {"norm_position": "sandwich", "norm_offset": 1.0, "activation": "gelu_tanh", "embed_scale": 8.0,
     "sliding_window": 8, "layer_types": ["sliding", "sliding", "full"], "tie_embeddings": True},  # Gemma 3, one RoPE
    {"qk_norm": False, "nope_blocks": [0, 2], "sliding_window": 8, "layer_types": ["sliding", "full", "sliding"]},
    {"norm_position": "sandwich", "norm_offset": 1.0, "activation": "gelu_tanh", "embed_scale": 8.0, "qk_norm": False,
     "attn_scale_dim": 24, "attn_softcap": 2.0, "logit_softcap": 3.0, "sliding_window": 8,
     "layer_types": ["sliding", "full", "sliding"]},  # Gemma 2
    dict(NEOX, n_kv_heads=4),  # GPT-NeoX / Pythia
    dict(NEOX, n_kv_heads=4, parallel_residual=False, activation="gelu_tanh", tie_embeddings=True,
         rope_scaling="linear", rope_factor=2.0),  # GPT-NeoX, sequential
    {"qk_norm": False, "qkv_bias": True, "o_bias": True, "ffn_bias": True},  # Llama's attention_bias and mlp_bias
    {"qkv_bias": True, "o_bias": True},  # Qwen3's attention_bias
    {"qk_norm": False, "norm_type": "layer_noaffine", "qkv_clip": 0.4, "tie_embeddings": True},  # OLMo 1
    {"qk_norm": False, "norm_type": "layer", "qkv_bias": True, "rope_fraction": 0.25},  # StableLM 2
    dict(MOE, qk_norm=False, sliding_window=8),  # Mixtral, every block windowed
    dict(MOE, moe_norm_topk=False, qkv_bias=True, o_bias=True, tie_embeddings=True),  # Qwen3-MoE, attention_bias
    dict(MOE, moe_norm_topk=False, qk_norm_scope="full", qkv_clip=0.4),  # OLMoE
    dict(MOE, moe_norm_topk=False, moe_shared_ff=48, qk_norm=False, qkv_bias=True, sliding_window=8,
         layer_types=["sliding", "full", "sliding"]),  # Qwen2-MoE, every other block windowed
], ids=["qwen2_last_blocks", "qwen3_all_blocks", "mistral", "gemma3_shared_rope", "smollm3_windowed_nope",
        "gemma2_softcapped", "gptneox", "gptneox_sequential_tied", "llama_biases", "qwen3_biases", "olmo1", "stablelm",
        "mixtral_windowed", "qwen3_moe_biases_tied", "olmoe", "qwen2_moe_windowed"])
def test_exported_config_is_our_function_in_transformers(tmp_path, over):
    """Our model with random weights (norm gains too), written as export writes it (from_model_config + state_to_hf),
    loads in transformers with equal logits on sequences 3x the window; import reads the same config back."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from megadistill.config import ModelConfig
    from megadistill.hf.config import from_model_config, to_model_config
    from megadistill.hf.weights import state_to_hf, write_json, write_safetensors
    from megadistill.model.transformer import Transformer
    m = dataclasses.replace(ModelConfig(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96,
                                        vocab_size=128, rope_base=10000.0).resolve(), **over)
    m.validate()
    torch.manual_seed(0)
    ours = Transformer(m).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.copy_(0.5 + torch.rand(p.shape))
    hf_cfg = from_model_config(m, 64)
    write_safetensors(state_to_hf(dict(ours.state_dict()), m.tie_embeddings, model_cfg=m), tmp_path)
    write_json(tmp_path / "config.json", hf_cfg)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        theirs = hf_logits(hf, IDS)
        assert_close(ours(IDS), theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))  # fp32 round-off only
    back = to_model_config(hf_cfg)
    for key in ("sliding_window", "layer_types", "norm_position", "norm_offset", "activation", "qkv_bias", "qk_norm",
                "nope_blocks", "attn_softcap", "logit_softcap", "attn_scale_dim", "o_bias", "ffn_bias", "norm_type",
                "ffn_gated", "parallel_residual", "rope_fraction", "rope_scaling", "tie_embeddings", "qkv_clip",
                "norm_eps", "moe_experts", "moe_top_k", "moe_norm_topk", "d_ff", "qk_norm_scope", "moe_shared_ff"):
        assert getattr(back, key) == getattr(m, key), key


def test_export_refuses_models_no_hf_architecture_computes():
    """from_model_config names the keys when no transformers class computes our model, instead of writing a config
    that would load as another function (e.g. a Qwen3 that silently drops a sliding window)."""
    import dataclasses

    from megadistill.config import ModelConfig
    from megadistill.hf.config import from_model_config
    base = ModelConfig(n_layers=2, d_model=64, n_heads=4, head_dim=16, d_ff=96, vocab_size=128).resolve()
    assert from_model_config(dataclasses.replace(base, norm_position="post", qk_norm_scope="full"),
                             64)["architectures"] == ["Olmo2ForCausalLM"]
    for bad, match in [({"norm_position": "post"}, "post-norm blocks or a full-width QK-norm without the other"),
                       ({"qk_norm_scope": "full"}, "without the other"),
                       ({"norm_position": "post", "qk_norm": False}, "without the other"),
                       ({"sliding_window": 16, "norm_position": "post", "qk_norm_scope": "full"},
                        "this sliding window"),
                       ({"qk_norm": False, "qkv_bias": True, "sliding_window": 8, "layer_types": ["sliding", "full"]},
                        "windows on blocks other than the last ones"),
                       ({"qk_norm": False, "sliding_window": 8, "layer_types": ["sliding", "full"]},
                        "this sliding window"),
                       ({"norm_position": "sandwich"}, "part of Gemma's block without the rest"),
                       ({"activation": "gelu_tanh"}, "part of Gemma's block without the rest"),
                       ({"logit_softcap": 30.0}, "part of Gemma's block without the rest"),
                       ({"norm_position": "post", "qk_norm_scope": "full", "qkv_bias": True}, "more than one of"),
                       ({"ffn_gated": False, "qk_norm": False}, "part of GPT-NeoX's block without the rest"),
                       (dict(NEOX, n_kv_heads=2), "GQA or a head_dim other than"),
                       (dict(NEOX, activation="silu"), "a silu MLP"),
                       ({"o_bias": True, "qk_norm": False}, "a bias on O without Q/K/V biases"),
                       ({"qkv_bias": True, "ffn_bias": True, "qk_norm": False}, "these biases"),
                       ({"qkv_bias": True, "o_bias": True, "qk_norm": False, "sliding_window": 8}, "these biases"),
                       ({"qkv_clip": 8.0, "qk_norm": False}, "part of OLMo 1's block"),
                       ({"norm_type": "layer_noaffine", "norm_eps": 1e-6, "qk_norm": False}, "model.norm_eps=1e-06"),
                       (dict(NEOX, n_kv_heads=4, qkv_clip=8.0), "clamping"),
                       ({"norm_type": "layer", "qk_norm": False, "o_bias": True, "qkv_bias": True},
                        "LayerNorms in a SwiGLU block with more than StableLM's"),
                       (dict(MOE, qk_norm=False, moe_norm_topk=False), "always renormalises its top k"),
                       (dict(MOE, qk_norm=False, qkv_bias=True, o_bias=True), "more than Mixtral has"),
                       (dict(MOE, norm_type="layer"), "a mixture of experts in a block other than"),
                       (dict(MOE, qkv_bias=True), "Q/K/V and O biases both or neither"),
                       (dict(MOE, qk_norm_scope="full", sliding_window=8), "a sliding window in OLMoE's block"),
                       (dict(MOE, qkv_clip=8.0), "clamping, or windows on blocks other than the last ones"),
                       (dict(MOE, moe_shared_ff=64), "a shared expert in a block other than Qwen2-MoE's"),
                       (dict(MOE, moe_shared_ff=64, qk_norm=False, qkv_bias=True, o_bias=True),
                        "a shared expert in a block other than Qwen2-MoE's")]:
        with pytest.raises(UserError, match=match):
            from_model_config(dataclasses.replace(base, **bad), 64)


# ---------------------------------------------------------------- bad input: named errors that say what to change

def test_bad_folders_are_named_errors(hf_dirs, tmp_path, capsys):
    folder, _ = hf_dirs["qwen3_gqa"]

    def fails(path, match, extra=()):
        with pytest.raises(UserError, match=match):
            _load(_teacher_cfg(tmp_path, path, extra))

    fails(tmp_path / "nowhere", "does not exist")
    bad = tmp_path / "gpt2"
    shutil.copytree(folder, bad)
    edit_config(bad, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    fails(bad, "architecture.*GPT2LMHeadModel.*not supported")
    wrong = tmp_path / "wrong_width"
    shutil.copytree(folder, wrong)
    edit_config(wrong, intermediate_size=128)
    fails(wrong, r"mlp.gate_proj.weight has shape \(96, 64\).*config contradicts the weights")
    deeper = tmp_path / "deeper"
    shutil.copytree(folder, deeper)
    edit_config(deeper, num_hidden_layers=3)
    fails(deeper, "missing from the checkpoint.*layers.2")
    heads = tmp_path / "heads12"  # 6 key/value heads at TP=4: neither a share per rank nor one replicated
    shutil.copytree(folder, heads)
    edit_config(heads, num_attention_heads=12, num_key_value_heads=6)
    fails(heads, r"tp_size=4 neither divides the teacher.s n_kv_heads=6 nor is a multiple .*from .*split over TP",
          ["parallel.tp_size=4"])
    shared = tmp_path / "qwen2_moe_shared"  # a shared expert TP cannot split (the student's own widths do split)
    shutil.copytree(hf_dirs["qwen2_moe_gqa"][0], shared)
    edit_config(shared, shared_expert_intermediate_size=66)
    fails(shared, r"parallel.tp_size=4 does not divide the teacher.s moe_shared_ff=66 \(the teacher, from ",
          ["parallel.tp_size=4"])
    fails(hf_dirs["gemma2_gqa_tied"][0], r"caps its logits \(logit_softcap=3.0.*set distill.fused=false",
          ["distill.fused=true"])
    fused = tmp_path / "phi3_kv"  # Phi-3's fused Q/K/V rows do not split as config.json says
    shutil.copytree(hf_dirs["phi3_gqa"][0], fused)
    edit_config(fused, num_key_value_heads=4)
    fails(fused, r"qkv_proj.weight has shape \(128, 64\), but config.json implies 192 rows \(q_proj 64, k_proj 64")
    dense_blocks = tmp_path / "qwen3_moe_dense"  # Qwen3-MoE with dense blocks among the mixtures
    shutil.copytree(hf_dirs["qwen3_moe_gqa_tied"][0], dense_blocks)
    edit_config(dense_blocks, mlp_only_layers=[1])
    fails(dense_blocks, r"dense blocks among the sparse ones \(mlp_only_layers=\[1\]")
    for experts, match in ((2, r"holds tensors the config does not account for \(.*block_sparse_moe\.experts\.2\."),
                           (8, r"experts.w1.weight stacks 8 tensors but 4 are missing .*expert count")):
        count = tmp_path / f"mixtral_{experts}"  # config.json's expert count contradicts the weights
        shutil.copytree(hf_dirs["mixtral_gqa"][0], count)
        edit_config(count, num_local_experts=experts)
        fails(count, match)
    biased = tmp_path / "mistral_bias"  # MistralForCausalLM ignores attention_bias; we do not guess
    shutil.copytree(hf_dirs["mistral_gqa"][0], biased)
    edit_config(biased, attention_bias=True)
    fails(biased, r"attention_bias=true is not supported for MistralForCausalLM \(read for .*LlamaForCausalLM.* and "
                  "GPT-NeoX")
    partial = tmp_path / "llama_partial"  # transformers rotates part of each head for Phi-3 only
    shutil.copytree(hf_dirs["llama_mha"][0], partial)
    edit_config(partial, partial_rotary_factor=0.75)
    fails(partial, "partial_rotary_factor=0.75 is not supported for LlamaForCausalLM")
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    dynamic = tmp_path / "llama_dynamic"
    shutil.copytree(hf_dirs["llama_mha"][0], dynamic)
    edit_config(dynamic, rope_parameters=rope)
    fails(dynamic, "rope type 'dynamic' is not supported")
    edit_config(dynamic, rope_parameters=dict(rope, rope_type="longrope", short_factor=[1.0] * 8,
                                              long_factor=[2.0] * 8))
    fails(dynamic, "'longrope' is supported for Phi3ForCausalLM only")
    half = tmp_path / "phi3_no_long_factor"
    shutil.copytree(hf_dirs["phi3_gqa"][0], half)
    rope = json.loads((half / "config.json").read_text())["rope_parameters"]
    edit_config(half, rope_parameters={k: v for k, v in rope.items() if k != "long_factor"})
    fails(half, "required key 'long_factor' is missing")
    odd = tmp_path / "phi3_odd"  # int(16 x 0.3) = 4 dims would do; 0.1 rotates 1, which no RoPE pairs up
    shutil.copytree(hf_dirs["phi3_gqa"][0], odd)
    edit_config(odd, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.1})
    fails(odd, "rope_fraction=0.1 must be in")
    relu = tmp_path / "gemma3_relu"
    shutil.copytree(hf_dirs["gemma3_gqa_tied"][0], relu)
    edit_config(relu, hidden_activation="relu")
    fails(relu, "hidden_activation='relu' is not supported")
    edit_config(relu, hidden_activation="gelu_pytorch_tanh", use_bidirectional_attention=True)
    fails(relu, "use_bidirectional_attention=True is not supported")
    # a sharded checkpoint with a shard gone
    make_hf(tmp_path / "sharded", "qwen3", 2, False, max_shard_size="40KB")
    next(iter(sorted((tmp_path / "sharded").glob("model-*.safetensors")))).unlink()
    fails(tmp_path / "sharded", "weight shards that model.safetensors.index.json lists are missing")
    # a truncated file
    cut = tmp_path / "cut"
    shutil.copytree(folder, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    fails(cut, "truncated")
    # the CLI says the same, with exit status 2
    assert main(["import", f"hf:{bad}", "-o", str(tmp_path / "x")]) == 2
    assert "not supported" in capsys.readouterr().err


# ---------------------------------------------------------------- tokenizer and vocabulary

@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from megadistill.data.tokenizer import train_bpe
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "distil", "teacher", "student", "scaling", "law", "token"]
    corpus.write_text("\n".join(json.dumps({"text": " ".join(words[(i * 7 + j) % 10] for j in range(40))})
                                for i in range(200)) + "\n")
    a, b = train_bpe([str(corpus)], str(root / "a"), 272), train_bpe([str(corpus)], str(root / "b"), 280)
    return corpus, root / "a", root / "b", len(a), len(b)


def test_padded_teacher_vocab_is_cut_and_masked(tokenizers, tmp_path):
    """Teacher vocab 320 (padded), tokenizer n ids, student vocab 288: rows >= 288 dropped, rows [n, 288) masked."""
    from megadistill.train.teacher import MASKED_LOGIT
    corpus, tok_a, _, n_a, _ = tokenizers
    model = make_hf(tmp_path / "padded", "qwen3", 2, False, vocab=320, seed=5)
    for f in tok_a.iterdir():
        shutil.copyfile(f, tmp_path / "padded" / f.name)
    data = ["data.source=files", f"data.files=[{corpus}]", f"data.tokenizer={tok_a}", "model.vocab_size=288"]
    teacher = _load(_teacher_cfg(tmp_path, tmp_path / "padded", data))
    ref = hf_logits(model, IDS)
    with torch.no_grad():
        ours = teacher.module(IDS)
    assert ours.shape[-1] == 288
    assert_close(ours[..., :n_a], ref[..., :n_a])
    assert (ours[..., n_a:] == MASKED_LOGIT).all()
    with pytest.raises(UserError, match="distill.fused=false"):
        _load(_teacher_cfg(tmp_path, tmp_path / "padded", data + ["distill.fused=true"]))
    bare = tmp_path / "bare"  # no tokenizer beside the weights and none for the data: padding cannot be told apart
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(tmp_path / "padded" / f, bare / f)
    with pytest.raises(UserError, match="set data.tokenizer so the teacher's padding rows"):
        _load(_teacher_cfg(tmp_path, bare, ["model.vocab_size=288"]))
    with pytest.raises(UserError, match="< model.vocab_size=384.*set model.vocab_size=320"):
        _load(_teacher_cfg(tmp_path, tmp_path / "padded", ["model.vocab_size=384"]))


def test_tokenizer_mismatch_is_an_error_before_compute(tokenizers, tmp_path):
    corpus, tok_a, tok_b, n_a, n_b = tokenizers
    make_hf(tmp_path / "t", "llama", 2, True, vocab=320, seed=6)
    for f in tok_b.iterdir():
        shutil.copyfile(f, tmp_path / "t" / f.name)
    data = ["data.source=files", f"data.files=[{corpus}]", f"data.tokenizer={tok_a}", "model.vocab_size=320"]
    from megadistill.train.teacher import teacher_source
    with pytest.raises(UserError, match=f"teacher's tokenizer .*{n_b} tokens.* differs from the student's"):
        teacher_source(_teacher_cfg(tmp_path, tmp_path / "t", data))


def test_hf_recipe_configs_validate(hf_dirs, tmp_path):
    """configs/hf/*.yaml with the paths the README passes: valid configs of the intended shape."""
    repo = Path(__file__).resolve().parents[1]
    folder = hf_dirs["qwen3_gqa"][0]
    paths = [f"data.tokenizer={tmp_path}", f"data.files=[{tmp_path / 'corpus.jsonl'}]"]
    cfg = config.load([str(repo / "configs/hf/distill.yaml")], [f"distill.teacher=hf:{folder}", *paths])
    assert (cfg.train.mode, cfg.model.n_kv_heads, cfg.model.vocab_size) == ("distill", 4, 151936)
    cfg = config.load([str(repo / "configs/hf/init.yaml")], [f"model.size=hf:{folder}", f"train.init_from=hf:{folder}",
                                                            *paths])
    assert (cfg.model.n_kv_heads, cfg.model.head_dim, cfg.model.vocab_size) == (2, 24, 128)


def test_export_hf_carries_the_runs_tokenizer(tokenizers, tmp_path):
    """A run on HF-tokenized files exports its tokenizer beside the weights; transformers loads both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megadistill.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    corpus, tok_a, _, n_a, _ = tokenizers
    _train_tiny(tmp_path / "run", ["data.source=files", f"data.files=[{corpus}]", f"data.tokenizer={tok_a}",
                                   "model.vocab_size=288"])
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer(str(tok_a))) and len(tok) == n_a
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert model.config.eos_token_id == tok.eos_token_id and model.config.vocab_size == 288
    ids = tok("alpha beta gamma", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


def _cache_worker(rank, world, root, folder):
    from megadistill.train import teacher_cache as tc
    from megadistill.train.trainer import train
    root = Path(root)

    def student(name, extra):
        return config.load([], tiny_overrides(root / name, "distill", ["train.steps=4", "train.eval_tokens=256",
                                                                       *extra]))

    m = tc.write_cache(student("w", [f"distill.teacher=hf:{folder}"]), f"hf:{folder}", str(root / "cache"),
                       top_k=128, shard_windows=16)
    out = {"complete": m["complete"]}
    for name, ref in (("online", f"hf:{folder}"), ("cached", f"cache:{root / 'cache'}")):
        train(student(name, [f"distill.teacher={ref}"]))
        out[name] = [json.loads(line)["loss"] for line in open(root / name / "train.jsonl")]
    return out


@pytest.mark.multiproc
def test_teacher_cache_from_an_hf_teacher(hf_dirs, tmp_path):
    """teacher-cache takes an hf: teacher; with k = V the cached student's curve equals the online one's."""
    out = run_distributed(_cache_worker, 1, str(tmp_path), str(hf_dirs["qwen3_gqa"][0]), timeout=600)[0]
    assert out["complete"]
    assert_close(torch.tensor(out["cached"]), torch.tensor(out["online"]), atol=2e-5, rtol=0)


# ---------------------------------------------------------------- published configs: our count = transformers'

PUBLISHED = {  # the shape keys of each family's published config.json (weights are never needed: meta devices)
    "Qwen2.5-7B": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                   "max_position_embeddings": 131072, "tie_word_embeddings": False, "use_sliding_window": False},
    "Llama-3.1-8B": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False},
    "Mistral-7B-v0.1": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "vocab_size": 32000, "rope_theta": 10000.0, "sliding_window": 4096},
    "gemma-2-9b": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
                   "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000, "query_pre_attn_scalar": 256,
                   "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                   "hidden_activation": "gelu_pytorch_tanh"},
    "Phi-3-mini-4k": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
                      "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
                      "num_key_value_heads": 32, "vocab_size": 32064, "sliding_window": 2047,
                      "max_position_embeddings": 4096, "pad_token_id": 32000},
    "pythia-12b": {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 5120,
                   "intermediate_size": 20480, "num_hidden_layers": 36, "num_attention_heads": 40,
                   "vocab_size": 50688, "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True,
                   "hidden_act": "gelu", "layer_norm_eps": 1e-5, "tie_word_embeddings": False},
    "OLMo-7B-0424": {"architectures": ["OlmoForCausalLM"], "model_type": "olmo", "hidden_size": 4096,
                     "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 32, "vocab_size": 50304, "clip_qkv": 8.0, "tie_word_embeddings": False,
                     "pad_token_id": 1, "eos_token_id": 50279},
    "stablelm-2-1_6b": {"architectures": ["StableLmForCausalLM"], "model_type": "stablelm", "hidden_size": 2048,
                        "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 32,
                        "num_key_value_heads": 32, "vocab_size": 100352, "use_qkv_bias": True,
                        "partial_rotary_factor": 0.25, "layer_norm_eps": 1e-5, "tie_word_embeddings": False},
    "SmolLM3-3B": {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "hidden_size": 2048,
                   "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
                   "num_key_value_heads": 4, "vocab_size": 128256, "rope_theta": 5e6, "tie_word_embeddings": True,
                   "pad_token_id": 128004},
    "Mixtral-8x7B": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2,
                     "rope_theta": 1e6, "sliding_window": None},
    "Qwen3-30B-A3B": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                      "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
                      "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
                      "mlp_only_layers": [], "tie_word_embeddings": False, "rope_theta": 1e6},
    "OLMoE-1B-7B": {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048,
                    "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
                    "num_key_value_heads": 16, "vocab_size": 50304, "num_experts": 64, "num_experts_per_tok": 8,
                    "norm_topk_prob": False, "clip_qkv": None, "pad_token_id": 1, "eos_token_id": 50279},
    "Qwen1.5-MoE-A2.7B": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
                          "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
                          "num_key_value_heads": 16, "vocab_size": 151936, "moe_intermediate_size": 1408,
                          "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
                          "norm_topk_prob": False, "decoder_sparse_step": 1, "tie_word_embeddings": False,
                          "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_count_as_transformers_builds_them(name):
    """Each family's published config.json: our parameter count (plan-memory's) and our model built from it (on the
    meta device) hold exactly the weights transformers' own model of that config holds."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from megadistill.hf.config import to_model_config
    from megadistill.model.sizes import active_params, params_of
    from megadistill.model.transformer import Transformer
    from megadistill.parallel.layers import LayerFactory
    hf = PUBLISHED[name]
    with torch.device("meta"):
        theirs = AutoModelForCausalLM.from_config(CONFIG_MAPPING[hf["model_type"]](**{
            k: v for k, v in hf.items() if k not in ("architectures", "model_type")}))
    n_theirs = sum(p.numel() for p in theirs.parameters())  # a tied head is one parameter
    m = to_model_config(hf, name)
    n, _ = params_of(m)
    assert n + (1 if m.tie_embeddings else 2) * m.vocab_size * m.d_model == n_theirs
    ours = Transformer(m, LayerFactory(device="meta"))
    assert sum(p.numel() for p in ours.parameters()) == n_theirs
    vocab = (1 if m.tie_embeddings else 2) * m.vocab_size * m.d_model
    published_active = {"Mixtral-8x7B": 12.9, "OLMoE-1B-7B": 1.3, "Qwen1.5-MoE-A2.7B": 2.7}  # the cards' "B active"
    if name == "Qwen1.5-MoE-A2.7B":  # its card: 14.3B in all, shared expert and gates included
        assert round((n + vocab) / 1e9, 1) == 14.3
    if name in published_active:  # what F(N) and MFU count: the routed experts only
        assert round((active_params(m) + vocab) / 1e9, 1) == published_active[name]
    assert (active_params(m) < n) == bool(m.moe_experts)
