"""Weights between our Transformer and the HF checkpoints of megadistill.hf.config.ARCHITECTURES: name map, streamed
TP-sharded load, export."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from megadistill.errors import UserError
from megadistill.hf.safetensors_io import SafetensorsFolder

log = logging.getLogger(__name__)

# ours -> HF, per block i; everything else is global
_BLOCK = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
          "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
          "attn.wq.bias": "self_attn.q_proj.bias", "attn.wk.bias": "self_attn.k_proj.bias",
          "attn.wv.bias": "self_attn.v_proj.bias",
          "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
          "ffn.w1.weight": "mlp.gate_proj.weight", "ffn.w3.weight": "mlp.up_proj.weight",
          "ffn.w2.weight": "mlp.down_proj.weight",
          # post-norm blocks (OLMo 2): the norms on each sublayer's output. HF's post_attention_layernorm is Llama's
          # pre-FFN norm (our ffn_norm) and OLMo 2's post-attention one: our_name gives the first, pre-norm meaning
          "attn_out_norm.weight": "post_attention_layernorm.weight",
          "ffn_out_norm.weight": "post_feedforward_layernorm.weight",
          # Llama's attention_bias (with Q / K / V's) and mlp_bias
          "attn.wo.bias": "self_attn.o_proj.bias", "ffn.w1.bias": "mlp.gate_proj.bias",
          "ffn.w3.bias": "mlp.up_proj.bias", "ffn.w2.bias": "mlp.down_proj.bias",
          # LayerNorm biases (StableLM)
          "attn_norm.bias": "input_layernorm.bias", "ffn_norm.bias": "post_attention_layernorm.bias",
          # Qwen2-MoE's shared expert and its sigmoid gate
          "ffn.shared.w1": "mlp.shared_expert.gate_proj.weight", "ffn.shared.w3": "mlp.shared_expert.up_proj.weight",
          "ffn.shared.w2": "mlp.shared_expert.down_proj.weight",
          "ffn.shared.gate.weight": "mlp.shared_expert_gate.weight"}
# sandwich blocks (Gemma 3) name their pre-FFN norm apart from the post-attention one
_SANDWICH = {"ffn_norm.weight": "pre_feedforward_layernorm.weight"}
_GLOBAL = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "norm.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
# Phi-3 / Phi-4 store Q, K, V as one matrix and gate, up as another (rows in this order); read as views of their rows
_FUSED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                        "self_attn.v_proj.weight"),
          "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
# a multimodal checkpoint's text model (Gemma3ForConditionalGeneration) under its causal LM's names
_TEXT_TOWER = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."}
# GPT-NeoX / Pythia (GPTNeoXForCausalLM) name everything its own way; its Q / K / V rows are one matrix interleaved
# per head ([h, 3, hd] rows: each head's q, k, v), read through virtual per-projection names (attention.query...)
_NEOX_BLOCK = {"attn_norm.weight": "input_layernorm.weight", "attn_norm.bias": "input_layernorm.bias",
               "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_norm.bias": "post_attention_layernorm.bias",
               "attn.wo.weight": "attention.dense.weight", "attn.wo.bias": "attention.dense.bias",
               "ffn.w1.weight": "mlp.dense_h_to_4h.weight", "ffn.w1.bias": "mlp.dense_h_to_4h.bias",
               "ffn.w2.weight": "mlp.dense_4h_to_h.weight", "ffn.w2.bias": "mlp.dense_4h_to_h.bias",
               **{f"attn.w{p}.{kind}": f"attention.{name}.{kind}" for p, name in (("q", "query"), ("k", "key"),
                                                                               ("v", "value"))
                  for kind in ("weight", "bias")}}
_NEOX_GLOBAL = {"embed.weight": "gpt_neox.embed_in.weight", "norm.weight": "gpt_neox.final_layer_norm.weight",
                "norm.bias": "gpt_neox.final_layer_norm.bias", "head.weight": "embed_out.weight"}
_NEOX_QKV = {f"attention.query_key_value.{kind}": tuple(f"attention.{p}.{kind}" for p in ("query", "key", "value"))
             for kind in ("weight", "bias")}
# mixtures of experts: the router and each expert's gate / up / down under mlp (Qwen3-MoE, OLMoE) or, Mixtral,
# block_sparse_moe with w1 / w3 / w2 (ours' names; mixtral_layout says which). Our experts are stacked
# ([E, ...] per projection: ffn.experts.w1); the checkpoint's per-expert matrices are read as one virtual stacked
# tensor per projection (experts.gate_proj.weight, no expert index: SafetensorsFolder.stack) and written back apart
_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_OURS_MOE_RE = re.compile(r"^ffn\.(?:router\.weight|experts\.(w[123]))$")
_HF_MOE_RE = re.compile(r"^(mlp|block_sparse_moe)\.(?:gate|experts\.(?:(\d+)\.)?(\w+))\.weight$")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NEOX_BLOCK_RE = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)$")
_VOCAB = ("embed.weight", "head.weight")


def neox_layout(model_cfg) -> bool:
    """Whether model_cfg is stored the GPT-NeoX way (a plain MLP or parallel residual: GPT-NeoX's traits;
    megadistill.hf.config maps such a model to GPTNeoXForCausalLM or refuses it; LayerNorms in a SwiGLU block, as
    StableLM's, keep Llama's names)."""
    return not getattr(model_cfg, "ffn_gated", True) or bool(getattr(model_cfg, "parallel_residual", False))


def hf_name(ours: str, model_cfg=None) -> str:
    """Our parameter name -> the HF checkpoint's tensor name (for the block layout of model_cfg, default pre-norm)."""
    if model_cfg is not None and neox_layout(model_cfg):
        if ours in _NEOX_GLOBAL:
            return _NEOX_GLOBAL[ours]
        m = _BLOCK_RE.match(ours)
        if m and m.group(2) in _NEOX_BLOCK:
            return f"gpt_neox.layers.{m.group(1)}.{_NEOX_BLOCK[m.group(2)]}"
        raise KeyError(f"no GPT-NeoX name for parameter {ours!r}")
    if ours in _GLOBAL:
        return _GLOBAL[ours]
    m = _BLOCK_RE.match(ours)
    e = _OURS_MOE_RE.match(m.group(2)) if m else None
    if e:
        return _moe_name(m.group(1), e.group(1), model_cfg)
    block = dict(_BLOCK, **(_SANDWICH if getattr(model_cfg, "norm_position", "pre") == "sandwich" else {}))
    if m and m.group(2) in block:
        return f"model.layers.{m.group(1)}.{block[m.group(2)]}"
    raise KeyError(f"no Hugging Face name for parameter {ours!r}")


def mixtral_layout(model_cfg) -> bool:
    """Whether a mixture is stored the Mixtral way (block_sparse_moe, w1 / w2 / w3): one without a QK-norm or a
    shared expert (Qwen3-MoE and OLMoE have QK-norms, Qwen2-MoE a shared expert)."""
    return not getattr(model_cfg, "qk_norm", True) and not getattr(model_cfg, "moe_shared_ff", 0)


def _moe_name(layer, ours: Optional[str], model_cfg, expert: Optional[int] = None) -> str:
    """HF name of block `layer`'s router (ours None) or of expert projection `ours` (w1 / w2 / w3): expert `expert`'s
    matrix, or with expert None the virtual stack of all of them."""
    mixtral = mixtral_layout(model_cfg)
    if ours is None:
        leaf = "gate"
    else:
        leaf = "experts." + ("" if expert is None else f"{expert}.") + (ours if mixtral else _EXPERT[ours])
    return f"model.layers.{layer}.{'block_sparse_moe' if mixtral else 'mlp'}.{leaf}.weight"


def our_name(hf: str) -> Optional[str]:
    """HF tensor name -> ours (None for tensors we do not hold, e.g. rotary inv_freq buffers)."""
    inverse = {v: k for k, v in (*_GLOBAL.items(), *_NEOX_GLOBAL.items())}
    if hf in inverse:
        return inverse[hf]
    m = _HF_BLOCK_RE.match(hf)
    e = _HF_MOE_RE.match(m.group(2)) if m else None
    if e:
        if e.group(2) is None:
            return f"blocks.{m.group(1)}.ffn.router.weight"
        ours = {v: k for k, v in _EXPERT.items()}.get(e.group(3), e.group(3))  # one expert's, or their stack
        return f"blocks.{m.group(1)}.ffn.experts.{ours}" if ours in _EXPERT else None
    for pattern, table in ((_HF_BLOCK_RE, (*_BLOCK.items(), *_SANDWICH.items())),
                           (_NEOX_BLOCK_RE, _NEOX_BLOCK.items())):
        m = pattern.match(hf)
        if m:
            block = next((k for k, v in table if v == m.group(2)), None)
            return f"blocks.{m.group(1)}.{block}" if block else None
    return None


def full_shape(m, name: str) -> tuple:
    """Full (unsharded) shape of one of our parameters for model config m."""
    kv, hd, d = m.n_kv_heads or m.n_heads, m.head_dim, m.d_model
    leaf = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    e = _OURS_MOE_RE.match(leaf)
    if e:  # a mixture's router, or its experts' stacked matrices (each shaped like the dense FFN's)
        return (m.moe_experts, *((d,) if e.group(1) is None else full_shape(m, f"ffn.{e.group(1)}.weight")))
    full_qk = m.qk_norm_scope == "full"  # OLMo 2: a gain per dim of all heads
    return {"embed.weight": (m.vocab_size, d), "head.weight": (m.vocab_size, d), "norm.weight": (d,),
            "attn_norm.weight": (d,), "ffn_norm.weight": (d,), "attn_out_norm.weight": (d,),
            "ffn_out_norm.weight": (d,), "attn.wq.weight": (m.n_heads * hd, d),
            "attn.wk.weight": (kv * hd, d), "attn.wv.weight": (kv * hd, d), "attn.wo.weight": (d, m.n_heads * hd),
            "attn.q_norm.weight": (m.n_heads * hd if full_qk else hd,),
            "attn.k_norm.weight": (kv * hd if full_qk else hd,), "attn.wq.bias": (m.n_heads * hd,),
            "attn.wk.bias": (kv * hd,), "attn.wv.bias": (kv * hd,), "ffn.w1.weight": (m.d_ff, d),
            "ffn.w3.weight": (m.d_ff, d), "ffn.w2.weight": (d, m.d_ff), "attn.wo.bias": (d,),
            "ffn.w1.bias": (m.d_ff,), "ffn.w3.bias": (m.d_ff,), "ffn.w2.bias": (d,), "norm.bias": (d,),
            "attn_norm.bias": (d,), "ffn_norm.bias": (d,), "ffn.shared.w1": (m.moe_shared_ff, d),
            "ffn.shared.w3": (m.moe_shared_ff, d), "ffn.shared.w2": (d, m.moe_shared_ff),
            "ffn.shared.gate.weight": (1, d)}[leaf]


def open_hf(folder: Path, model_cfg) -> SafetensorsFolder:
    """The checkpoint's tensors under the per-projection names: fused Q/K/V and gate/up matrices (Phi-3) are split
    into row views sized by model_cfg (a ModelConfig of this checkpoint); a multimodal checkpoint's text model is read
    under its causal LM's names."""
    st = SafetensorsFolder(folder)
    for old, new in _TEXT_TOWER.items():  # the vision tower's tensors keep their names and are not read
        st.rename_prefix(old, new)
    if neox_layout(model_cfg):  # per head q, k, v rows of query_key_value -> three tensors of runs of rows
        hd = model_cfg.head_dim
        for name in list(st.entries):
            m = _NEOX_BLOCK_RE.match(name)
            if m and m.group(2) in _NEOX_QKV:
                parts = {f"gpt_neox.layers.{m.group(1)}.{p}": hd for p in _NEOX_QKV[m.group(2)]}
                st.split_interleaved(name, parts, model_cfg.n_heads)
        return st
    for layer in range(model_cfg.n_layers if model_cfg.moe_experts else 0):  # per-expert matrices -> [E, ...]
        for ours in _EXPERT:
            parts = [_moe_name(layer, ours, model_cfg, e) for e in range(model_cfg.moe_experts)]
            if parts[0] in st:  # else: reported missing under the stacked name
                st.stack(_moe_name(layer, ours, model_cfg), parts)
    for name in list(st.entries):
        m = _HF_BLOCK_RE.match(name)
        if m and m.group(2) in _FUSED:
            parts = [f"model.layers.{m.group(1)}.{p}" for p in _FUSED[m.group(2)]]
            st.split_rows(name, {p: full_shape(model_cfg, our_name(p))[0] for p in parts})
    return st


def load_into(module: nn.Module, folder: Path, tp_rank: int = 0, tp_size: int = 1, hf_names: bool = True) -> int:
    """Fill `module` (built at this TP layout, any dtype / device) from the checkpoint in `folder`: an HF one, or
    with hf_names=False a megadistill model dir (our names).

    Each rank reads only its slice of each sharded weight, straight from the files, one tensor at a time: resident
    memory is the rank's shard plus one tensor slice. Embedding / head rows beyond the module's vocab are dropped
    (a teacher padded larger than the student's vocab). Returns the bytes read.
    """
    st = open_hf(folder, module.cfg) if hf_names else SafetensorsFolder(folder)
    params = dict(module.named_parameters())  # a tied head is the embedding: named once
    wanted = {name: hf_name(name, module.cfg) if hf_names else name for name in params}
    tied = "head.weight" not in params and "embed.weight" in params
    if not hf_names:
        unexpected = sorted(set(st.entries) - set(wanted.values()))
        missing = sorted(set(wanted.values()) - set(st.entries))
        if missing or unexpected:
            raise UserError(f"weights in {folder} do not match the model: missing {missing[:5]}, unexpected "
                            f"{unexpected[:5]}; was it trained with a different model config?")
    missing = sorted(h for h in wanted.values() if h not in st)
    if missing:
        raise UserError(f"{folder}: tensors the config implies are missing from the checkpoint ({missing[:4]}, "
                        f"{len(missing)} in all): does config.json match the weights?")
    head = hf_name("head.weight", module.cfg) if hf_names else "head.weight"
    unused = sorted(h for h in st.entries if h not in set(wanted.values()) and hf_names
                    and not (tied and h == head) and our_name(h) is not None)
    if unused:
        raise UserError(f"{folder}: the checkpoint holds tensors the config does not account for ({unused[:4]}): "
                        "does config.json match the weights (num_hidden_layers, tie_word_embeddings)?")
    read = 0
    with torch.no_grad():
        for name, p in params.items():
            h = wanted[name]
            full = list(st.shape(h))
            dim = getattr(p, "partition_dim", 0) if getattr(p, "tensor_model_parallel", False) else None
            expect = list(p.shape)
            if dim is not None:
                expect[dim] *= tp_size
            if name in _VOCAB and full[0] > expect[0] and len(full) == 2:
                full[0] = expect[0]  # padded vocab: keep the first rows (the tokenizer's ids)
            if full != expect:
                raise UserError(f"{folder}: {h} has shape {tuple(st.shape(h))} but the model config implies "
                                f"{tuple(expect)}: the config contradicts the weights (checkpoint shape != model shape)")
            if dim is None or tp_size == 1:
                lo, hi, dim = 0, full[0], 0
            else:
                lo, hi = tp_rank * p.shape[dim], (tp_rank + 1) * p.shape[dim]
            if p.device.type == "cpu":
                st.read(h, dim, lo, hi, out=p.data)  # read straight into the parameter (cast if dtypes differ)
            else:
                p.data.copy_(st.read(h, dim, lo, hi))
            read += p.numel() * st.entries[h].dtype.itemsize
    return read


def state_to_hf(state: Dict[str, torch.Tensor], tied: bool, fused: bool = False,
                model_cfg=None) -> Dict[str, torch.Tensor]:
    """Our full (consolidated) state dict -> HF names (model_cfg: the block layout); a tied model stores only the
    embedding. fused: Q/K/V and gate/up concatenated by rows into one matrix each (Phi-3's layout)."""
    out = {hf_name(k, model_cfg): v for k, v in state.items()}
    for name in state:
        m = _BLOCK_RE.match(name)
        e = _OURS_MOE_RE.match(m.group(2)) if m else None
        if e and e.group(1):  # a mixture's stacked experts: one matrix per expert (copies: files hold no views)
            stacked = out.pop(hf_name(name, model_cfg))
            out.update({_moe_name(m.group(1), e.group(1), model_cfg, i): t.clone()
                        for i, t in enumerate(stacked.unbind(0))})
    if tied:
        out.pop(hf_name("head.weight", model_cfg), None)
    if model_cfg is not None and neox_layout(model_cfg):  # q, k, v rows interleaved per head into query_key_value
        h = model_cfg.n_heads
        for name in [n for n in out if n.endswith(".attention.query.weight") or n.endswith(".attention.query.bias")]:
            prefix, kind = name.rsplit(".attention.query.", 1)
            parts = [out.pop(f"{prefix}.attention.{p}.{kind}") for p in ("query", "key", "value")]
            stacked = torch.stack([t.reshape(h, -1, *t.shape[1:]) for t in parts], dim=1)  # [h, 3, hd, ...]
            out[f"{prefix}.attention.query_key_value.{kind}"] = stacked.reshape(-1, *parts[0].shape[1:])
    if fused:
        layers = sorted({int(m.group(1)) for m in map(_HF_BLOCK_RE.match, out) if m})
        for i, (name, parts) in ((i, f) for i in layers for f in _FUSED.items()):
            out[f"model.layers.{i}.{name}"] = torch.cat([out.pop(f"model.layers.{i}.{p}") for p in parts])
    return out


def write_safetensors(state: Dict[str, torch.Tensor], out_dir: Path, name: str = "model.safetensors") -> None:
    """Atomic write (temp name, fsync, rename) with the metadata transformers expects."""
    import os

    from safetensors.torch import save_file

    tmp = Path(out_dir) / f".{name}.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, Path(out_dir) / name)


def write_json(path: Path, obj: Dict) -> None:
    from megadistill.train.checkpoint import atomic_write_text
    atomic_write_text(Path(path), json.dumps(obj, indent=2) + "\n")
