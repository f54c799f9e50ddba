"""Hugging Face config.json (Qwen3 / Qwen2 / Llama / Mistral / Phi-3 / OLMo 2) <-> our ModelConfig, with a named error
for anything we cannot run."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional

from megadistill.config import ModelConfig
from megadistill.errors import UserError

# architecture -> (model_type, has QK-norm, has Q/K/V biases). Qwen2 (and Qwen2.5, the same architecture) always
# has the biases and no attention_bias key; Mistral is Llama's computation plus an optional sliding window; Phi-3
# (and Phi-4) too, with Q/K/V and gate/up each stored as one matrix (megadistill.hf.weights splits them). OLMo 2
# normalises each sublayer's output instead of its input and its QK-norm spans all heads' dims (OLMO2).
ARCHITECTURES = {"Qwen3ForCausalLM": ("qwen3", True, False), "Qwen2ForCausalLM": ("qwen2", False, True),
                 "LlamaForCausalLM": ("llama", False, False), "MistralForCausalLM": ("mistral", False, False),
                 "Phi3ForCausalLM": ("phi3", False, False), "Olmo2ForCausalLM": ("olmo2", True, False)}
OLMO2 = {"norm_position": "post", "qk_norm_scope": "full"}
WINDOWED = ("mistral", "phi3")  # sliding_window applies whenever set (Qwen2/3: only with use_sliding_window)
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


def to_model_config(hf: Dict, where: str = "config.json") -> ModelConfig:
    """A resolved, validated ModelConfig computing the same function as the HF model described by `hf`."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UserError(f"{where}: architecture {archs or hf.get('model_type')!r} is not supported; supported: "
                        f"{sorted(ARCHITECTURES)} (convert the model, or distil from a megadistill run)")
    model_type, qk_norm, qkv_bias = ARCHITECTURES[arch]
    if hf.get("model_type", model_type) != model_type:
        raise UserError(f"{where}: model_type={hf.get('model_type')!r} contradicts architectures={archs}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):  # Llama / Qwen3 attention_bias also puts a bias on O, which no model of ours has
            raise UserError(f"{where}: {key}=true is not supported (our projections carry no biases besides "
                            "Qwen2's Q / K / V ones)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if hf.get("use_sliding_window"):
        raise UserError(f"{where}: use_sliding_window=true is not supported (a window on some layers only: ours "
                        "windows all layers or none; released Qwen2 / Qwen2.5 checkpoints set it false)")
    window = int(hf.get("sliding_window") or 0) if model_type in WINDOWED else 0
    # transformers v5 keeps it in rope_parameters, v4 configs (most of the hub) at the top level: either counts
    partial = next((float(f) for f in ((hf.get("rope_parameters") or {}).get("partial_rotary_factor"),
                                       hf.get("partial_rotary_factor")) if f is not None and float(f) != 1.0), 1.0)
    if partial != 1.0 and model_type != "phi3":  # transformers' other families rotate whole heads
        raise UserError(f"{where}: partial_rotary_factor={partial} is not supported for {arch} (Phi-3 only)")
    try:
        rope = _rope(hf, where)
        if rope["rope_scaling"] == "longrope" and model_type != "phi3":
            raise UserError(f"{where}: rope type 'longrope' is supported for Phi3ForCausalLM only, not {arch}")
        n_heads = int(hf["num_attention_heads"])
        d = int(hf["hidden_size"])
        m = ModelConfig(size=None, n_layers=int(hf["num_hidden_layers"]), d_model=d, n_heads=n_heads,
                        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                        head_dim=int(hf.get("head_dim") or d // n_heads), d_ff=int(hf["intermediate_size"]),
                        vocab_size=int(hf["vocab_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                        qk_norm=qk_norm, qkv_bias=qkv_bias, sliding_window=window, rope_fraction=partial,
                        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **rope,
                        **(OLMO2 if model_type == "olmo2" else {}))
    except KeyError as e:
        raise UserError(f"{where}: required key {e.args[0]!r} is missing") from None
    m.resolve()
    try:
        m.validate()
    except UserError as e:
        raise UserError(f"{where} gives an invalid model: {e}") from None
    return m


def from_model_config(m: ModelConfig, max_position: int, dtype: str = "float32") -> Dict:
    """config.json for our model: Qwen3ForCausalLM with QK-norm, Qwen2ForCausalLM with Q/K/V biases,
    Phi3ForCausalLM with partial RoPE, Olmo2ForCausalLM with post-norms and a full-width QK-norm, LlamaForCausalLM with
    none of them (all load with no custom code); a sliding window goes to MistralForCausalLM (or Phi-3)."""
    phi3 = m.rope_fraction < 1 or m.rope_scaling == "longrope"
    olmo2 = m.norm_position == "post" or (m.qk_norm and m.qk_norm_scope == "full")
    keys = (f"model.qk_norm={m.qk_norm}, model.qk_norm_scope={m.qk_norm_scope!r}, model.norm_position="
            f"{m.norm_position!r}, model.qkv_bias={m.qkv_bias}, model.rope_fraction={m.rope_fraction}, "
            f"model.rope_scaling={m.rope_scaling!r}, model.sliding_window={m.sliding_window}")
    if olmo2 and not (m.norm_position == "post" and m.qk_norm and m.qk_norm_scope == "full"):
        raise UserError("no Hugging Face architecture computes post-norm blocks or a full-width QK-norm without the "
                        f"other (OLMo 2 has both): {keys}; export it in megadistill's format")
    if (m.qk_norm and not olmo2) + m.qkv_bias + phi3 + olmo2 > 1 or (m.sliding_window and (m.qk_norm or m.qkv_bias)):
        raise UserError("no Hugging Face architecture computes a model with more than one of a per-head QK-norm "
                        "(Qwen3), Q/K/V biases (Qwen2), partial RoPE or longrope (Phi-3), post-norms with a "
                        "full-width QK-norm (OLMo 2), and a sliding window is Mistral's or Phi-3's only: "
                        f"{keys}; export it in megadistill's format")
    arch = "Olmo2ForCausalLM" if olmo2 else "Qwen3ForCausalLM" if m.qk_norm else "Qwen2ForCausalLM" if m.qkv_bias \
        else "Phi3ForCausalLM" if phi3 else "MistralForCausalLM" if m.sliding_window else "LlamaForCausalLM"
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
        out.update(attention_bias=False, mlp_bias=False)
    if arch == "Olmo2ForCausalLM":
        out["attention_bias"] = False
    if arch in ("Qwen3ForCausalLM", "Qwen2ForCausalLM"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layers)
    if arch in ("MistralForCausalLM", "Phi3ForCausalLM"):
        out["sliding_window"] = m.sliding_window or None
    if arch == "Phi3ForCausalLM":  # fused qkv_proj / gate_up_proj (megadistill.hf.weights.state_to_hf)
        rope["partial_rotary_factor"] = out["partial_rotary_factor"] = m.rope_fraction
        if m.rope_scaling == "longrope":
            out["original_max_position_embeddings"] = m.rope_original_max_position
        out["pad_token_id"] = None  # Phi3Config's default (32000) would index past a smaller vocabulary
    return out


def fused_layout(hf: Dict) -> bool:
    """Whether this config.json's architecture stores Q/K/V and gate/up as one matrix each (Phi-3)."""
    return "Phi3ForCausalLM" in (hf.get("architectures") or [])
