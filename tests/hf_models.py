"""Tiny random Hugging Face Qwen3 / Qwen2 / Llama / Mistral / Phi-3 / OLMo 2 / Gemma 3 / SmolLM3 checkpoints written
locally (no download) for the interop tests."""
import json
from pathlib import Path

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# name -> (family, n_kv_heads, tied): GQA and MHA, tied and untied, QK-norm (qwen3) and not (llama), Q/K/V biases
# and yarn RoPE (qwen2), sliding windows shorter than the interop tests' 24 tokens and the tiny runs' 32 (mistral,
# phi3), fused Q/K/V and gate/up matrices, partial RoPE and longrope (phi3), post-norms and a QK-norm over all heads
# (olmo2),
# sandwich norms with 1 + w gains, GeGLU, scaled embeddings, a sliding and a full block with RoPEs of their own
# (gemma3), the same without QK-norm and with softcapped attention and output logits (gemma2), a block without RoPE
# (smollm3), one key/value head, replicated over TP=2 (qwen2_mqa), GPT-NeoX / Pythia's LayerNorms, plain MLP,
# biases and (non-)parallel residual (neox), Llama's attention_bias and mlp_bias (llama_biases), OLMo 1's
# parameter-free LayerNorms and clamped q / k / v (olmo1), LayerNorms with biases in a SwiGLU block (stablelm),
# mixtures of experts with and without renormalised top-2 weights (mixtral, qwen3_moe, olmoe), and with a gated
# shared expert beside Qwen2's attention (qwen2_moe)
VARIANTS = {"qwen3_gqa": ("qwen3", 2, False), "qwen3_mha_tied": ("qwen3", 4, True),
            "llama_gqa_tied": ("llama", 2, True), "llama_mha": ("llama", 4, False),
            "qwen2_gqa_tied": ("qwen2", 2, True), "mistral_gqa": ("mistral", 2, False),
            "phi3_gqa": ("phi3", 2, False), "olmo2_gqa": ("olmo2", 2, False),
            "gemma3_gqa_tied": ("gemma3", 2, True), "smollm3_gqa_tied": ("smollm3", 2, True),
            "gemma2_gqa_tied": ("gemma2", 2, True), "qwen2_mqa": ("qwen2", 1, False),
            "neox_parallel": ("neox", 4, False), "neox_sequential_tied": ("neox_seq", 4, True),
            "llama_biases": ("llama_bias", 2, False), "olmo1_tied": ("olmo", 4, True),
            "stablelm_gqa": ("stablelm", 2, False), "mixtral_gqa": ("mixtral", 2, False),
            "qwen3_moe_gqa_tied": ("qwen3_moe", 2, True), "olmoe_mha": ("olmoe", 4, False),
            "qwen2_moe_gqa": ("qwen2_moe", 2, False)}
MOE_WIDTH = 32  # each expert's hidden width
SHARED_WIDTH = 48  # Qwen2-MoE's shared expert's
NEOX_ROTARY = 0.25  # Pythia's rotary_pct: RoPE on the first 4 of each head's 16 dims
OLMO_CLIP = 0.4  # OLMo 1's clip_qkv (OLMo-7B-0424: 8), here below the largest projections
GEMMA2_CAPS = (2.0, 3.0)  # attention, output logits: small enough to bite on the tiny model (Gemma 2: 50, 30)
GEMMA3_WINDOW = 8
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
QWEN2_YARN = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32768}
PHI3_PARTIAL = 0.5  # Phi-4-mini: 0.75
PHI3_ORIGINAL_MAX = 16  # longrope's switch: the interop tests' 24-token sequences take the long factors
MISTRAL_WINDOW = 16  # attention windows: each token sees itself and the window - 1 tokens before it
PHI3_WINDOW = 20


def make_hf(folder, family="qwen3", n_kv_heads=2, tied=False, vocab=128, seed=0, max_shard_size=None,
            dtype=torch.float32, n_layers=2, d_model=64):
    """Save a random tiny model (every weight, norm gains included, drawn at random) with save_pretrained."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Olmo2Config, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=vocab, hidden_size=d_model, intermediate_size=96, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=n_kv_heads, tie_word_embeddings=tied,
                  max_position_embeddings=256)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=24, rope_theta=10000.0, rms_norm_eps=1e-6, **common))
    elif family == "qwen2":  # biases on Q, K, V (drawn at random below like every weight); Qwen2.5's long-context
        # yarn: on 16 rotary dims, frequencies 0-2 kept, 3-4 blended, 5-7 divided by 4; cos / sin x (0.1 ln 4 + 1)
        model = Qwen2ForCausalLM(Qwen2Config(rope_parameters=dict(QWEN2_YARN), rms_norm_eps=1e-6, **common))
    elif family == "phi3":  # qkv_proj [(4 + 2 + 2) x 16, 64], gate_up_proj [2 x 96, 64], RoPE on 8 of 16 dims,
        # longrope: the short factors up to PHI3_ORIGINAL_MAX tokens, the long ones beyond (cos / sin x sqrt(2))
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": PHI3_PARTIAL,
                "short_factor": [1.0, 1.3, 2.0, 3.5], "long_factor": [1.5, 2.5, 6.0, 11.0],
                "original_max_position_embeddings": PHI3_ORIGINAL_MAX}
        model = Phi3ForCausalLM(Phi3Config(rms_norm_eps=1e-5, sliding_window=PHI3_WINDOW, pad_token_id=0,
                                           rope_parameters=rope, original_max_position_embeddings=PHI3_ORIGINAL_MAX,
                                           **common))
    elif family == "olmo2":  # q_norm [4 x 16], k_norm [n_kv x 16]; post_attention / post_feedforward norms only
        model = Olmo2ForCausalLM(Olmo2Config(rope_theta=500000.0, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1,
                                             **common))
    elif family in ("gemma3", "gemma3_mm"):  # query_pre_attn_scalar != head_dim: the attention scale is checked too
        kinds = ["sliding_attention", "full_attention"] * (n_layers // 2) + ["sliding_attention"] * (n_layers % 2)
        text = Gemma3TextConfig(
            head_dim=16, query_pre_attn_scalar=24, sliding_window=GEMMA3_WINDOW, rms_norm_eps=1e-6, layer_types=kinds,
            rope_parameters={k: dict(v) for k, v in GEMMA3_ROPE.items()}, pad_token_id=0, eos_token_id=1,
            bos_token_id=2, **common)
        if family == "gemma3":
            model = Gemma3ForCausalLM(text)
        else:  # Gemma 3 4B-27B's layout: a vision tower beside the text model, the text config nested
            from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig
            vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14)
            model = Gemma3ForConditionalGeneration(Gemma3Config(
                text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                boi_token_index=vocab - 8, eoi_token_index=vocab - 7, image_token_index=vocab - 6))
    elif family == "gemma2":  # first block sliding, second full (every other, as Gemma 2); both logits capped
        from transformers import Gemma2Config, Gemma2ForCausalLM
        model = Gemma2ForCausalLM(Gemma2Config(
            head_dim=16, query_pre_attn_scalar=24, sliding_window=GEMMA3_WINDOW, rms_norm_eps=1e-6, rope_theta=10000.0,
            attn_logit_softcapping=GEMMA2_CAPS[0], final_logit_softcapping=GEMMA2_CAPS[1], pad_token_id=0,
            eos_token_id=1, bos_token_id=2, **common))
    elif family == "smollm3":  # the last block without RoPE (SmolLM3: every 4th)
        from transformers import SmolLM3Config, SmolLM3ForCausalLM
        model = SmolLM3ForCausalLM(SmolLM3Config(rope_theta=5000000.0, rms_norm_eps=1e-6, pad_token_id=0,
                                                 bos_token_id=1, eos_token_id=2,
                                                 no_rope_layers=[1] * (n_layers - 1) + [0], **common))
    elif family in ("neox", "neox_seq"):  # Pythia: LayerNorms, parallel residual, 25% of each head rotated, a
        # plain GELU MLP and biases everywhere; neox_seq: sequential residual and GPT-NeoX-20B's gelu_fast
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        neox = {k: v for k, v in common.items() if k != "num_key_value_heads"}
        seq = family == "neox_seq"
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": NEOX_ROTARY},
            use_parallel_residual=not seq, hidden_act="gelu_fast" if seq else "gelu", layer_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=0, **neox))
    elif family == "olmo":  # OLMo 1: LayerNorms without parameters, q / k / v clamped (small enough to bite)
        from transformers import OlmoConfig, OlmoForCausalLM
        model = OlmoForCausalLM(OlmoConfig(rope_theta=10000.0, clip_qkv=OLMO_CLIP, pad_token_id=1, eos_token_id=0,
                                           **common))
    elif family == "stablelm":  # StableLM 2 1.6B: LayerNorms (with biases) in a SwiGLU block, Q/K/V biases, 25% RoPE
        from transformers import StableLmConfig, StableLmForCausalLM
        model = StableLmForCausalLM(StableLmConfig(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": NEOX_ROTARY},
            use_qkv_bias=True, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, **common))
    elif family == "qwen2_moe":  # Qwen1.5-MoE: Q/K/V biases, 4 experts top 2 (not renormalised) and a shared expert
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
        moe = {k: v for k, v in common.items() if k != "intermediate_size"}
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            intermediate_size=96, moe_intermediate_size=MOE_WIDTH, shared_expert_intermediate_size=SHARED_WIDTH,
            num_experts=4, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-6, **moe))
    elif family in ("mixtral", "qwen3_moe", "olmoe"):  # mixtures of 4 experts (width 32), top 2: Mixtral
        # renormalises the two weights, Qwen3-MoE as norm_topk_prob (on here), OLMoE not (its default); OLMoE's
        # QK-norm spans all heads' dims and clamps q / k / v after it
        moe = {k: v for k, v in common.items() if k != "intermediate_size"}
        if family == "mixtral":
            from transformers import MixtralConfig, MixtralForCausalLM
            model = MixtralForCausalLM(MixtralConfig(intermediate_size=MOE_WIDTH, num_local_experts=4,
                                                     num_experts_per_tok=2, rope_theta=1e6, **moe))
        elif family == "qwen3_moe":
            from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
            model = Qwen3MoeForCausalLM(Qwen3MoeConfig(moe_intermediate_size=MOE_WIDTH, intermediate_size=96,
                                                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                                       head_dim=16, rope_theta=1e6, **moe))
        else:
            from transformers import OlmoeConfig, OlmoeForCausalLM
            model = OlmoeForCausalLM(OlmoeConfig(intermediate_size=MOE_WIDTH, num_experts=4, num_experts_per_tok=2,
                                                 clip_qkv=OLMO_CLIP, rope_theta=10000.0, pad_token_id=1,
                                                 eos_token_id=0, **moe))
    elif family == "llama_bias":  # attention_bias (Q, K, V, O) and mlp_bias (gate, up, down)
        model = LlamaForCausalLM(LlamaConfig(rope_theta=500000.0, rms_norm_eps=1e-5, attention_bias=True,
                                             mlp_bias=True, **common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(head_dim=20, rope_theta=10000.0, rms_norm_eps=1e-5,
                                                 sliding_window=MISTRAL_WINDOW, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0, rms_norm_eps=1e-5,
                                             **common))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    model = model.to(dtype).eval()
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kw)
    return model


def to_bin(src, dst, shards=1):
    """Rewrite the checkpoint in `src` as pytorch_model.bin (shards > 1: pytorch_model-0000i-of-0000n.bin files and
    pytorch_model.bin.index.json), the format of older checkpoints (Pythia's intermediate revisions)."""
    import shutil

    from safetensors.torch import load_file
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    shutil.copyfile(src / "config.json", dst / "config.json")
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    names = sorted(state)
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    weight_map = {}
    for i in range(shards):
        part = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in names[i::shards]}, dst / part)
        weight_map.update({k: part for k in names[i::shards]})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def edit_config(folder, **changes):
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
