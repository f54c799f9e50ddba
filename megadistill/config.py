"""Structured, validated configuration: YAML files + dotlist overrides -> one resolved Config."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError


from megadistill.errors import UserError
from megadistill.model.sizes import kv_layout


class ConfigError(UserError):
    """A user error in a configuration: the message names the key and what is allowed."""


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def tp_split_problem(m: "ModelConfig", tp: int, name: Callable[[str], str]) -> Optional[str]:
    """Why tensor parallelism of size tp cannot split the model m, or None: its attention heads, key/value heads (a
    share per rank, or one replicated), full-width QK-norm over replicated heads, FFN and shared-expert widths. The
    student's config and a teacher's shape are checked alike; name(key) names a dimension in the message."""
    if m.n_heads % tp:
        return f"parallel.tp_size={tp} does not divide {name('n_heads')}={m.n_heads}"
    layout = kv_layout(m.n_kv_heads, tp)
    if layout is None:
        return (f"parallel.tp_size={tp} neither divides {name('n_kv_heads')}={m.n_kv_heads} nor is a multiple of it: "
                "each TP rank needs whole key/value heads (its share, or one replicated head); pick such a tp_size")
    if layout == "replicated" and m.qk_norm and m.qk_norm_scope == "full":
        return (f"{name('qk_norm_scope')}=full normalises k over all {name('n_kv_heads')}={m.n_kv_heads} heads, but "
                f"parallel.tp_size={tp} leaves one per rank; use a tp_size that divides it")
    for key in ("d_ff", "moe_shared_ff"):
        if getattr(m, key) % tp:
            return f"parallel.tp_size={tp} does not divide {name(key)}={getattr(m, key)}"
    return None


def grad_dtypes(precision: str, zero_stage: int, accum: str = "auto", reduce: str = "auto") -> Tuple[str, str]:
    """(accumulation dtype, DP-reduction dtype) of the gradients, train.grad_accum_dtype / grad_reduce_dtype resolved
    (the one rule the engine, the resume check and the memory model read). fp32 runs: fp32. bf16 runs: fp32
    accumulation unless bf16 is asked for; at ZeRO stage 0 always bf16 (DeepSpeed's bf16 optimizer without ZeRO has
    no fp32 accumulation; validate() refuses an explicit fp32 there). Reductions follow the accumulation (auto) or
    are as asked."""
    if precision == "fp32":
        return "fp32", "fp32"
    acc = "bf16" if zero_stage == 0 or accum == "bf16" else "fp32"
    return acc, (acc if reduce == "auto" else reduce)


@dataclass
class ModelConfig:
    size: Optional[str] = None  # a name from megadistill.model.sizes ("546M", "tiny-2M") or hf:PATH (a local HF
    # folder's config.json, megadistill.hf.config.ARCHITECTURES); fills the shape fields below
    n_layers: int = 2  # transformer blocks
    d_model: int = 128  # residual width
    n_heads: int = 4  # attention (query) heads
    n_kv_heads: int = 0  # key/value heads (GQA when < n_heads, which it must divide); 0 = n_heads (MHA)
    head_dim: int = 32  # per-head width (the paper's sizes: n_heads * head_dim == d_model; HF models may differ)
    d_ff: int = 0  # SwiGLU hidden width; 0 = 8/3 d_model rounded up to a multiple of ff_multiple
    ff_multiple: int = 128  # rounding multiple for the default d_ff
    vocab_size: int = 32768  # output classes; must match the tokenizer / synthetic language
    rope_base: float = 500000.0  # RoPE theta
    rope_scaling: str = "default"  # default | linear | llama3 | longrope | yarn (RoPE frequency rescaling, HF's
    # rope_type)
    rope_factor: float = 1.0  # linear / llama3 / yarn: context extension factor
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max / low are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / high are kept
    rope_original_max_position: int = 8192  # llama3 / longrope / yarn: the context length the model was pretrained at
    # longrope (Phi-3.5 / Phi-4-mini): per-frequency divisors of the rotary frequencies for sequences up to
    # rope_original_max_position tokens (short) and beyond (long), and a scale on cos / sin
    rope_short_factor: List[float] = field(default_factory=list)
    rope_long_factor: List[float] = field(default_factory=list)
    rope_attention_factor: float = 1.0  # longrope / yarn: scale on cos / sin (import writes transformers' default)
    # yarn (Qwen2.5 / Qwen3 long context): frequencies that turn fewer than rope_beta_slow times over the original
    # context are divided by rope_factor, more than rope_beta_fast times kept, linearly blended between (by dim index,
    # the range rounded outwards when rope_truncate)
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    rope_fraction: float = 1.0  # share of head_dim that RoPE rotates (its first int(head_dim x fraction) dims; the
    # rest pass through): HF's partial_rotary_factor (Phi-4-mini: 0.75)
    tie_embeddings: bool = False  # the output head shares the input embedding matrix
    norm_eps: float = 1e-5  # norm epsilon
    norm_type: str = "rms"  # rms: RMSNorm (gain) | layer: LayerNorm, mean-centred, with a gain and a bias (GPT-NeoX /
    # Pythia) | layer_noaffine: LayerNorm without gain or bias (OLMo 1); the QK-norm is RMSNorm either way
    qk_norm: bool = True  # RMSNorm on queries and keys
    qk_norm_scope: str = "head"  # head: over each head's head_dim, one gain shared by all heads (the paper, Qwen3) |
    # full: over all heads' dims together, one gain per dim (OLMo 2); under TP the sum of squares is all-reduced
    norm_position: str = "pre"  # pre: x + f(norm(x)) (the paper, Llama) | post: x + norm(f(x)) (OLMo 2: each
    # sublayer's output normalised before the residual add, no norm on its input) | sandwich: x + norm(f(norm(x)))
    # (Gemma 3: both)
    norm_offset: float = 0.0  # norm gains act as norm_offset + w (Gemma's 1 + w; w then starts at 1 - norm_offset)
    activation: str = "silu"  # the FFN's activation: silu (SwiGLU) | gelu_tanh (tanh-approximated GELU: GeGLU, Gemma)
    # | gelu (exact, erf: Pythia)
    ffn_gated: bool = True  # W2 (act(W1 x) * W3 x); false: a plain MLP W2 act(W1 x), two matrices (GPT-NeoX / Pythia)
    parallel_residual: bool = False  # x + Attn(norm1(x)) + FFN(norm2(x)), both sublayers reading the block's input
    # (GPT-NeoX / Pythia's use_parallel_residual); needs norm_position=pre
    embed_scale: float = 1.0  # embedding output x this, rounded to the activations' dtype (Gemma: sqrt(d_model))
    attn_scale_dim: int = 0  # attention logits x 1 / sqrt(attn_scale_dim); 0 = head_dim (Gemma's
    # query_pre_attn_scalar)
    attn_softcap: float = 0.0  # attention logits s -> c tanh(s / c) before the softmax (Gemma 2: 50); 0 = off. sdpa
    # then runs the explicit-scores path ([b, h, s, s] per block); flash-attn and flex take it natively
    logit_softcap: float = 0.0  # output logits z -> c tanh(z / c) (Gemma 2: 30); 0 = off. Needs distill.fused=false
    qkv_bias: bool = False  # biases on the Q, K and V projections (Qwen2 / Qwen2.5)
    o_bias: bool = False  # a bias on the attention output projection O (with qkv_bias: HF's attention_bias)
    ffn_bias: bool = False  # biases on the FFN's matrices (HF's mlp_bias; GPT-NeoX always)
    qkv_clip: float = 0.0  # q, k and v clamped to [-qkv_clip, qkv_clip] after their projections (OLMo 1's
    # clip_qkv); 0 = off
    # mixture of experts (Mixtral, Qwen3-MoE, OLMoE): every block's FFN is moe_experts gated FFNs of width d_ff; a
    # router (softmax over the experts, in fp32) sends each token to its moe_top_k best, weighted by their
    # probabilities (renormalised over the k when moe_norm_topk); 0 = a dense FFN. Experts are split over TP like the
    # dense FFN (no expert parallelism); a student trains with the routers' load-balancing loss (train.moe_aux_loss)
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_norm_topk: bool = True
    moe_shared_ff: int = 0  # Qwen2-MoE: width of a shared expert (a SwiGLU every token goes through) whose output is
    # gated by sigmoid(w . x), added to the routed experts'; split over TP like them; 0 = none
    sliding_window: int = 0  # attention window (Mistral's / Phi-3's sliding_window): token i attends to tokens
    # i - sliding_window + 1 .. i only; 0 = full causal attention. No effect while train.seq_len <= sliding_window
    layer_types: List[str] = field(default_factory=list)  # per block "sliding" (windowed) or "full" (Gemma 3: 5 of
    # every 6 sliding; Qwen2 with use_sliding_window); empty: every block sliding when sliding_window > 0
    rope_local_base: float = 0.0  # RoPE theta of the sliding blocks, unscaled (Gemma 3: 10000); 0: as the full ones
    nope_blocks: List[int] = field(default_factory=list)  # blocks (0-based) without RoPE: no positional encoding
    # (SmolLM3: every 4th)
    attention: str = "sdpa"  # flash | sdpa | flex | eager. flex: torch's FlexAttention, block-sparse over documents
    # and windows, softcap in its kernel (CUDA to train; CPU runs its forwards only: megadistill.model.flex)
    kernels: str = "torch"  # torch | liger: RMSNorm, SwiGLU and RoPE as our torch ops or Liger-Kernel's Triton kernels
    # (CUDA + pip install liger-kernel; checked when the model is built)
    mup_base_width: int = 256  # µP(simple) base width: hidden-matrix LR x base/d_model
    activation_checkpointing: str = "off"  # off | full | every_k
    checkpoint_every_k: int = 2  # with activation_checkpointing=every_k: checkpoint every k-th block

    def resolve(self, given: Optional[Dict[str, str]] = None) -> "ModelConfig":
        """Fill shape fields from `size` (if set) and derive d_ff; return self.

        given: shape keys set explicitly (key -> where, for the message); one that contradicts the size is an error,
        never silently overwritten.
        """
        # YAML 1.1 reads a bare `off` / `on` as a boolean, which omegaconf then turns into "False" / "True"
        self.activation_checkpointing = {"False": "off", "false": "off", "True": "full", "true": "full"}.get(
            self.activation_checkpointing, self.activation_checkpointing)
        if self.size:
            shape = _size_shape(self.size)
            for k, v in shape.items():
                if given and k in given and getattr(self, k) != v:
                    raise ConfigError(f"model.{k}={getattr(self, k)} (from {given[k]}) contradicts "
                                      f"model.size={self.size!r}, which sets model.{k}={v}: drop one of them "
                                      "(model.size=null to give the shape field by field)")
                setattr(self, k, v)
        if not self.d_ff:
            self.d_ff = int(math.ceil(8 * self.d_model / 3 / self.ff_multiple) * self.ff_multiple)
        if not self.n_kv_heads:
            self.n_kv_heads = self.n_heads
        return self

    @property
    def block_kinds(self) -> List[str]:
        """Each block's attention: "sliding" (windowed) or "full" -- layer_types, else every block alike."""
        return list(self.layer_types) or ["sliding" if self.sliding_window else "full"] * self.n_layers

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates: the first int(head_dim x rope_fraction)."""
        return int(self.head_dim * self.rope_fraction)

    def validate(self, prefix: str = "model") -> None:
        for k in ("n_layers", "d_model", "n_heads", "head_dim", "d_ff", "vocab_size", "mup_base_width"):
            _positive(f"{prefix}.{k}", getattr(self, k))
        if self.n_kv_heads < 0 or (self.n_kv_heads and self.n_heads % self.n_kv_heads):
            raise ConfigError(f"{prefix}.n_kv_heads={self.n_kv_heads} must divide {prefix}.n_heads={self.n_heads} "
                              "(0 = n_heads, plain multi-head attention)")
        _choice(f"{prefix}.rope_scaling", self.rope_scaling, ("default", "linear", "llama3", "longrope", "yarn"))
        if self.rope_scaling != "default":
            _positive(f"{prefix}.rope_factor", self.rope_factor)
        if self.rope_scaling == "llama3":
            _positive(f"{prefix}.rope_original_max_position", self.rope_original_max_position)
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                raise ConfigError(f"{prefix}.rope_low_freq_factor={self.rope_low_freq_factor} must be > 0 and < "
                                  f"{prefix}.rope_high_freq_factor={self.rope_high_freq_factor}")
        rotary = self.rotary_dim
        if not 0 < self.rope_fraction <= 1 or rotary < 2 or rotary % 2:
            raise ConfigError(f"{prefix}.rope_fraction={self.rope_fraction} must be in (0, 1] and rotate an even "
                              f"number (>= 2) of the head_dim={self.head_dim} dims (int(head_dim x fraction) = "
                              f"{rotary})")
        if self.rope_scaling in ("longrope", "yarn"):
            _positive(f"{prefix}.rope_original_max_position", self.rope_original_max_position)
            _positive(f"{prefix}.rope_attention_factor", self.rope_attention_factor)
        if self.rope_scaling == "yarn" and not 0 < self.rope_beta_slow < self.rope_beta_fast:
            raise ConfigError(f"{prefix}.rope_beta_slow={self.rope_beta_slow} must be > 0 and < "
                              f"{prefix}.rope_beta_fast={self.rope_beta_fast} (rotations over the original context: "
                              "slow ones interpolated, fast ones kept)")
        if self.rope_scaling == "longrope":
            for key in ("rope_short_factor", "rope_long_factor"):
                factors = list(getattr(self, key))
                if len(factors) != rotary // 2 or not all(f > 0 for f in factors):
                    raise ConfigError(f"{prefix}.{key} must hold {rotary // 2} positive factors (one per rotary "
                                      f"frequency: int(head_dim x rope_fraction) / 2), got {len(factors)}")
        if self.sliding_window < 0:
            raise ConfigError(f"{prefix}.sliding_window={self.sliding_window} must be >= 0 (0 = full causal attention)")
        _choice(f"{prefix}.qk_norm_scope", self.qk_norm_scope, ("head", "full"))
        _choice(f"{prefix}.norm_position", self.norm_position, ("pre", "post", "sandwich"))
        _choice(f"{prefix}.activation", self.activation, ("silu", "gelu_tanh", "gelu"))
        _choice(f"{prefix}.norm_type", self.norm_type, ("rms", "layer", "layer_noaffine"))
        if self.qkv_clip < 0:
            raise ConfigError(f"{prefix}.qkv_clip={self.qkv_clip} must be >= 0 (0 = no clamping)")
        if self.moe_experts < 0 or (self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts):
            raise ConfigError(f"{prefix}.moe_experts={self.moe_experts} must be >= 0 (0 = a dense FFN) and, with "
                              f"experts, {prefix}.moe_top_k={self.moe_top_k} in [1, moe_experts]")
        if self.moe_shared_ff < 0 or (self.moe_shared_ff and not self.moe_experts):
            raise ConfigError(f"{prefix}.moe_shared_ff={self.moe_shared_ff} must be >= 0 and needs a mixture of "
                              f"experts ({prefix}.moe_experts > 0); 0 = no shared expert")
        if self.moe_experts and (not self.ffn_gated or self.ffn_bias):
            raise ConfigError(f"{prefix}.moe_experts={self.moe_experts} takes gated experts without biases "
                              f"({prefix}.ffn_gated=true, {prefix}.ffn_bias=false)")
        for key in ("ffn_gated", "parallel_residual", "o_bias", "ffn_bias"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)!r} must be true or false")
        if self.parallel_residual and self.norm_position != "pre":
            raise ConfigError(f"{prefix}.parallel_residual=true adds both sublayers to the block's input, each after "
                              f"its own norm: it needs {prefix}.norm_position=pre (got {self.norm_position!r})")
        _positive(f"{prefix}.embed_scale", self.embed_scale)
        for key in ("attn_softcap", "logit_softcap"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)} must be >= 0 (0 = no softcapping)")
        if self.attn_scale_dim < 0:
            raise ConfigError(f"{prefix}.attn_scale_dim={self.attn_scale_dim} must be >= 0 (0 = head_dim)")
        if self.rope_local_base < 0:
            raise ConfigError(f"{prefix}.rope_local_base={self.rope_local_base} must be >= 0 (0 = rope_base)")
        nope = list(self.nope_blocks)
        if len(set(nope)) != len(nope) or not all(isinstance(i, int) and 0 <= i < self.n_layers for i in nope):
            raise ConfigError(f"{prefix}.nope_blocks={nope} must list distinct block indices in [0, {self.n_layers}) "
                              "(model.n_layers)")
        if self.layer_types:
            kinds = list(self.layer_types)
            if len(kinds) != self.n_layers or not set(kinds) <= {"sliding", "full"}:
                raise ConfigError(f"{prefix}.layer_types must list 'sliding' or 'full' for each of the {self.n_layers} "
                                  f"blocks (model.n_layers), got {kinds}")
            if "sliding" in kinds and not self.sliding_window:
                raise ConfigError(f"{prefix}.layer_types has sliding blocks but {prefix}.sliding_window=0: set the "
                                  "window")
        _choice(f"{prefix}.attention", self.attention, ("flash", "sdpa", "flex", "eager"))
        _choice(f"{prefix}.kernels", self.kernels, ("torch", "liger"))
        _choice(f"{prefix}.activation_checkpointing", self.activation_checkpointing, ("off", "full", "every_k"))
        _positive(f"{prefix}.checkpoint_every_k", self.checkpoint_every_k)


# the fields an hf:PATH size fills (everything of the architecture; attention backend and checkpointing stay ours)
HF_SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size", "rope_base",
                 "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_original_max_position", "rope_short_factor", "rope_long_factor", "rope_attention_factor",
                 "rope_beta_fast", "rope_beta_slow", "rope_truncate",
                 "rope_fraction", "norm_eps", "qk_norm", "qk_norm_scope", "norm_position", "norm_offset", "activation",
                 "embed_scale", "attn_scale_dim", "qkv_bias", "o_bias", "ffn_bias", "norm_type", "ffn_gated",
                 "parallel_residual", "qkv_clip", "moe_experts", "moe_top_k", "moe_norm_topk", "moe_shared_ff",
                 "sliding_window", "layer_types", "rope_local_base", "nope_blocks", "attn_softcap", "logit_softcap",
                 "tie_embeddings")


def _size_shape(size: str) -> Dict:
    """The shape fields model.size sets: a named size's, or an HF folder's architecture (hf:PATH)."""
    if size.startswith("hf:"):
        from megadistill.hf.config import hf_path, read_config, to_model_config
        folder = hf_path(size)
        m = to_model_config(read_config(folder), where=f"model.size={size!r}: {folder}/config.json")
        return {k: getattr(m, k) for k in HF_SHAPE_KEYS}
    from megadistill.model.sizes import get_size
    try:
        return get_size(size)
    except KeyError as e:
        raise ConfigError(f"model.size={size!r}: {e.args[0]}") from None


@dataclass
class ParallelConfig:
    tp_size: int = 1  # tensor-parallel degree (ranks tp-contiguous); dp_size = world_size / tp_size
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | nccl | gloo
    timeout_s: int = 600  # a collective waiting longer (a peer died or hangs) fails the job instead of hanging it
    # Megatron-style sequence parallelism inside TP: residual stream and norms cut along the sequence (all-gather /
    # reduce-scatter in place of all-reduce); no effect at tp_size 1; train.seq_len must be a multiple of tp_size
    sequence_parallel: bool = False


@dataclass
class ZeroConfig:
    stage: int = 1  # DeepSpeed ZeRO stage 0-3 over the data-parallel group
    offload_optimizer: str = "none"  # none | cpu (ZeRO-Offload of optimizer states)
    offload_param: str = "none"  # none | cpu (stage 3 only)
    overlap_comm: bool = False  # overlap gradient reduction with backward
    bucket_size: int = 50_000_000  # reduce / allgather bucket elements


@dataclass
class OptimConfig:
    lr: float = 1e-2  # peak LR at the µP base width (paper: 1e-2 for every size)
    weight_decay: float = 1e-4  # decoupled (independent of LR): p <- p - wd * schedule(t) * p
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global grad-norm clip (tensor-parallel params counted once); 0 = off
    warmup_steps: int = 2000  # linear warmup
    schedule: str = "cosine"  # cosine | constant
    final_lr_ratio: float = 1e-3  # cosine floor = lr * final_lr_ratio


@dataclass
class DistillConfig:
    teacher: Optional[str] = None  # teacher run dir (a finished supervised run) or its export dir
    kd_weight: float = 1.0  # lambda: L = (1 - lambda) NTP + lambda KD + z_loss * Z
    temperature: float = 1.0  # tau (the KD term carries tau^2)
    top_k: Optional[int] = None  # truncate the teacher to its top-k tokens (renormalised)
    top_p: Optional[float] = None  # truncate the teacher to its top-p nucleus (renormalised)
    reverse: bool = False  # reverse KL(q_S || p_T) instead of forward
    fused: bool = False  # chunked fused-linear loss: never materialise [tokens, V/tp] logits
    # token chunk of the single-pass loss (fused or on materialised logits); null: 1024 with the eager loss kernel,
    # sized from memory with the compiled one on a GPU (2048 for bf16 logits at V/tp 32768: the same bytes)
    chunk_tokens: Optional[int] = None
    loss_kernel: str = "auto"  # per-chunk loss kernel: auto (compiled on CUDA, eager on CPU) | compiled | eager
    teacher_dtype: str = "fp32"  # fp32 | bf16
    teacher_zero3: bool = False  # partition teacher weights over the DP group (ZeRO-3 inference)
    allow_data_overlap: bool = False  # accept (with a warning) a teacher trained on the student's documents
    teacher_prefetch: bool = True  # issue micro-batch i+1's teacher forward before student backward i (own CUDA stream)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | files | hf
    split: str = "teacher"  # which disjoint half of the training documents: teacher | student
    student_fraction: float = 0.5  # share of documents hashed into the student split
    eval_fraction: float = 0.02  # share of documents held out for evaluation (from the student half)
    hash_seed: int = 0  # salt of the stable document hash that decides the splits
    tokenizer: Optional[str] = None  # HF tokenizer dir (files | hf sources)
    files: List[str] = field(default_factory=list)  # json/jsonl/parquet/txt files (source=files)
    hf_name: Optional[str] = None  # HF dataset name, e.g. allenai/c4 (source=hf)
    hf_config: Optional[str] = None  # HF dataset config, e.g. en
    hf_split: str = "train"
    text_field: str = "text"
    streaming: bool = True  # stream the HF dataset
    document_mask: bool = False  # packed documents do not attend to each other
    synthetic_order: int = 1  # Markov order of the synthetic language
    synthetic_branching: int = 8  # successors per context
    synthetic_zipf: float = 1.1  # Zipf exponent of the transition weights
    synthetic_doc_len: int = 256  # tokens per synthetic document
    synthetic_seed: int = 1234  # seed of the language itself (same for teacher and student)


@dataclass
class TrainConfig:
    mode: str = "supervised"  # supervised | distill
    run_dir: str = "runs/default"  # where config.yaml, eval.jsonl, train.jsonl, checkpoints/ go
    run_name: Optional[str] = None  # defaults to the run dir's name
    steps: int = 0  # optimizer steps; 0 = derive from tokens
    tokens: int = 0  # training tokens (D); used when steps == 0
    tokens_per_param: float = 0.0  # D = M * N when steps == tokens == 0
    seq_len: int = 128
    micro_batch_size: int = 4  # sequences per DP rank per micro-step
    global_batch_size: int = 8  # sequences per optimizer step over all DP ranks
    precision: str = "fp32"  # fp32 | bf16
    tf32: bool = True  # CUDA: fp32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa products, fp32
    # sums; NGC's PyTorch containers default to it) -- an fp32 student or teacher (distill.teacher_dtype=fp32, the
    # default) at half the bf16 rate, with MFU against that peak; false: IEEE fp32 (~1/15 of it on H100)
    grad_accum_dtype: str = "auto"  # bf16 runs: dtype the gradients are accumulated over micro-batches and reduced
    # over DP ranks in: fp32 (Megatron's default; +4 bytes per parameter at ZeRO-1, 4/dp at ZeRO-2/3, twice the
    # gradient bytes on the wire) | bf16 (one rounding per micro-batch) | auto (fp32, bf16 at zero.stage=0, where
    # DeepSpeed's bf16 optimizer has no fp32 accumulation). fp32 runs accumulate in fp32.
    grad_reduce_dtype: str = "auto"  # bf16 runs: dtype of the gradients' DP reductions: auto (the accumulation
    # dtype) | bf16 (with fp32 accumulation: half the bytes on the wire, one bf16 rounding per reduction) | fp32
    z_loss: float = 1e-4  # lambda_Z
    moe_aux_loss: float = 0.01  # a mixture-of-experts student: weight of the routers' load-balancing loss (Switch
    # Transformer's E sum_e f_e P_e per block, summed over blocks; Mixtral trained with 0.02, OLMoE 0.01, Qwen3-MoE
    # 0.001); 0 = none (e.g. continuing a released checkpoint as it was). No effect on a dense student
    moe_router_z_loss: float = 0.0  # a mixture-of-experts student: weight of ST-MoE's router z-loss (per block the
    # mean over tokens of logsumexp(router logits)^2, summed over blocks; OLMoE trained with 0.001); 0 = none
    seed: int = 0
    log_interval: int = 1  # steps between train.jsonl lines
    eval_interval: int = 0  # steps between evals; 0 = only at the end
    eval_tokens: int = 16384  # held-out tokens per eval
    checkpoint_interval: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: str = "false"  # true: continue from <run_dir>/checkpoints/latest | latest_valid: from the newest intact
    # checkpoint (after a corrupt / truncated one) | false
    save: bool = True  # write checkpoints and the final consolidated weights (false: benchmarks, throwaway runs)
    tensorboard: bool = False
    progress: bool = True  # tqdm bar on rank 0
    stop_after_steps: int = 0  # stop (checkpointing) after this many steps of this process; testing / preemption drills
    init_from: Optional[str] = None  # start the student from these weights: a run / model dir or hf:PATH (same shape)
    compile: str = "auto"  # regional torch.compile of each transformer block: true | false | auto (on with CUDA)
    compile_backend: str = "inductor"  # torch.compile backend when compiling (inductor | aot_eager | eager)
    nonfinite: str = "stop"  # a step with a non-finite loss or gradient: stop (error naming step, micro-batch and
    # last good checkpoint) | skip (no update, counted in train.jsonl as skipped_steps)
    nonfinite_max_skips: int = 10  # skip: stop anyway after this many skipped steps in a row (0 = never)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Check every field and cross-field rule; raise ConfigError naming the key. Returns self."""
        m, p, z, o, d, data, t = self.model, self.parallel, self.zero, self.optim, self.distill, self.data, self.train
        m.validate()
        if m.logit_softcap and d.fused:
            raise ConfigError(f"model.logit_softcap={m.logit_softcap} needs materialised logits: the fused loss "
                              "(distill.fused=true) never forms them to cap; set distill.fused=false")
        _positive("parallel.tp_size", p.tp_size)
        _choice("parallel.backend", p.backend, ("auto", "nccl", "gloo"))
        _positive("parallel.timeout_s", p.timeout_s)
        problem = tp_split_problem(m, p.tp_size, lambda key: f"model.{key}")
        if problem:
            raise ConfigError(problem)
        if m.vocab_size % p.tp_size:
            raise ConfigError(f"parallel.tp_size={p.tp_size} does not divide model.vocab_size={m.vocab_size}")
        if not isinstance(p.sequence_parallel, bool):
            raise ConfigError(f"parallel.sequence_parallel={p.sequence_parallel!r} must be true or false")
        if p.sequence_parallel and self.train.seq_len % p.tp_size:
            raise ConfigError(f"parallel.sequence_parallel=true cuts each sequence into parallel.tp_size={p.tp_size} "
                              f"slices, but train.seq_len={self.train.seq_len} is not a multiple of it; use a "
                              "seq_len tp_size divides or parallel.sequence_parallel=false")
        _choice("zero.stage", z.stage, (0, 1, 2, 3))
        _choice("zero.offload_optimizer", z.offload_optimizer, ("none", "cpu"))
        _choice("zero.offload_param", z.offload_param, ("none", "cpu"))
        if z.offload_param != "none" and z.stage != 3:
            raise ConfigError(f"zero.offload_param={z.offload_param!r} needs zero.stage=3 (got {z.stage})")
        if z.offload_optimizer != "none" and z.stage == 0:
            raise ConfigError("zero.offload_optimizer='cpu' needs zero.stage >= 1")
        _positive("optim.lr", o.lr)
        _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(o, k) < 1:
                raise ConfigError(f"optim.{k}={getattr(o, k)} must be in [0, 1)")
        _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
        _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
        _choice("optim.schedule", o.schedule, ("cosine", "constant"))
        if not 0 <= o.final_lr_ratio <= 1:
            raise ConfigError(f"optim.final_lr_ratio={o.final_lr_ratio} must be in [0, 1]")
        _choice("train.mode", t.mode, ("supervised", "distill"))
        _choice("train.precision", t.precision, ("fp32", "bf16"))
        _choice("train.grad_accum_dtype", t.grad_accum_dtype, ("auto", "fp32", "bf16"))
        if t.grad_accum_dtype == "bf16" and t.precision == "fp32":
            raise ConfigError("train.grad_accum_dtype=bf16 needs train.precision=bf16 (an fp32 model's gradients are "
                              "fp32); drop it or set train.grad_accum_dtype=auto")
        if t.grad_accum_dtype == "fp32" and t.precision == "bf16" and z.stage == 0:
            raise ConfigError("train.grad_accum_dtype=fp32 with train.precision=bf16 needs zero.stage >= 1: "
                              "DeepSpeed's bf16 optimizer without ZeRO accumulates gradients in bf16; set zero.stage=1 "
                              "(on one DP rank it partitions nothing) or train.grad_accum_dtype=bf16")
        _choice("train.grad_reduce_dtype", t.grad_reduce_dtype, ("auto", "fp32", "bf16"))
        if t.grad_reduce_dtype == "bf16" and t.precision == "fp32":
            raise ConfigError("train.grad_reduce_dtype=bf16 needs train.precision=bf16; drop it or set "
                              "train.grad_reduce_dtype=auto")
        if t.grad_reduce_dtype == "fp32" and grad_dtypes(t.precision, z.stage, t.grad_accum_dtype)[0] == "bf16":
            raise ConfigError("train.grad_reduce_dtype=fp32 needs gradients accumulated in fp32 (train.grad_accum_dtype"
                              "=fp32 or auto, with zero.stage >= 1): bf16 sums reduced in fp32 come back as bf16")
        t.compile = str(t.compile).lower()  # a YAML / dotlist boolean arrives as True / False
        _choice("train.compile", t.compile, ("true", "false", "auto"))
        _choice("train.compile_backend", t.compile_backend, ("inductor", "aot_eager", "eager"))
        t.resume = str(t.resume).lower()  # a YAML / dotlist boolean arrives as True / False
        _choice("train.resume", t.resume, ("true", "false", "latest_valid"))
        _choice("train.nonfinite", t.nonfinite, ("stop", "skip"))
        _positive("train.nonfinite_max_skips", t.nonfinite_max_skips, allow_zero=True)
        if not isinstance(t.tf32, bool):
            raise ConfigError(f"train.tf32={t.tf32!r} must be true or false (false: fp32 matmuls in IEEE fp32 on CUDA)")
        for k in ("seq_len", "micro_batch_size", "global_batch_size", "log_interval", "eval_tokens", "keep_checkpoints"):
            _positive(f"train.{k}", getattr(t, k))
        for k in ("steps", "tokens", "tokens_per_param", "eval_interval", "checkpoint_interval", "z_loss",
                  "stop_after_steps", "moe_aux_loss", "moe_router_z_loss"):
            _positive(f"train.{k}", getattr(t, k), allow_zero=True)
        if not (t.steps or t.tokens or t.tokens_per_param):
            raise ConfigError("set one of train.steps, train.tokens or train.tokens_per_param (all are 0)")
        if world_size is not None:
            if world_size % p.tp_size:
                raise ConfigError(f"parallel.tp_size={p.tp_size} does not divide the world size {world_size}")
            dp = world_size // p.tp_size
            if t.global_batch_size % (t.micro_batch_size * dp):
                raise ConfigError(
                    f"train.global_batch_size={t.global_batch_size} is not divisible by "
                    f"train.micro_batch_size={t.micro_batch_size} x dp_size={dp}")
        _choice("data.source", data.source, ("synthetic", "files", "hf"))
        _choice("data.split", data.split, ("teacher", "student"))
        if not 0 < data.student_fraction < 1:
            raise ConfigError(f"data.student_fraction={data.student_fraction} must be in (0, 1)")
        if not 0 < data.eval_fraction < data.student_fraction:
            raise ConfigError(f"data.eval_fraction={data.eval_fraction} must be in (0, data.student_fraction)")
        if data.source == "files" and not data.files:
            raise ConfigError("data.source='files' needs data.files=[path, ...]")
        if data.source == "hf" and not data.hf_name:
            raise ConfigError("data.source='hf' needs data.hf_name (e.g. allenai/c4)")
        if data.source in ("files", "hf") and not data.tokenizer:
            raise ConfigError(f"data.source={data.source!r} needs data.tokenizer (a Hugging Face tokenizer dir)")
        if data.source == "synthetic":
            _positive("data.synthetic_order", data.synthetic_order)
            _positive("data.synthetic_branching", data.synthetic_branching)
            if data.synthetic_branching > m.vocab_size - 1:
                raise ConfigError(f"data.synthetic_branching={data.synthetic_branching} must be < model.vocab_size")
        if d.loss_kernel not in ("auto", "compiled", "eager"):
            raise ConfigError(f"distill.loss_kernel={d.loss_kernel!r} is not one of ['auto', 'compiled', 'eager']: "
                              "auto compiles the loss kernel on CUDA (torch.compile) and runs it eagerly on CPU; "
                              "set eager if torch.compile is unavailable")
        if t.mode == "distill":
            if not d.teacher:
                raise ConfigError("train.mode='distill' needs distill.teacher=<teacher run dir>")
            if not 0 <= d.kd_weight <= 1:
                raise ConfigError(f"distill.kd_weight={d.kd_weight} must be in [0, 1]")
            _positive("distill.temperature", d.temperature)
            if d.top_k is not None:
                _positive("distill.top_k", d.top_k)
                if d.top_k > m.vocab_size:
                    raise ConfigError(f"distill.top_k={d.top_k} exceeds model.vocab_size={m.vocab_size}")
            if d.top_p is not None and not 0 < d.top_p <= 1:
                raise ConfigError(f"distill.top_p={d.top_p} must be in (0, 1]")
            if d.chunk_tokens is not None:
                _positive("distill.chunk_tokens", d.chunk_tokens)
            _choice("distill.teacher_dtype", d.teacher_dtype, ("fp32", "bf16"))
            if not isinstance(d.teacher_prefetch, bool):
                raise ConfigError(f"distill.teacher_prefetch={d.teacher_prefetch!r} must be true or false (false: the "
                                  "teacher forward of each micro-batch runs just before its student forward)")
        return self


def _format_omegaconf_error(err: Exception) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)) and key:
        parent = ".".join(str(key).split(".")[:-1])
        valid = _valid_keys(parent)
        leaf = str(key).split(".")[-1]
        near = [f"{sec}.{leaf}" for sec in _valid_keys("") if leaf in _valid_keys(sec) and sec != parent]
        hint = f" (did you mean {' or '.join(near)}?)" if near else ""
        return f"unknown config key {key!r}{hint}; valid keys under {parent or 'top level'!r}: {valid}"
    if key:
        return f"config key {key!r}: {msg}"
    return msg


def _valid_keys(parent: str) -> List[str]:
    node = Config
    for part in [p for p in parent.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return []
        node = fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
        if node is None:
            return []
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def load(paths: List[str] = (), overrides: List[str] = (), world_size: Optional[int] = None) -> Config:
    """Merge YAML files then `key=value` overrides onto the schema; resolve sizes; validate.

    Raises ConfigError with the offending key on unknown keys, wrong types or inconsistent values.
    """
    schema = OmegaConf.structured(Config)
    given: Dict[str, str] = {}  # model.* keys set explicitly -> where (a size must not overwrite them silently)
    try:
        merged = schema
        for path in paths:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path!r} does not exist")
            node = OmegaConf.load(path)
            if isinstance(node, DictConfig):
                given.update({str(k): path for k in (node.get("model") or {})})
            merged = OmegaConf.merge(merged, node)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. train.steps=100)")
        given.update({o.split("=", 1)[0][len("model."):]: "the command line" for o in overrides
                      if o.startswith("model.")})
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: Config = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except (ValidationError, ConfigAttributeError, ConfigKeyError) as e:
        raise ConfigError(_format_omegaconf_error(e)) from None
    cfg.model.resolve(given)
    return cfg.validate(world_size)


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts / lists / scalars (the schema holds no enums or interpolations, so this is
    what OmegaConf.to_container(OmegaConf.structured(cfg)) gives, ~15x faster: a sweep writes hundreds of configs)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """YAML of to_dict(cfg), written by OmegaConf's own dumper: the text OmegaConf.to_yaml gives (tested)."""
    import yaml
    from omegaconf._utils import get_omega_conf_dumper
    return yaml.dump(to_dict(cfg), Dumper=get_omega_conf_dumper(), default_flow_style=False, allow_unicode=True,
                     sort_keys=False)


def from_dict(d: dict) -> Config:
    """Rebuild a Config from a resolved dict (e.g. a run dir's config.yaml); ignores no keys."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(d)))
    except (ValidationError, ConfigAttributeError, ConfigKeyError) as e:
        raise ConfigError(_format_omegaconf_error(e)) from None
    cfg.model.resolve()
    return cfg
