"""Hugging Face config.json (Qwen3 / Qwen2 / Llama / Mistral / Phi-3 / OLMo 1 and 2 / Gemma 2 / Gemma 3 / SmolLM3 /
GPT-NeoX and Pythia / StableLM; the mixtures of experts Mixtral / Qwen3-MoE / OLMoE) <-> our ModelConfig, with a
named error for anything we cannot run."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from megadistill.config import ModelConfig
from megadistill.errors import UserError

# architecture -> (model_type, has QK-norm, has Q/K/V biases). Qwen2 (and Qwen2.5, the same architecture) always
# has the biases and no attention_bias key; Mistral is Llama's computation plus an optional sliding window; Phi-3
# (and Phi-4) too, with Q/K/V and gate/up each stored as one matrix (megadistill.hf.weights splits them). OLMo 2
# normalises each sublayer's output instead of its input and its QK-norm spans all heads' dims (OLMO2).
ARCHITECTURES = {"Qwen3ForCausalLM": ("qwen3", True, False), "Qwen2ForCausalLM": ("qwen2", False, True),
                 "LlamaForCausalLM": ("llama", False, False), "MistralForCausalLM": ("mistral", False, False),
                 "Phi3ForCausalLM": ("phi3", False, False), "Olmo2ForCausalLM": ("olmo2", True, False),
                 "Gemma2ForCausalLM": ("gemma2", False, False), "Gemma3ForCausalLM": ("gemma3_text", True, False),
                 "SmolLM3ForCausalLM": ("smollm3", False, False), "GPTNeoXForCausalLM": ("gpt_neox", False, True),
                 "OlmoForCausalLM": ("olmo", False, False), "StableLmForCausalLM": ("stablelm", False, False),
                 "MixtralForCausalLM": ("mixtral", False, False), "Qwen3MoeForCausalLM": ("qwen3_moe", True, False),
                 "OlmoeForCausalLM": ("olmoe", True, False), "Qwen2MoeForCausalLM": ("qwen2_moe", False, True)}
# mixtures of experts: (expert width key, renormalise the top k by default); the expert count is num_experts or
# num_local_experts (Mixtral's name, which transformers v5 also writes for the others). Mixtral always renormalises,
# Qwen3-MoE, OLMoE and Qwen2-MoE as norm_topk_prob says. OLMoE's QK-norm spans all heads' dims, as OLMo 2's.
# Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (Q/K/V biases: qkv_bias, on unless set) and a
# shared expert of width shared_expert_intermediate_size beside the routed ones, gated by sigmoid(w . x)
MOE = {"mixtral": ("intermediate_size", True), "qwen3_moe": ("moe_intermediate_size", False),
       "olmoe": ("intermediate_size", False), "qwen2_moe": ("moe_intermediate_size", False)}
# families whose transformers class rotates part of each head -> its default share (GPT-NeoX's rotary_pct and
# StableLM's partial_rotary_factor: 25%). StableLM 2 / StableLM-3B: LayerNorms with biases in a SwiGLU block,
# use_qkv_bias
PARTIAL_ROPE = {"phi3": 1.0, "gpt_neox": 0.25, "stablelm": 0.25}
# OLMo 1 (OLMo-1B / 7B, their intermediate revisions): LayerNorms without gain or bias (eps fixed at 1e-5 by
# transformers), q / k / v optionally clamped (clip_qkv)
OLMO1_EPS = 1e-5
# GPT-NeoX / Pythia: LayerNorms, a plain MLP with biases, parallel residual (use_parallel_residual, default on), 25% of
# each head rotated (rotary_pct), biases on Q/K/V and O (attention_bias, default on); no GQA, head_dim = d / heads
NEOX = {"norm_type": "layer", "ffn_gated": False, "ffn_bias": True}
# config keys -> families whose transformers class honours them: attention_bias (Q, K, V and O) as our qkv_bias and
# o_bias, mlp_bias (gate, up, down) as ffn_bias
BIASED = {"attention_bias": ("llama", "qwen3", "olmo", "qwen3_moe", "olmoe"), "mlp_bias": ("llama",)}
OLMO2 = {"norm_position": "post", "qk_norm_scope": "full"}
# Gemma 2 / 3: norms before and after each sublayer with gains 1 + w, GeGLU, embeddings x sqrt(d), attention scaled
# by query_pre_attn_scalar; Gemma 2 windows every other block and caps attention and output logits, Gemma 3 windows 5
# of every 6 blocks with RoPE of their own (base 10000, unscaled) and has a QK-norm
GEMMA = {"norm_position": "sandwich", "norm_offset": 1.0}
GEMMAS = ("gemma2", "gemma3_text")
# transformers' name -> model.activation (gelu_new / gelu_fast: the tanh approximation too)
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_fast": "gelu_tanh"}
LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}
TIED_BY_DEFAULT = ("gemma2", "gemma3_text", "smollm3")  # transformers' default without tie_word_embeddings
# Gemma 3 4B-27B ship as Gemma3ForConditionalGeneration: the text model's config is `text_config`, which lists only
# the keys that differ from Gemma3TextConfig's defaults (these; tests/test_hf_interop.py checks them against it)
MULTIMODAL = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
GEMMA3_TEXT_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "sliding_window": 4096,
                        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072}
WINDOWED = ("mistral", "phi3", "mixtral")  # sliding_window applies whenever set (Qwen2/3: with use_sliding_window)
HF_PREFIX = "hf:"


def hf_path(ref: str) -> Optional[Path]:
    """`hf:PATH` -> PATH (None for any other reference)."""
    return Path(ref[len(HF_PREFIX):]).expanduser() if isinstance(ref, str) and ref.startswith(HF_PREFIX) else None


def read_config(folder: Path) -> Dict:
    f = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise UserError(f"Hugging Face model folder {str(folder)!r} does not exist: pass hf:PATH to a local folder "
                        "holding config.json and the safetensors weights (nothing is downloaded)")
    if not f.is_file():
        raise UserError(f"{f} is missing: {folder} is not a Hugging Face model folder (config.json + *.safetensors)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f} is not valid JSON ({e})") from None


def _rope(hf: Dict, where: str) -> Dict:
    """RoPE theta and scaling from either layout: transformers v5 `rope_parameters`, or v4 rope_theta + rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rope_base": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), "rope_scaling": kind}
    if kind == "default":
        return out
    if kind == "longrope":  # Phi-3.5 / Phi-4-mini; v4 configs keep original_max_position_embeddings at the top level
        orig = int(params.get("original_max_position_embeddings") or hf["original_max_position_embeddings"])
        factor = float(params.get("factor") or hf["max_position_embeddings"] / orig)  # transformers' default
        attention = params.get("attention_factor") or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig)))
        return dict(out, rope_original_max_position=orig, rope_attention_factor=float(attention),
                    rope_short_factor=[float(f) for f in params["short_factor"]],
                    rope_long_factor=[float(f) for f in params["long_factor"]])
    if kind == "yarn":  # transformers: a top-level original_max_position_embeddings wins, then the dict's, then
        # max_position_embeddings; factor defaults to their ratio, the attention factor to YaRN's 0.1 ln(factor) + 1
        orig = int(hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or hf["max_position_embeddings"])
        factor = float(params.get("factor") or hf["max_position_embeddings"] / orig)

        def mscale(f: float, m: float = 1.0) -> float:
            return 1.0 if f <= 1 else 0.1 * m * math.log(f) + 1.0

        attention = params.get("attention_factor")
        if attention is None:
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        return dict(out, rope_factor=factor, rope_original_max_position=orig, rope_attention_factor=float(attention),
                    rope_beta_fast=float(params.get("beta_fast") or 32),
                    rope_beta_slow=float(params.get("beta_slow") or 1),
                    rope_truncate=bool(params.get("truncate", True)))
    if kind not in ("linear", "llama3"):
        raise UserError(f"{where}: rope type {kind!r} is not supported (supported: default, linear, llama3, yarn, "
                        "and longrope for Phi-3)")
    out["rope_factor"] = float(params["factor"])
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_position=int(params["original_max_position_embeddings"]))
    return out


def _windows(hf: Dict, model_type: str, nope: List[int], where: str) -> Tuple[int, List[str]]:
    """(sliding window, per-block kinds: [] when every block is alike) as transformers reads them: Mistral / Phi-3
    window every block; Qwen2 / Qwen3 with use_sliding_window the blocks from max_window_layers on, SmolLM3 with it
    its NoPE blocks (`nope`); Gemma 2 / 3 those its layer_types (or its sliding_window_pattern: every 2nd / 6th full)
    name sliding."""
    n = int(hf.get("num_hidden_layers", 0))
    if model_type in WINDOWED:
        return int(hf.get("sliding_window") or 0), []
    if (model_type in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe") and hf.get("use_sliding_window")
            and hf.get("sliding_window")):
        first = int(hf.get("max_window_layers", n))
        # Qwen2-MoE's default: every other block from the first, below max_window_layers
        default = [i % 2 == 0 and i < first if model_type == "qwen2_moe" else i >= first for i in range(n)]
        types = hf.get("layer_types") or ["sliding_attention" if w else "full_attention" for w in default]
    elif model_type == "smollm3" and hf.get("use_sliding_window") and hf.get("sliding_window"):
        types = hf.get("layer_types") or ["sliding_attention" if i in nope else "full_attention" for i in range(n)]
    elif model_type in GEMMAS and hf.get("sliding_window"):  # Gemma 2: every other block from the first
        pattern = int(hf.get("sliding_window_pattern", 6 if model_type == "gemma3_text" else 2))
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                          for i in range(n)]
    else:
        return 0, []
    if len(types) != n or not set(types) <= set(LAYER_TYPES):
        raise UserError(f"{where}: layer_types must give one of {sorted(LAYER_TYPES)} for each of the {n} layers, "
                        f"got {types}")
    kinds = [LAYER_TYPES[t] for t in types]
    if "sliding" not in kinds:
        return 0, []
    return int(hf["sliding_window"]), ([] if set(kinds) == {"sliding"} else kinds)


def _softcap(hf: Dict, model_type: str, key: str) -> float:
    """A Gemma softcap; absent, transformers' default (Gemma 2: 50 on attention, 30 on logits; Gemma 3: none); null:
    none."""
    gemma2 = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    default = gemma2[key] if model_type == "gemma2" else None
    return hf.get(key, default) or 0.0


def _nope_blocks(hf: Dict, model_type: str) -> List[int]:
    """SmolLM3's blocks without RoPE: no_rope_layers flags each block 1 (RoPE) or 0 (none); absent, every
    no_rope_layer_interval-th block (default 4) has none."""
    if model_type != "smollm3":
        return []
    n = int(hf.get("num_hidden_layers", 0))  # missing: a named error where the model config is built
    flags = hf.get("no_rope_layers") or [int((i + 1) % int(hf.get("no_rope_layer_interval", 4)) != 0)
                                         for i in range(n)]
    return [i for i, has_rope in enumerate(flags) if not has_rope]


def _gemma3_rope(hf: Dict, where: str) -> Tuple[Dict, float]:
    """Gemma 3's two RoPEs: the full blocks' (theta 1e6 by default, possibly linear-scaled) as our rope_*, and the
    sliding blocks' unscaled base. transformers v5 nests them in rope_parameters by layer type; v4 configs keep
    rope_theta / rope_scaling for the full blocks and rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = dict(hf.get("rope_scaling") or {})
        full.setdefault("rope_theta", hf.get("rope_theta", 1e6))
        local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 1e4)}
    full.setdefault("rope_theta", 1e6)
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise UserError(f"{where}: the sliding layers' rope type {local.get('rope_type')!r} is not supported "
                        "(default only)")
    return _rope({"rope_parameters": full}, where), float(local.get("rope_theta", 1e4))


def to_model_config(hf: Dict, where: str = "config.json") -> ModelConfig:
    """A resolved, validated ModelConfig computing the same function as the HF model described by `hf`."""
    archs = hf.get("architectures") or []
    wrapper = next((a for a in archs if a in MULTIMODAL), None)
    if wrapper is not None:  # its text model, whose weights megadistill.hf.weights.open_hf reads under the same names
        text = dict(GEMMA3_TEXT_DEFAULTS, **(hf.get("text_config") or {}))
        text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
        return to_model_config(dict(text, architectures=[MULTIMODAL[wrapper]], model_type="gemma3_text"),
                               f"{where} (text_config of {wrapper})")
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UserError(f"{where}: architecture {archs or hf.get('model_type')!r} is not supported; supported: "
                        f"{sorted(ARCHITECTURES) + sorted(MULTIMODAL)} (convert the model, or distil from a "
                        "megadistill run)")
    model_type, qk_norm, qkv_bias = ARCHITECTURES[arch]
    if hf.get("model_type", model_type) != model_type:
        raise UserError(f"{where}: model_type={hf.get('model_type')!r} contradicts architectures={archs}")
    neox, olmo1, stablelm = model_type == "gpt_neox", model_type == "olmo", model_type == "stablelm"
    moe = _moe(hf, model_type, where)
    biases = {"norm_type": "layer_noaffine", "qkv_clip": float(hf.get("clip_qkv") or 0.0)} if olmo1 else {}
    if stablelm:
        for key in ("use_parallel_residual", "qk_layernorm"):  # StableLM 2 12B: one shared norm, per-head QK-norms
            if hf.get(key):
                raise UserError(f"{where}: {key}=true is not supported for StableLmForCausalLM (StableLM 2 1.6B "
                                "and StableLM-3B have neither)")
        qkv_bias = bool(hf.get("use_qkv_bias"))
        biases = {"norm_type": "layer"}
    if neox:  # attention_bias (default on) covers Q/K/V and O; the MLP always has biases
        qkv_bias = bool(hf.get("attention_bias", True))
        biases = dict(NEOX, o_bias=qkv_bias, parallel_residual=bool(hf.get("use_parallel_residual", True)))
    if model_type == "olmoe":
        biases = {"qk_norm_scope": "full", "qkv_clip": float(hf.get("clip_qkv") or 0.0)}
    if model_type == "qwen2_moe":  # v5 configs name Qwen2's always-on Q/K/V biases; v4 ones (the hub's) do not
        qkv_bias = bool(hf.get("qkv_bias", True))
    for key, families in BIASED.items():
        if hf.get(key) and not neox and model_type not in families:
            raise UserError(f"{where}: {key}=true is not supported for {arch} (read for "
                            f"{', '.join(a for a, v in ARCHITECTURES.items() if v[0] in families)} and GPT-NeoX)")
    if model_type in BIASED["attention_bias"]:  # Q, K, V and O; Llama's mlp_bias: the gate, up and down matrices
        qkv_bias = bool(hf.get("attention_bias"))
        biases.update(o_bias=qkv_bias, ffn_bias=bool(hf.get("mlp_bias")) and model_type == "llama")
    act_key = "hidden_activation" if "hidden_activation" in hf else "hidden_act"  # Gemma names it apart
    activation = ACTIVATIONS.get(hf.get(act_key) or ("gelu" if neox else "silu"))
    if activation is None:
        raise UserError(f"{where}: {act_key}={hf[act_key]!r} is not supported (one of {sorted(ACTIVATIONS)})")
    if hf.get("use_bidirectional_attention"):
        raise UserError(f"{where}: use_bidirectional_attention={hf['use_bidirectional_attention']!r} is not supported "
                        "(causal language models only)")
    nope = _nope_blocks(hf, model_type)
    window, kinds = _windows(hf, model_type, nope, where)
    # transformers v5 keeps it in rope_parameters, v4 configs (most of the hub) at the top level: either counts
    given = [f for f in ((hf.get("rope_parameters") or {}).get("partial_rotary_factor"),
                         hf.get("partial_rotary_factor"), hf.get("rotary_pct") if neox else None) if f is not None]
    # a partial value wins over a 1.0 beside it (v5 rope_parameters / v4 top level); absent: transformers' default
    partial = next((float(f) for f in given if float(f) != 1.0), 1.0 if given else PARTIAL_ROPE.get(model_type, 1.0))
    if partial != 1.0 and model_type not in PARTIAL_ROPE:  # transformers' other families rotate whole heads
        raise UserError(f"{where}: partial_rotary_factor={partial} is not supported for {arch} (Phi-3, GPT-NeoX and "
                        "StableLM only)")
    if neox and "rotary_emb_base" in hf and not hf.get("rope_parameters"):  # v4 configs: GPT-NeoX's name for theta
        hf = dict(hf, rope_theta=hf.get("rope_theta", hf["rotary_emb_base"]))
    try:
        rope, local_base = _gemma3_rope(hf, where) if model_type == "gemma3_text" else (_rope(hf, where), 0.0)
        if rope["rope_scaling"] == "longrope" and model_type != "phi3":
            raise UserError(f"{where}: rope type 'longrope' is supported for Phi3ForCausalLM only, not {arch}")
        n_heads = int(hf["num_attention_heads"])
        d = int(hf["hidden_size"])
        head_dim = d // n_heads if neox else int(hf.get("head_dim") or d // n_heads)  # GPT-NeoX has no head_dim
        scale_dim = int(hf.get("query_pre_attn_scalar", 256))  # = head_dim: the default scale, kept as 0
        family = OLMO2 if model_type == "olmo2" else dict(
            GEMMA, embed_scale=math.sqrt(d), attn_scale_dim=0 if scale_dim == head_dim else scale_dim,
            attn_softcap=float(_softcap(hf, model_type, "attn_logit_softcapping")),
            logit_softcap=float(_softcap(hf, model_type, "final_logit_softcapping"))) if model_type in GEMMAS else {}
        m = ModelConfig(size=None, n_layers=int(hf["num_hidden_layers"]), d_model=d, n_heads=n_heads,
                        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                        head_dim=head_dim, d_ff=int(hf[MOE[model_type][0]] if moe else hf["intermediate_size"]),
                        vocab_size=int(hf["vocab_size"]),
                        norm_eps=(float(hf.get("layer_norm_eps", 1e-5)) if neox or stablelm else OLMO1_EPS
                                  if olmo1 else float(hf.get("rms_norm_eps", 1e-6))),
                        qk_norm=qk_norm, qkv_bias=qkv_bias, sliding_window=window, rope_fraction=partial,
                        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT)), **rope,
                        activation=activation, layer_types=kinds, rope_local_base=local_base,
                        nope_blocks=nope, **family, **biases, **moe)
    except KeyError as e:
        raise UserError(f"{where}: required key {e.args[0]!r} is missing") from None
    m.resolve()
    try:
        m.validate()
    except UserError as e:
        raise UserError(f"{where} gives an invalid model: {e}") from None
    return m


def _moe(hf: Dict, model_type: str, where: str) -> Dict:
    """A mixture of experts' model.moe_* keys ({} for a dense family); every block must be sparse."""
    if model_type not in MOE:
        return {}
    _, renorm = MOE[model_type]
    if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step", 1)) != 1:
        raise UserError(f"{where}: dense blocks among the sparse ones (mlp_only_layers={hf.get('mlp_only_layers')}, "
                        f"decoder_sparse_step={hf.get('decoder_sparse_step')}) are not supported: every block must "
                        "be a mixture of experts")
    try:
        count = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
        out = {"moe_experts": int(count), "moe_top_k": int(hf["num_experts_per_tok"]),
               "moe_norm_topk": True if model_type == "mixtral" else bool(hf.get("norm_topk_prob", renorm))}
        if model_type == "qwen2_moe":
            out["moe_shared_ff"] = int(hf["shared_expert_intermediate_size"] or 0)
        return out
    except KeyError as e:
        raise UserError(f"{where}: required key {e.args[0]!r} is missing") from None


def _other_block_traits(m: ModelConfig) -> bool:
    """Whether m has a trait of the Gemma / OLMo 2 / SmolLM3 / windowed blocks (norms other than pre, scaled
    embeddings or attention, softcaps, sliding windows, blocks without RoPE), none of which the LayerNorm families
    (GPT-NeoX, StableLM, OLMo 1) compute."""
    return bool(m.norm_position != "pre" or m.embed_scale != 1 or m.attn_scale_dim or m.attn_softcap
                or m.logit_softcap or m.sliding_window or m.nope_blocks)


def _neox_refusal(m: ModelConfig) -> Optional[str]:
    """Why GPTNeoXForCausalLM cannot compute m (which has a GPT-NeoX trait), or None."""
    if not (m.norm_type == "layer" and not m.ffn_gated and m.ffn_bias and m.qkv_bias == m.o_bias):
        return ("part of GPT-NeoX's block without the rest (LayerNorms, a plain MLP with biases, biases on Q/K/V "
                "and O both or neither)")
    if (m.n_kv_heads or m.n_heads) != m.n_heads or m.head_dim * m.n_heads != m.d_model:
        return "GQA or a head_dim other than d_model / n_heads in a GPT-NeoX block"
    if (m.qk_norm or m.norm_offset or _other_block_traits(m) or m.activation == "silu"
            or m.rope_scaling not in ("default", "linear") or m.qkv_clip):
        return ("a GPT-NeoX block with a QK-norm, other norm placements or gains, scaled embeddings or attention, "
                "softcaps, windows, blocks without RoPE, a silu MLP, RoPE scaling beyond linear or q / k / v "
                "clamping")
    return None


def _architecture(m: ModelConfig) -> str:
    """The transformers class that computes our model m, or a UserError naming the keys when none does."""
    keys = ", ".join(f"model.{k}={getattr(m, k)!r}" for k in (
        "qk_norm", "qk_norm_scope", "norm_position", "norm_offset", "activation", "embed_scale", "qkv_bias",
        "o_bias", "ffn_bias", "rope_fraction", "rope_scaling", "sliding_window", "layer_types", "rope_local_base",
        "nope_blocks", "attn_softcap", "logit_softcap"))

    def refuse(what: str):
        raise UserError(f"no Hugging Face architecture computes {what}: {keys}; export it in megadistill's format")

    if m.moe_experts:
        return _moe_architecture(m, refuse)

    if m.norm_type == "layer" and m.ffn_gated and not m.parallel_residual:  # StableLM's block
        if (m.qk_norm or m.o_bias or m.ffn_bias or m.activation != "silu" or m.norm_offset or _other_block_traits(m)
                or m.qkv_clip or m.rope_scaling == "longrope"):
            refuse("LayerNorms in a SwiGLU block with more than StableLM's (Q/K/V biases, partial RoPE)")
        return "StableLmForCausalLM"
    if m.norm_type == "layer" or not m.ffn_gated or m.parallel_residual:  # GPT-NeoX's traits
        why = _neox_refusal(m)
        if why:
            keys += ", " + ", ".join(f"model.{k}={getattr(m, k)!r}" for k in (
                "norm_type", "ffn_gated", "parallel_residual", "qkv_bias", "o_bias", "ffn_bias"))
            refuse(why)
        return "GPTNeoXForCausalLM"
    if m.o_bias and not m.qkv_bias:
        refuse("a bias on O without Q/K/V biases (transformers' attention_bias sets all four)")
    if m.norm_type == "layer_noaffine" or m.qkv_clip:  # OLMo 1's traits
        if not (m.norm_type == "layer_noaffine" and m.norm_eps == OLMO1_EPS and m.ffn_gated and m.activation == "silu"
                and not (m.qk_norm or m.ffn_bias or _other_block_traits(m) or m.rope_fraction < 1
                         or m.rope_scaling == "longrope")):
            refuse(f"part of OLMo 1's block, or OLMo 1's block with more (LayerNorms without parameters at eps "
                   f"{OLMO1_EPS}, q / k / v clamping, SwiGLU, Q/K/V + O biases or none, nothing else): "
                   f"model.norm_type={m.norm_type!r}, model.norm_eps={m.norm_eps}, model.qkv_clip={m.qkv_clip}")
        return "OlmoForCausalLM"
    phi3 = m.rope_fraction < 1 or m.rope_scaling == "longrope"
    olmo2 = m.norm_position == "post" or (m.qk_norm and m.qk_norm_scope == "full")
    gemma = (m.norm_position == "sandwich" or m.norm_offset != 0 or m.activation != "silu" or m.embed_scale != 1
             or m.attn_scale_dim != 0 or m.rope_local_base != 0 or m.attn_softcap != 0 or m.logit_softcap != 0)
    smollm3 = bool(m.nope_blocks)
    if olmo2 and not (m.norm_position == "post" and m.qk_norm and m.qk_norm_scope == "full"):
        refuse("post-norm blocks or a full-width QK-norm without the other (OLMo 2 has both)")
    if gemma and not (m.norm_position == "sandwich" and m.norm_offset == 1 and m.activation == "gelu_tanh"
                      and math.isclose(m.embed_scale, math.sqrt(m.d_model))):
        refuse("part of Gemma's block without the rest (sandwich norms with 1 + w gains, GeGLU, embeddings x "
               "sqrt(d_model))")
    if gemma and not m.qk_norm and m.rope_local_base:
        refuse("a RoPE of the sliding blocks' own without Gemma 3's QK-norm (Gemma 2 has one RoPE)")
    qwen2 = m.qkv_bias and not m.o_bias  # Q/K/V biases alone; with O's they are Llama's / Qwen3's attention_bias
    if (m.qk_norm and not olmo2 and not gemma) + qwen2 + phi3 + olmo2 + gemma + smollm3 > 1:
        refuse("more than one of a per-head QK-norm (Qwen3), Q/K/V biases (Qwen2), partial RoPE or longrope (Phi-3), "
               "post-norms with a full-width QK-norm (OLMo 2), Gemma's block and blocks without RoPE (SmolLM3)")
    arch = ("Olmo2ForCausalLM" if olmo2 else "SmolLM3ForCausalLM" if smollm3
            else ("Gemma3ForCausalLM" if m.qk_norm else "Gemma2ForCausalLM") if gemma
            else "Qwen3ForCausalLM" if m.qk_norm else "Qwen2ForCausalLM" if qwen2
            else "Phi3ForCausalLM" if phi3 else "LlamaForCausalLM")
    kinds = m.block_kinds
    # biases beyond Qwen2's: Q/K/V + O (attention_bias) in Llama and Qwen3, FFN ones (mlp_bias) in Llama, unwindowed
    if (m.o_bias and arch not in ("LlamaForCausalLM", "Qwen3ForCausalLM")) or (
            m.ffn_bias and arch != "LlamaForCausalLM") or ((m.o_bias or m.ffn_bias) and "sliding" in kinds):
        refuse("these biases (model.o_bias, model.ffn_bias: transformers reads attention_bias in Llama and Qwen3, "
               "mlp_bias in Llama, without sliding windows)")
    if "sliding" not in kinds or arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "SmolLM3ForCausalLM"):  # any
        return arch
    if arch in ("Qwen3ForCausalLM", "Qwen2ForCausalLM"):
        if kinds != sorted(kinds):  # full blocks first
            refuse("Qwen2 / Qwen3 windows on blocks other than the last ones (use_sliding_window windows the blocks "
                   "from max_window_layers on)")
        return arch
    if arch == "Olmo2ForCausalLM" or "full" in kinds:
        refuse("this sliding window (Mistral and Phi-3 window every block, Qwen2 / Qwen3 the last ones, Gemma and "
               "SmolLM3 any)")
    return "MistralForCausalLM" if arch == "LlamaForCausalLM" else arch


def _moe_architecture(m: ModelConfig, refuse) -> str:
    """The transformers mixture that computes m: Qwen2-MoE with a shared expert (Qwen2's attention, windows on any
    blocks), else Mixtral without a QK-norm (its top k always renormalised, a window on every block or none),
    Qwen3-MoE with a per-head QK-norm (windows on the last blocks), OLMoE with a full-width one (and clip_qkv); all
    pre-norm RMSNorm blocks of SwiGLU experts with whole-head RoPE, Q/K/V and O biases in Qwen3-MoE and OLMoE only
    (attention_bias), Q/K/V biases alone in Qwen2-MoE."""
    if (m.norm_type != "rms" or m.norm_position != "pre" or m.norm_offset or m.activation != "silu"
            or m.embed_scale != 1 or m.attn_scale_dim or m.attn_softcap or m.logit_softcap or m.nope_blocks
            or m.parallel_residual or m.rope_fraction < 1 or m.rope_scaling == "longrope" or m.rope_local_base
            or (m.qkv_bias != m.o_bias and not m.moe_shared_ff)):
        refuse("a mixture of experts in a block other than Mixtral's, Qwen3-MoE's, OLMoE's or Qwen2-MoE's (pre-norm "
               "RMSNorm, SwiGLU experts, RoPE on whole heads, Q/K/V and O biases both or neither, Q/K/V biases alone "
               "with a shared expert)")
    kinds = m.block_kinds
    if m.moe_shared_ff:
        if m.qk_norm or m.o_bias or m.qkv_clip:
            refuse("a shared expert in a block other than Qwen2-MoE's (Qwen2's attention: no QK-norm, Q/K/V biases "
                   "or none, no O bias or clamping)")
        return "Qwen2MoeForCausalLM"
    if not m.qk_norm:
        if not m.moe_norm_topk or m.qkv_clip or m.qkv_bias or set(kinds) == {"full", "sliding"}:
            refuse("a mixture without a QK-norm (Mixtral's) with more than Mixtral has (it always renormalises its "
                   "top k, has no biases or q / k / v clamping and windows every block or none): "
                   f"model.moe_norm_topk={m.moe_norm_topk}, model.qkv_clip={m.qkv_clip}")
        return "MixtralForCausalLM"
    if m.qk_norm_scope == "full":
        if m.sliding_window:
            refuse("a sliding window in OLMoE's block (a mixture with a full-width QK-norm)")
        return "OlmoeForCausalLM"
    if m.qkv_clip or ("sliding" in kinds and kinds != sorted(kinds)):
        refuse("q / k / v clamping, or windows on blocks other than the last ones, in Qwen3-MoE's block (a mixture "
               "with a per-head QK-norm)")
    return "Qwen3MoeForCausalLM"


def from_model_config(m: ModelConfig, max_position: int, dtype: str = "float32") -> Dict:
    """config.json for our model: Qwen3ForCausalLM with QK-norm, Qwen2ForCausalLM with Q/K/V biases,
    Phi3ForCausalLM with partial RoPE, Olmo2ForCausalLM with post-norms and a full-width QK-norm, Gemma2ForCausalLM /
    Gemma3ForCausalLM with Gemma's block (without / with QK-norm), SmolLM3ForCausalLM with blocks without RoPE,
    GPTNeoXForCausalLM with LayerNorms and a plain MLP, StableLmForCausalLM with LayerNorms in a SwiGLU block,
    OlmoForCausalLM with parameter-free LayerNorms, MixtralForCausalLM / Qwen3MoeForCausalLM / OlmoeForCausalLM for a
    mixture of experts (without / with a per-head / with a full-width QK-norm), Qwen2MoeForCausalLM for one with a
    shared expert,
    LlamaForCausalLM with none of them (its attention_bias /
    mlp_bias from model.o_bias / ffn_bias; all load with no custom code); a sliding window on every block of a Llama
    goes to MistralForCausalLM."""
    arch = _architecture(m)
    rope: Dict = {"rope_theta": m.rope_base, "rope_type": m.rope_scaling}
    if m.rope_scaling in ("linear", "llama3", "yarn"):
        rope["factor"] = m.rope_factor
    if m.rope_scaling == "yarn":
        rope.update(original_max_position_embeddings=m.rope_original_max_position,
                    attention_factor=m.rope_attention_factor, beta_fast=m.rope_beta_fast, beta_slow=m.rope_beta_slow,
                    truncate=bool(m.rope_truncate))
    if m.rope_scaling == "longrope":
        rope.update(short_factor=list(m.rope_short_factor), long_factor=list(m.rope_long_factor),
                    attention_factor=m.rope_attention_factor,
                    original_max_position_embeddings=m.rope_original_max_position)
    if m.rope_scaling == "llama3":
        rope.update(low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor,
                    original_max_position_embeddings=m.rope_original_max_position)
        max_position = max(max_position, m.rope_original_max_position + 1)
    out = {
        "architectures": [arch], "model_type": ARCHITECTURES[arch][0],
        "hidden_size": m.d_model, "intermediate_size": m.d_ff, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads or m.n_heads, "head_dim": m.head_dim,
        "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_eps, "hidden_act": "silu",
        "max_position_embeddings": int(max_position), "tie_word_embeddings": bool(m.tie_embeddings),
        "attention_dropout": 0.0, "use_cache": True,
        "rope_parameters": rope, "rope_theta": m.rope_base, "torch_dtype": dtype, "dtype": dtype,
    }
    if m.rope_scaling != "default":
        out["rope_scaling"] = dict(rope)
    if arch in ("Qwen3ForCausalLM", "LlamaForCausalLM"):  # configurable biases (Qwen2 has its Q/K/V ones built in)
        out.update(attention_bias=bool(m.o_bias), mlp_bias=bool(m.ffn_bias))
    if arch == "StableLmForCausalLM":
        del out["rms_norm_eps"]
        rope["partial_rotary_factor"] = out["partial_rotary_factor"] = m.rope_fraction
        out.update(layer_norm_eps=m.norm_eps, use_qkv_bias=bool(m.qkv_bias), qk_layernorm=False,
                   use_parallel_residual=False, bos_token_id=None, eos_token_id=None)
    if arch == "OlmoForCausalLM":
        del out["rms_norm_eps"]
        out.update(attention_bias=bool(m.o_bias), clip_qkv=m.qkv_clip or None, pad_token_id=None,
                   eos_token_id=None)
    if arch == "GPTNeoXForCausalLM":
        for key in ("num_key_value_heads", "head_dim", "rms_norm_eps"):
            del out[key]
        rope["partial_rotary_factor"] = out["partial_rotary_factor"] = m.rope_fraction
        out.update(layer_norm_eps=m.norm_eps, use_parallel_residual=bool(m.parallel_residual),
                   attention_bias=bool(m.qkv_bias), rotary_pct=m.rope_fraction, rotary_emb_base=m.rope_base,
                   hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[m.activation],
                   hidden_dropout=0.0, bos_token_id=None, eos_token_id=None)
    if arch == "Olmo2ForCausalLM":
        out["attention_bias"] = False
    if m.moe_experts:  # every block a mixture (Qwen3-MoE: no dense blocks); transformers' names for the count
        count = "num_local_experts" if arch == "MixtralForCausalLM" else "num_experts"
        out.update({count: m.moe_experts}, num_experts_per_tok=m.moe_top_k, output_router_logits=False)
        if arch == "MixtralForCausalLM":
            out["sliding_window"] = m.sliding_window or None
        else:  # Qwen2-MoE's Q/K/V biases are qkv_bias, the others' (with O's) attention_bias
            out.update({"qkv_bias" if arch == "Qwen2MoeForCausalLM" else "attention_bias": bool(m.qkv_bias)},
                       norm_topk_prob=bool(m.moe_norm_topk))
        if arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
            out.update(moe_intermediate_size=m.d_ff, decoder_sparse_step=1, mlp_only_layers=[])
        if arch == "Qwen2MoeForCausalLM":  # intermediate_size: its dense blocks' (none here)
            out.update(shared_expert_intermediate_size=m.moe_shared_ff, intermediate_size=m.moe_shared_ff)
        if arch == "OlmoeForCausalLM":
            out.update(clip_qkv=m.qkv_clip or None, pad_token_id=None, eos_token_id=None)
    kinds = m.block_kinds
    if arch in ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):  # windowed:
        # the blocks from max_window_layers on; Qwen2-MoE's any blocks, as layer_types says
        out.update(use_sliding_window="sliding" in kinds, sliding_window=m.sliding_window or None,
                   max_window_layers=kinds.count("full"))
        if arch == "Qwen2MoeForCausalLM":
            out.update(layer_types=[f"{k}_attention" for k in kinds], max_window_layers=m.n_layers)
    if arch in ("MistralForCausalLM", "Phi3ForCausalLM"):
        out["sliding_window"] = m.sliding_window or None
    if arch == "SmolLM3ForCausalLM":  # per block 1: RoPE, 0: none; windows on any blocks, as layer_types says
        out.update(no_rope_layers=[int(i not in m.nope_blocks) for i in range(m.n_layers)],
                   use_sliding_window="sliding" in kinds, sliding_window=m.sliding_window or None,
                   layer_types=[f"{k}_attention" for k in kinds], attention_bias=False, mlp_bias=False,
                   pad_token_id=None)  # SmolLM3Config's default (128004) would index past a smaller vocabulary
    if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        del out["hidden_act"]
        out.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=m.attn_scale_dim or m.head_dim,
                   sliding_window=m.sliding_window or None, layer_types=[f"{k}_attention" for k in kinds],
                   final_logit_softcapping=m.logit_softcap or None, attn_logit_softcapping=m.attn_softcap or None,
                   attention_bias=False)
    if arch == "Gemma3ForCausalLM":  # the sliding blocks' RoPE, unscaled, or the full blocks' own
        local = {"rope_type": "default", "rope_theta": m.rope_local_base} if m.rope_local_base else dict(rope)
        out.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
                   rope_local_base_freq=local["rope_theta"])
    if arch == "Phi3ForCausalLM":  # fused qkv_proj / gate_up_proj (megadistill.hf.weights.state_to_hf)
        rope["partial_rotary_factor"] = out["partial_rotary_factor"] = m.rope_fraction
        if m.rope_scaling == "longrope":
            out["original_max_position_embeddings"] = m.rope_original_max_position
        out["pad_token_id"] = None  # Phi3Config's default (32000) would index past a smaller vocabulary
    return out


def fused_layout(hf: Dict) -> bool:
    """Whether this config.json's architecture stores Q/K/V and gate/up as one matrix each (Phi-3)."""
    return "Phi3ForCausalLM" in (hf.get("architectures") or [])
