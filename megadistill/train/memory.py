"""Per-GPU memory and step-time model of the trainer's layouts (TP x ZeRO x teacher placement x checkpointing x fused
loss), the layout planner over it, and the `megadistill plan-memory` verb."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from itertools import product
from pathlib import Path
from typing import Dict, List, Optional, Union

from megadistill.config import Config, ModelConfig, grad_dtypes
from megadistill.errors import UserError
from megadistill.model.sizes import block_norms, kv_layout, param_counts
from megadistill.train import compile as compile_mod
from megadistill.train.engine import zero_stage_at

GIB = 2 ** 30
TERMS = ("student_weights", "gradients", "optimizer_states", "teacher_weights", "activations", "logits_loss",
         "zero_buffers", "step_transient")
# DeepSpeed defaults our generated config (train.engine.deepspeed_config) does not override. ZeRO-3 keeps a gathered
# parameter while it recurs within MAX_REUSE elements of the step's module trace (at most MAX_LIVE gathered): in a
# training step a module's parameters recur in its backward 2 x (params after it) later, so the last MAX_REUSE / 2
# elements of the forward stay gathered across the forward -> backward turn. Stage 0 all-reduces gradients through
# flat copies of up to ALLREDUCE_BUFFER elements.
ZERO3_MAX_REUSE = 10 ** 9
ZERO3_MAX_LIVE = 10 ** 9
# A ZeRO-3 teacher (train.engine.initialize_frozen) is fetched in coalesced all-gathers of DeepSpeed's default
# stage3_prefetch_bucket_size elements (overshooting by at most one parameter): each lands in a flat buffer that is
# then copied into the parameters, both alive until the bucket's first module has run, and the parameters are released
# module by module after use (measured on DeepSpeed 0.19.8: a teacher of 55.1M elements fetched in one bucket, 2 x its
# bytes live at its forward's start). How far the fetch runs ahead depends on the hooks' granularity:
# - compiled (Layout.compiled): each block is one ZeRO-3 leaf, fetched whole, at most max(bucket, block) gathered
#   (measured: blocks of 213k elements under a 40k bucket: 213k, exactly one block);
# - eager: every module's fetch (norms and containers included) prefetches up to one more bucket, so the look-ahead
#   grows wherever a block holds fewer than (its modules x bucket) elements: only ZERO3_MAX_LIVE bounds it (measured:
#   the same teacher 344k, 8.6 buckets; 7.08M-element blocks under a 1M bucket: 17.3M). Modelled as that bound.
ZERO3_PREFETCH_BUCKET = 50_000_000
ALLREDUCE_BUFFER = 500_000_000


@dataclass(frozen=True)
class Hardware:
    """The cluster a plan is for (defaults: H100-80GB SXM, 8 per node, NDR InfiniBand)."""

    gpu_mem_gib: float = 80.0
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # dense bf16 per GPU (H100 SXM); fp32 runs get half (TF32)
    mfu: float = 0.40  # assumed model-FLOPs utilisation of the compute
    intra_node_gbps: float = 300.0  # GB/s, effective NVLink collective bus bandwidth per GPU
    inter_node_gbps: float = 40.0  # GB/s, effective InfiniBand bandwidth per GPU (400 Gb/s NIC = 50 GB/s line)
    overhead_gib: float = 2.0  # fixed: CUDA context, NCCL communicators and buffers, cuBLAS workspaces
    expert_group_rows: int = 16  # a mixture's expert groups padded to this many rows (kernels.group_rows on CUDA)
    fragmentation: float = 0.10  # share of the modelled peak lost to the caching allocator


@dataclass(frozen=True)
class Layout:
    """One way to run a job: what the planner enumerates and estimate() reads off a Config."""

    tp_size: int
    zero_stage: int
    micro_batch_size: int
    checkpointing: str = "off"  # off | full | every_k
    checkpoint_every_k: int = 2
    fused: bool = False
    teacher_zero3: bool = False
    teacher_prefetch: bool = True  # distill.teacher_prefetch: the next micro-batch's teacher forward runs before the
    # student's backward, beside its saved activations
    chunk_tokens: int = 1024
    bucket_size: int = 50_000_000  # ZeRO reduce / prefetch bucket (elements)
    sequence_parallel: bool = False  # parallel.sequence_parallel (no effect at tp_size 1)
    grad_accum: str = "auto"  # train.grad_accum_dtype: auto | fp32 | bf16 (bf16 runs; see fp32_accumulation)
    grad_reduce: str = "auto"  # train.grad_reduce_dtype: auto (as accumulated) | fp32 | bf16
    document_mask: bool = False  # data.document_mask (attention masks: mask_bytes)
    compiled: bool = True  # train.compile in effect (auto: on a GPU): ZeRO-3 gathers each block whole
    # (megadistill.train.compile.mark_zero3_leaves), a fetch unit of max(bucket, one block's parameters)

    def describe(self) -> str:
        ck = self.checkpointing if self.checkpointing != "every_k" else f"every_{self.checkpoint_every_k}"
        return (f"tp={self.tp_size}{'+sp' if self.sp else ''} zero={self.zero_stage} mb={self.micro_batch_size} "
                f"ckpt={ck} fused={'on' if self.fused else 'off'}" + (" teacher=zero3" if self.teacher_zero3 else ""))

    @property
    def sp(self) -> bool:
        """Sequence parallelism in effect (it needs tp_size > 1)."""
        return self.sequence_parallel and self.tp_size > 1


def fp32_accumulation(layout: Layout, zero_stage: int, precision: str) -> bool:
    """Whether a bf16 run accumulates and reduces gradients in fp32 (train.engine.grad_accum_dtype) at the stage the
    engine runs: DeepSpeed's BF16_Optimizer at ZeRO-1 (a full fp32 gradient buffer, all-reduced at the boundary),
    fp32 gradient partitions at ZeRO-2/3 (reduce-scattered in fp32 every micro-step)."""
    return precision == "bf16" and grad_dtypes(precision, zero_stage, layout.grad_accum)[0] == "fp32"


def reduce_bytes(layout: Layout, zero_stage: int, precision: str) -> int:
    """Bytes per gradient element in the DP reductions (train.engine.grad_reduce_dtype)."""
    return 4 if grad_dtypes(precision, zero_stage, layout.grad_accum, layout.grad_reduce)[1] == "fp32" else 2


def resolve_model(model: Union[str, ModelConfig], role: str = "model") -> ModelConfig:
    """A ModelConfig from a size name of megadistill.model.sizes, a Hugging Face folder hf:PATH (its config.json; no
    weights are read) or a megadistill run / model dir, or as given; else a UserError listing the known names."""
    if isinstance(model, ModelConfig):
        return model
    from megadistill.model.sizes import SIZES
    if model in SIZES:
        return ModelConfig(size=model).resolve()
    from megadistill.hf.config import hf_path
    if hf_path(model) is not None or Path(model).is_dir():
        from megadistill.train.teacher import weights_source
        return weights_source(model)[0]
    raise UserError(f"{role} {model!r} is none of the known sizes: {', '.join(SIZES)}; nor hf:PATH (a local Hugging "
                    "Face folder), nor a megadistill run / model dir")


def rank_params(m: ModelConfig, tp: int) -> Dict[str, int]:
    """Elements one TP rank stores (megadistill.model.sizes.param_counts: what is split over TP and what replicated),
    both vocabulary matrices unless tied; `largest_group`: the largest optimizer group; `block`: one transformer
    block's (the final norm's few elements included)."""
    c = param_counts(m, tp)
    # optimizer groups are the µP roles (hidden, embedding, head, norm, bias): foreach Adam works one group at a time
    return {"total": c["matrices"] + c["vectors"] + (1 if m.tie_embeddings else 2) * c["vocab"],
            "largest_group": max(c["matrices"], c["vocab"]), "vocab": c["vocab"],
            "block": (c["matrices"] + c["vectors"]) // m.n_layers}


def explicit_scores(m: ModelConfig) -> bool:
    """Whether m's attention forms its [b, h/tp, s, s] scores (model.attention=eager, or sdpa with an attention
    softcap, which SDPA cannot apply: megadistill.model.attention.attention); flash-attn, SDPA and flex never do."""
    return m.attention == "eager" or (m.attention == "sdpa" and m.attn_softcap > 0)


def scores_bytes_per_token(m: ModelConfig, tp: int, wb: int, seq_len: int) -> float:
    """What the explicit-scores path keeps per token and block for backward beyond SDPA / flash-attn: the fp32
    softmax output (and the tanh output of a softcap) over seq_len keys and fp32 copies of q, k and v (k and v
    repeated to every query head), in place of the kernels' q, k, v in the model dtype and their log-sum-exp."""
    if not explicit_scores(m):
        return 0.0
    h = m.n_heads / tp
    kernel = wb * (h * m.head_dim + 2 * max((m.n_kv_heads or m.n_heads) / tp, 1) * m.head_dim) + 4 * h
    return 4 * h * ((2 if m.attn_softcap else 1) * seq_len + 3 * m.head_dim) - kernel


def activation_bytes_per_token(m: ModelConfig, tp: int, wb: int, sequence_parallel: bool = False,
                               seq_len: int = 0) -> float:
    """Bytes autograd keeps per token for one block without checkpointing; wb = bytes of the model dtype; seq_len:
    the keys each query attends over, for an attention that forms its scores (scores_bytes_per_token).

    RMSNorm keeps only its input (model dtype) and one fp32 rsqrt per row; its output is kept by the next matmul:
    2 wb per element for attn_norm and ffn_norm over the replicated d; for the QK-norms over this rank's q and k
    (d/tp each; q = h hd and kv = h_kv hd under GQA) the input is the projection output and the rotary output is kept
    by attention: 2 wb each. v and the attention output cost wb each (flash / SDPA keep q, k, v, out and an fp32 log-sum-exp, no s x s matrix).
    SwiGLU keeps gate, up, silu(gate) and their product: 4 wb f/tp (a plain MLP, model.ffn_gated=false: 2 wb f/tp).
    fp32: 16 d + 24 d/tp + 16 f/tp;
    bf16: 8 d + 12 d/tp + 8 f/tp.
    Sequence parallelism: the two norms keep only this rank's sequence slice of their input (wb d/tp each, and
    their rsqrt), and so do the column matmuls (megadistill.parallel.mappings.columns_entry keeps the slice of the
    norm output and all-gathers it again in backward): 4 wb d becomes 4 wb d/tp.
    Post-norm blocks (OLMo 2) keep the same: each norm's input is a sublayer output, the matmuls' input the residual
    stream. Sandwich blocks (Gemma 3) add two norms on sublayer outputs: 2 wb d (/tp under SP) and their rsqrt.
    Without a QK-norm the projections' q and k are not kept: 2 wb (q + kv). A parallel-residual block's two norms
    read one x. LayerNorms keep an fp32 copy of their input (one per norm in bf16) and a mean beside the rsqrt;
    clamped q / k / v (qkv_clip) keep the clamps' inputs; a mixture of experts keeps, per routed copy of a token,
    the experts' input and output rows (2 wb d, whole inside the TP region) and their SwiGLU intermediates; an attention
    that forms its scores keeps them
    (scores_bytes_per_token). Each checked against the live tensors of a forward (tests/test_memory_plan.py).
    """
    d, f, h = m.d_model, m.d_ff, m.n_heads
    q, kv = h * m.head_dim, (m.n_kv_heads or h) * m.head_dim  # = d, d without GQA (the paper's sizes)
    kv_local = max(kv / tp, m.head_dim)  # fewer key/value heads than ranks: one each
    s = tp if sequence_parallel else 1  # slices of the residual stream
    extra = block_norms(m) - 2  # norms beyond the two of a pre- / post-norm block
    ffn = (4 if m.ffn_gated else 2) * wb * f / tp  # a plain MLP keeps W1 x and act(W1 x)
    if m.moe_experts:  # per routed copy of a token (top_k of them): the experts' input and output rows, their SwiGLU
        # intermediates, the copy's weight and three int64 indices (its id, its row in the grouped order and back);
        # per token the router's fp32 probabilities
        ffn = m.moe_top_k * (ffn + 2 * wb * d + wb + 24) + 4 * m.moe_experts
        if m.moe_shared_ff:  # a shared expert (Qwen2-MoE): its SwiGLU intermediates and its output for the gate
            ffn += 4 * wb * m.moe_shared_ff / tp + wb * d
    # without a QK-norm nothing keeps the projections' q and k (RoPE keeps only its tables)
    per = (4 + 2 * extra) * wb * d / s + (3 if m.qk_norm else 2) * wb * (q / tp + kv_local) + ffn
    layer_norm = m.norm_type != "rms"  # F.layer_norm keeps an fp32 copy of its input (x itself in fp32) and a mean
    inputs = 2 + extra  # norm inputs kept; a parallel-residual block's two norms read one x (one copy in fp32)
    if m.parallel_residual and not (layer_norm and wb != 4):
        inputs -= 1
        per -= wb * d / s
    if layer_norm:
        per += inputs * (4 - wb) * d / s + 4 * (2 + extra) / s
    if m.qkv_clip:  # each clamp keeps its input (where it was in range)
        per += wb * (q / tp + 2 * kv_local)
    per += scores_bytes_per_token(m, tp, wb, seq_len)
    return per + 4 * ((2 + extra) / s + 3 * h / tp)  # fp32 rsqrt of the norms and the attention log-sum-exp


def checkpointed_blocks(n_layers: int, checkpointing: str, every_k: int = 2) -> int:
    """Blocks the model recomputes in backward: none, all, or blocks 0, k, 2k, ... (Transformer._checkpointed)."""
    if checkpointing == "off":
        return 0
    return n_layers if checkpointing == "full" else len(range(0, n_layers, every_k))


def expert_padding_rows(m: ModelConfig, group_rows: int = 1) -> int:
    """Zero rows a mixture block's experts run with their groups padded to group_rows rows (kernels.pad_groups, on
    CUDA): at most (E + 1) (group_rows - 1). 0 for a dense model or group_rows 1."""
    return (m.moe_experts + 1) * (group_rows - 1) if m.moe_experts and group_rows > 1 else 0


def expert_padding_bytes(m: ModelConfig, tokens: int, tp: int, wb: int, group_rows: int = 1) -> float:
    """What padding a mixture's expert groups adds to one block's saved activations: the padding rows through the
    experts (their input row and SwiGLU intermediates) and an int64 row index per routed copy."""
    rows = expert_padding_rows(m, group_rows)
    return rows * (wb * m.d_model + 4 * wb * m.d_ff / tp) + 8 * m.moe_top_k * tokens if rows else 0.0


def activation_bytes(m: ModelConfig, tokens: int, tp: int, wb: int, checkpointing: str = "off",
                     every_k: int = 2, sequence_parallel: bool = False, seq_len: int = 0,
                     group_rows: int = 1) -> float:
    """Saved student activations for `tokens` tokens (sequences of seq_len) at the start of backward, incl. one
    recomputed block; group_rows: a mixture's expert group padding (expert_padding_bytes)."""
    layer = (activation_bytes_per_token(m, tp, wb, sequence_parallel, seq_len) * tokens
             + expert_padding_bytes(m, tokens, tp, wb, group_rows))
    s = tp if sequence_parallel else 1
    n_ckpt = checkpointed_blocks(m.n_layers, checkpointing, every_k)
    # a checkpointed block keeps its input (this rank's sequence slice under sequence parallelism)
    saved = (m.n_layers - n_ckpt) * layer + n_ckpt * wb * m.d_model * tokens / s
    recompute = layer if n_ckpt else 0.0  # backward rebuilds one checkpointed block at a time
    final_norm = wb * m.d_model * tokens * (1 / s + 1)  # its input (slice), and its (gathered) output kept by the head
    return saved + recompute + final_norm


def loss_bytes(tokens: int, m: ModelConfig, tp: int, wb: int, fused: bool, chunk_tokens: int = 1024,
               teacher: Optional[ModelConfig] = None, tb: int = 4) -> float:
    """Peak logits / loss buffers of one micro-batch, the teacher outputs it consumes included."""
    v = m.vocab_size // tp
    c = min(chunk_tokens, tokens)
    if not fused:
        # the single-pass loss on materialised logits (fused_loss.logits_distill_loss, inplace): the student logits
        # become their own gradient; per chunk, fp32 copies of bf16 logits and, with KD, an fp32 copy of the
        # teacher's chunk (bf16: the cast; fp32: the teacher's logits are inference tensors, never overwritten) and
        # the teacher's exp()
        teacher_logits = tb * tokens * v if teacher is not None else 0.0
        work = (1.0 if wb == 2 else 0.0) + (2.0 if teacher is not None else 0.0)
        return loss_saved_bytes(tokens, m, tp, wb, fused) + teacher_logits + work * 4 * c * v
    # per chunk: fp32 student logits (+ the bf16 matmul output it came from); with KD also the teacher's and exp()
    chunk = (3.0 if teacher is not None else 1.0 + (0.5 if wb == 2 else 0.0)) * 4 * c * v
    hidden_t = tb * tokens * teacher.d_model if teacher is not None else 0.0
    return chunk + loss_saved_bytes(tokens, m, tp, wb, fused) + hidden_t


def loss_saved_bytes(tokens: int, m: ModelConfig, tp: int, wb: int, fused: bool) -> float:
    """What the loss keeps from its forward for the backward: the student logits overwritten with their gradient
    (single-pass loss on materialised logits), or the fused loss's dL/dW accumulated in fp32 (+ its saved copy in the
    model dtype) and dL/dh, both computed in the forward."""
    v = m.vocab_size // tp
    if not fused:
        return wb * tokens * v
    return 4 * v * m.d_model + (wb * v * m.d_model if wb != 4 else 0) + wb * tokens * m.d_model


def mask_bytes(m: ModelConfig, micro_batch: int, seq_len: int, wb: int, documents: bool, training: bool) -> float:
    """The attention masks of one forward (megadistill.model.attention.build_mask), for each kind of block (sliding /
    full) that documents or a window shorter than the sequence restrict: [b, 1, s, s] each (b = 1 for a window
    alone). SDPA gets a bool mask and its additive bias in the model dtype, made once per forward; training keeps the
    bias for backward (the bool dies with the forward), a forward without autograd (the teacher's) holds both.
    Explicit scores (eager, or SDPA with a softcap) invert the bool mask in every layer, and training keeps each.
    flash-attn takes run starts and flex a block mask, O(b s) and O(b (s / 128)^2): not counted."""
    if m.attention in ("flash", "flex"):
        return 0.0
    kinds = m.block_kinds
    size = (micro_batch if documents else 1) * seq_len ** 2
    total = 0.0
    for kind in set(kinds):
        if not (documents or (kind == "sliding" and 0 < m.sliding_window < seq_len)):
            continue
        if explicit_scores(m):
            total += size * (kinds.count(kind) if training else 2)
        else:
            total += size * (wb if training else 1 + wb)
    return total


def teacher_block_bytes(m: ModelConfig, tokens: int, tp: int, tb: int, group_rows: int = 1) -> float:
    """Peak of one block's intermediates in a forward without autograd (the teacher's), before attention scores. A
    mixture of experts peaks in its experts' down projection, per routed copy of a token (and per padding row, with
    expert groups padded to group_rows rows: kernels.pad_groups, + an int64 index per copy): the copies' input and
    output rows (whole d inside the TP region) and the gate, up and activation rows (f/tp), beside the block's
    residual stream, plus the router's fp32 probabilities (within 1% of the live tensors,
    tests/test_memory_plan.py)."""
    d, f = m.d_model, m.d_ff
    if m.moe_experts:  # a shared expert runs after the routed ones: its SwiGLU rows beside their summed output
        copies = m.moe_top_k * tokens
        pad = expert_padding_rows(m, group_rows)
        routed = tb * ((copies + pad) * (2 * d + 3 * f / tp) + 3 * d * tokens) + (8 * copies if pad else 0)
        shared = tb * tokens * (4 * m.moe_shared_ff / tp + 4 * d) if m.moe_shared_ff else 0
        return max(routed, shared) + 4 * tokens * m.moe_experts
    return tb * tokens * (3 * f + 4 * d) / tp


def estimate_layout(student: ModelConfig, layout: Layout, world_size: int, seq_len: int, global_batch_size: int,
                    precision: str = "bf16", teacher: Optional[ModelConfig] = None, teacher_dtype: str = "bf16",
                    hardware: Hardware = Hardware()) -> Dict:
    """Per-GPU memory of one layout (bytes): the TERMS at the peak phase, `modeled` (their sum), the allowance
    `overhead`, `total`, and every phase's modelled total in `phases`.

    Phases: forward_backward (all saved activations with the loss buffers, or a little later in backward with
    ZeRO-1/2's reduce bucket and the head's gradient), backward_end (gradients complete, activations freed),
    optimizer_step (fp32 gradient copies and foreach temporaries), teacher_forward (distillation: with
    teacher_prefetch, the next micro-batch's teacher forward beside the student's saved activations and the loss's
    saved gradient; its output then lives through the backward and, for a step's last micro-batch, the optimizer step).
    """
    tp = layout.tp_size
    dp = world_size // tp
    z = zero_stage_at(layout.zero_stage, dp, precision)  # what the engine runs (train.engine.effective_stage)
    wb, tb = (2 if precision == "bf16" else 4), (2 if teacher_dtype == "bf16" else 4)
    n = layout.micro_batch_size * seq_len  # tokens per micro-step on this rank
    gas = max(1, global_batch_size // (layout.micro_batch_size * dp))
    sp = rank_params(student, tp)
    P, share = sp["total"], (dp if z >= 1 else 1)
    acc32 = fp32_accumulation(layout, z, precision)
    bf16_opt = acc32 and z == 1  # DeepSpeed's BF16_Optimizer
    rb = reduce_bytes(layout, z, precision)

    weights = wb * P / (dp if z == 3 else 1)
    master = 4 * P / share if (wb == 2 or z >= 1) else 0.0  # ZeRO 1-3 clone an fp32 partition even for fp32 models
    optim = master + 8 * P / share  # + Adam's exp_avg and exp_avg_sq
    teacher_w = t_gather = 0.0
    t_part = False
    if teacher is not None:
        trank = rank_params(teacher, tp)
        tparams = trank["total"]
        t_part = layout.teacher_zero3 and dp > 1
        teacher_w = tb * tparams / (dp if t_part else 1)
    common = {"student_weights": weights, "optimizer_states": optim, "teacher_weights": teacher_w}

    bucket = wb * layout.bucket_size if z >= 1 else 0.0  # ZeRO's contiguous reduce (ipg) buffer
    if acc32 and z == 3:  # its reduce bucket is in the reduction's dtype (fp32 unless train.grad_reduce_dtype=bf16)
        bucket = rb * layout.bucket_size
    fetch = max(layout.bucket_size, sp["block"]) if layout.compiled else layout.bucket_size  # one coalesced gather
    gathered = wb * min(P, ZERO3_MAX_LIVE, ZERO3_MAX_REUSE // 2 + fetch) if z == 3 else 0.0
    # ZeRO-1/2 copy reduced gradients into a buffer holding every parameter that overlaps this rank's partition:
    # P/dp plus the parameters straddling its ends, i.e. whole single-tensor groups (embedding, head) and about
    # two matrices of the hidden group
    matrix = max(student.d_model * student.d_ff, student.d_model * student.n_heads * student.head_dim) // tp
    in_partition = min(P, (P - 2 * sp["vocab"]) / dp + 2 * matrix + 2 * sp["vocab"]) if z in (1, 2) else 0.0
    # fp32 accumulation: BF16_Optimizer's full fp32 gradient (ZeRO-1), one flat fp32 buffer of exactly this rank's
    # partition (ZeRO-2/3)
    grads_partition = {0: wb * P, 1: 4 * P if bf16_opt else wb * in_partition,
                       2: 4 * P / dp if acc32 else wb * in_partition, 3: (4 if acc32 else wb) * P / dp}[z]
    # held through forward/backward: ZeRO-3's flat partition buffer always, others only while accumulating
    # (stage 0 and 1 reduce at the accumulation boundary, so they hold full gradients until then); BF16_Optimizer
    # allocates its fp32 gradient at start-up and keeps it, each parameter's bf16 gradient added to it as soon as
    # autograd has it, and freed (immediate_grad_update, train.engine.deepspeed_config)
    grads_fb = grads_partition if z == 3 or bf16_opt else (
        (wb * P if z < 2 else grads_partition) if gas > 1 else 0.0)

    acts = activation_bytes(student, n, tp, wb, layout.checkpointing, layout.checkpoint_every_k, layout.sp, seq_len,
                            hardware.expert_group_rows)
    acts += mask_bytes(student, layout.micro_batch_size, seq_len, wb, layout.document_mask, training=True)
    loss = loss_bytes(n, student, tp, wb, layout.fused, layout.chunk_tokens, teacher, tb)
    if teacher is not None and layout.fused and t_part:  # the trainer gathers the teacher's head for the fused loss
        loss += tb * teacher.vocab_size // tp * teacher.d_model
    fb = dict(common, gradients=grads_fb, activations=acts, logits_loss=loss, zero_buffers=gathered, step_transient=0.0)
    if z == 3:
        fb["zero_buffers"] += bucket  # allocated at start-up
    elif z >= 1 and bucket + wb * sp["vocab"] > loss:
        # stages 1/2 allocate the bucket at the first parameter gradient (the head's), after the loss buffers died
        fb["logits_loss"], fb["zero_buffers"] = wb * sp["vocab"], bucket

    # end of backward: stage 1 still holds every parameter's gradient while it reduces them into its partition
    end_grads = {0: wb * P, 1: wb * P + grads_partition, 2: grads_partition, 3: grads_partition}[z]
    if bf16_opt:  # all-reduced (DP > 1) through flat fp32 copies of up to ALLREDUCE_BUFFER elements (+ a bf16 cast)
        end_grads = grads_partition + ((4 + (2 if rb == 2 else 0)) * min(P, ALLREDUCE_BUFFER) if dp > 1 else 0.0)
    # optimizer step: stage 0 bf16 makes fp32 copies of all gradients; ZeRO 1-3 flatten the partition's gradients
    # into the fp32 partition's .grad; foreach Adam adds a sqrt(v) temporary of its largest group; stage 0 with
    # DP all-reduces through flat gradient copies
    fp32_grads = 4 * P / share if (wb == 2 or z >= 1) else 0.0
    if bf16_opt:  # the fp32 partition's .grad is a view of the fp32 gradient buffer
        fp32_grads = 0.0
    transient = fp32_grads + 4 * sp["largest_group"] / share
    if z == 0 and dp > 1:
        transient += wb * min(P, ALLREDUCE_BUFFER)
    phases = {"forward_backward": fb,
              "backward_end": dict(common, gradients=end_grads, activations=0.0, logits_loss=0.0,
                                   zero_buffers=bucket + gathered, step_transient=0.0),
              "optimizer_step": dict(common, gradients=grads_partition, activations=0.0, logits_loss=0.0,
                                     zero_buffers=bucket if z == 3 else 0.0, step_transient=transient)}
    if teacher is not None:
        t_out = tb * n * (teacher.d_model if layout.fused else teacher.vocab_size // tp)
        t_work = teacher_block_bytes(teacher, n, tp, tb, hardware.expert_group_rows)
        if explicit_scores(teacher):  # its fp32 scores and softmax over seq_len keys, one block at a time
            t_work += 8 * n * teacher.n_heads / tp * seq_len
        t_work = max(t_work, t_out) + mask_bytes(teacher, layout.micro_batch_size, seq_len, tb, layout.document_mask,
                                                 training=False)
        if t_part:  # gathered parameters (a bucket or a whole block; eager: up to max-live) beside a flat buffer
            reach = max(ZERO3_PREFETCH_BUCKET, trank["block"]) + trank["vocab"] if layout.compiled else ZERO3_MAX_LIVE
            t_gather = tb * min(tparams, reach)
            t_work = max(t_work, t_gather)
        # what the student keeps meanwhile: nothing of this micro-step without prefetch (the previous one's teacher
        # outputs died with its loss); with it, everything its backward needs
        student_acts = acts if layout.teacher_prefetch else 0.0
        student_loss = loss_saved_bytes(n, student, tp, wb, layout.fused) if layout.teacher_prefetch else 0.0
        phases["teacher_forward"] = dict(common, gradients=grads_fb, activations=student_acts + t_work,
                                         logits_loss=student_loss,
                                         zero_buffers=t_gather + (bucket if z == 3 else 0.0)
                                         + (gathered if layout.teacher_prefetch else 0.0),
                                         step_transient=0.0)
        if layout.teacher_prefetch:  # the next step's first teacher output, made before this step's last backward
            for name in ("backward_end", "optimizer_step"):
                phases[name]["logits_loss"] += t_out
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak = max(totals, key=totals.get)
    modeled = totals[peak]
    allowance = hardware.overhead_gib * GIB + hardware.fragmentation * modeled
    return dict(phases[peak], modeled=modeled, overhead=allowance, total=modeled + allowance, phase=peak,
                phases=totals, zero_stage=z, dp_size=dp, grad_accum=gas, tokens_per_micro_step=n)


def layout_of(cfg: Config, device: str = "cuda") -> Layout:
    """cfg's Layout on `device` (train.compile=auto resolves per device type: a plan is for GPUs)."""
    m, d = cfg.model, cfg.distill
    return Layout(tp_size=cfg.parallel.tp_size, zero_stage=cfg.zero.stage, micro_batch_size=cfg.train.micro_batch_size,
                  checkpointing=m.activation_checkpointing, checkpoint_every_k=m.checkpoint_every_k, fused=d.fused,
                  teacher_zero3=d.teacher_zero3, teacher_prefetch=d.teacher_prefetch,
                  bucket_size=cfg.zero.bucket_size,
                  # unset: 1024 eager; the compiled kernel's GPU chunk is sized to the same bytes
                  chunk_tokens=d.chunk_tokens or 1024,
                  sequence_parallel=cfg.parallel.sequence_parallel, grad_accum=cfg.train.grad_accum_dtype,
                  grad_reduce=cfg.train.grad_reduce_dtype, document_mask=cfg.data.document_mask,
                  compiled=compile_mod.enabled(cfg, device))


def estimate(cfg: Config, world_size: int, teacher: Union[None, str, ModelConfig] = None,
             hardware: Hardware = Hardware(), device: str = "cuda") -> Dict:
    """Per-GPU memory breakdown (bytes) of a trainer Config on `world_size` processes; see estimate_layout.
    `device`: where it runs, for train.compile=auto (the CPU measurements of tools/measure_memory.py pass "cpu").

    For a distillation config the teacher's shape comes from `teacher` (see resolve_model) or else from what
    distill.teacher points at (a run / model dir, or hf:PATH).
    """
    cfg.validate(world_size)
    if cfg.zero.offload_optimizer != "none" or cfg.zero.offload_param != "none":
        raise UserError("the memory model covers GPU-resident ZeRO only; set zero.offload_optimizer=none and "
                        "zero.offload_param=none to estimate")
    tmodel = None
    if cfg.train.mode == "distill":
        if teacher is None:  # a run / model dir or hf:PATH (its config.json)
            from megadistill.train.teacher import weights_source
            tmodel = weights_source(cfg.distill.teacher)[0]
        else:
            tmodel = resolve_model(teacher, "teacher")
        tmodel = replace(tmodel, attention=cfg.model.attention)  # the run's backend, as the trainer sets it
    return estimate_layout(cfg.model, layout_of(cfg, device), world_size, cfg.train.seq_len,
                           cfg.train.global_batch_size, cfg.train.precision, tmodel, cfg.distill.teacher_dtype,
                           hardware)


def step_time(student: ModelConfig, layout: Layout, world_size: int, seq_len: int, global_batch_size: int,
              precision: str = "bf16", teacher: Optional[ModelConfig] = None, teacher_dtype: str = "bf16",
              hardware: Hardware = Hardware()) -> Dict:
    """Estimated seconds per optimizer step: compute at the assumed MFU + TP and ZeRO communication, not overlapped.

    Compute: tokens x (3 F(N_S) + F(N_T) + recomputed block forwards) / GPUs, F from PAPER.md (Eq. 9) with each
    model's own aspect ratio. Communication as ring collectives (an all-reduce moves 2 (p-1)/p of the message per
    GPU, a reduce-scatter or all-gather (p-1)/p): per micro-step the TP group all-reduces [tokens, d] activations
    2 L + 1 times forward and 2 L + 1 backward (+ 2 per recomputed block; teacher: 2 L_T + 1); ZeRO moves the
    gradient bytes G: stage 0 all-reduce per step, stage 1 reduce-scatter per step + parameter all-gather, stage 2
    reduce-scatter per micro-step + all-gather, stage 3 two parameter all-gathers + a reduce-scatter per
    micro-step; a ZeRO-3 teacher all-gathers its weights per micro-step. bf16 gradients accumulated in fp32
    (train.grad_accum_dtype) are reduced in fp32: twice the gradient bytes, and ZeRO-1 (BF16_Optimizer) all-reduces
    them. TP stays inside a node (NVLink); DP crosses
    nodes (InfiniBand) once the job spans more than one node.
    """
    from megadistill.train.metrics import forward_flops
    tp = layout.tp_size
    dp = world_size // tp
    wb, tb = (2 if precision == "bf16" else 4), (2 if teacher_dtype == "bf16" else 4)
    mb = layout.micro_batch_size
    gas = max(1, global_batch_size // (mb * dp))
    n = mb * seq_len
    tokens = global_batch_size * seq_len
    f_s = forward_flops(student, seq_len)
    f_t = forward_flops(teacher, seq_len) if teacher is not None else 0.0
    n_ck = checkpointed_blocks(student.n_layers, layout.checkpointing, layout.checkpoint_every_k)
    recompute = n_ck / student.n_layers * (f_s - 2 * student.vocab_size * student.d_model)  # blocks, not the head
    peak = hardware.peak_tflops * 1e12 * (1.0 if precision == "bf16" else 0.5)
    compute = tokens * (3 * f_s + f_t + recompute) / world_size / (hardware.mfu * peak)

    bw_tp = (hardware.intra_node_gbps if tp <= hardware.gpus_per_node else hardware.inter_node_gbps) * 1e9
    tp_bytes = 0.0
    if tp > 1:
        student_msgs = 2 * (2 * student.n_layers + 1) + 2 * n_ck
        tp_bytes = student_msgs * wb * n * student.d_model
        if teacher is not None:
            tp_bytes += (2 * teacher.n_layers + 1) * tb * n * teacher.d_model
        tp_bytes *= gas * 2 * (tp - 1) / tp
    bw_dp = (hardware.intra_node_gbps if world_size <= hardware.gpus_per_node else hardware.inter_node_gbps) * 1e9
    dp_bytes = 0.0
    if dp > 1:
        P = rank_params(student, tp)["total"]
        z = zero_stage_at(layout.zero_stage, dp, precision)
        acc32 = fp32_accumulation(layout, z, precision)
        g, w = reduce_bytes(layout, z, precision) * P, wb * P  # gradient bytes on the wire, weight bytes
        frac = (dp - 1) / dp
        # ZeRO-1 with fp32 accumulation (BF16_Optimizer) all-reduces the fp32 gradient, then all-gathers weights
        per_step = {0: 2 * frac * g, 1: (2 * frac * g if acc32 else frac * g) + frac * w,
                    2: gas * frac * g + frac * w, 3: gas * (2 * frac * w + frac * g)}
        dp_bytes = per_step[z]
        if teacher is not None and layout.teacher_zero3:
            dp_bytes += gas * frac * tb * rank_params(teacher, tp)["total"]
    t_tp, t_dp = tp_bytes / bw_tp, dp_bytes / bw_dp
    total = compute + t_tp + t_dp
    useful = tokens * (3 * f_s + f_t)  # PAPER.md's accounting: recomputation is not useful work
    return {"step_s": total, "compute_s": compute, "tp_comm_s": t_tp, "dp_comm_s": t_dp,
            "tokens_per_s": tokens / total, "mfu": useful / (total * world_size * peak), "grad_accum": gas}


def tp_candidates(student: ModelConfig, teacher: Optional[ModelConfig], gpus: int, gpus_per_node: int) -> List[int]:
    """TP degrees inside one node that divide the GPUs, both models' query heads, d_ff and the vocabulary, and lay
    out their key/value heads (dividing them, or a multiple of them: replicated heads)."""
    models = [m for m in (student, teacher) if m is not None]
    return [t for t in range(1, min(8, gpus_per_node, gpus) + 1)
            if gpus % t == 0 and all(m.n_heads % t == 0 and _kv_splits(m, t) and m.d_ff % t == 0
                                     and m.vocab_size % t == 0 for m in models)]


def _kv_splits(m: ModelConfig, tp: int) -> bool:
    """Whether TP can lay out m's key/value heads: a share of them per rank, or one replicated (tp a multiple of
    them; not with a QK-norm over all of them, which needs every head's k on each rank)."""
    layout = kv_layout(m.n_kv_heads or m.n_heads, tp)
    return layout == "split" or (layout == "replicated" and not (m.qk_norm and m.qk_norm_scope == "full"))


def plan(student: Union[str, ModelConfig], teacher: Union[None, str, ModelConfig] = None, gpus: int = 8,
         seq_len: int = 4096, global_batch_tokens: int = 2 ** 22, precision: str = "bf16",
         teacher_dtype: str = "bf16", hardware: Hardware = Hardware(), micro_batches=(1, 2, 4, 8, 16, 32),
         checkpointing=("off", "full"), zero_stages=(0, 1, 2, 3), fused=(False, True), chunk_tokens: int = 1024,
         bucket_size: int = 50_000_000, sequence_parallel=(False, True), grad_accum_dtype: str = "auto",
         grad_reduce_dtype: str = "auto", document_mask: bool = False,
         attention: Optional[str] = None, compiled: bool = True) -> List[Dict]:
    """Every layout with its memory and step time; fitting ones first, fastest first (then leanest), then the rest
    by memory. Raises UserError for impossible inputs (unknown size, batch that does not split, nothing fits).
    attention: model.attention of both models (None: as their configs say); document_mask: data.document_mask;
    compiled: train.compile in effect (its GPU default; False plans eager runs: ZeRO-3's per-module fetches)."""
    smodel, tmodel = resolve_model(student, "student"), (resolve_model(teacher, "teacher") if teacher else None)
    if attention is not None:
        smodel = replace(smodel, attention=attention)
        tmodel = replace(tmodel, attention=attention) if tmodel is not None else None
    if gpus < 1 or seq_len < 1:
        raise UserError(f"--gpus={gpus} and --seq-len={seq_len} must be >= 1")
    if global_batch_tokens % seq_len:
        raise UserError(f"--global-batch-tokens={global_batch_tokens} is not a multiple of --seq-len={seq_len}")
    batch = global_batch_tokens // seq_len  # sequences per optimizer step
    if any(m is not None and m.logit_softcap for m in (smodel, tmodel)):  # Gemma 2: capped logits are materialised
        fused = tuple(f for f in fused if not f) or (False,)
    tps = tp_candidates(smodel, tmodel, gpus, hardware.gpus_per_node)
    if not tps:
        raise UserError(f"no tensor-parallel degree <= {min(8, hardware.gpus_per_node)} divides --gpus={gpus} and "
                        "the models' heads, d_ff and vocabulary")
    # one DP rank: only the stages the engine would run there (train.engine.zero_stage_at); in bf16 ZeRO-1 first:
    # same modelled memory and time as stage 0, whose unfused optimizer's per-parameter host syncs the step-time model
    # does not count
    if precision == "bf16" and grad_accum_dtype == "bf16" and grad_reduce_dtype == "fp32":
        raise UserError("--grad-reduce-dtype fp32 needs fp32 accumulation (--grad-accum-dtype auto or fp32)")
    if precision == "bf16" and grad_accum_dtype != "bf16":
        # stage 0 in bf16 accumulates gradients in bf16 (DeepSpeed has no fp32 path there): a change of numerics, not
        # of layout, so it is planned only when asked for (grad_accum_dtype=bf16)
        zero_stages = tuple(z for z in zero_stages if z >= 1)
    single_rank_stages = sorted({zero_stage_at(s, 1, precision) for s in zero_stages}, reverse=precision == "bf16")
    rows = []
    for tp in tps:
        dp = gpus // tp
        for mb in micro_batches:
            if batch % (mb * dp):
                continue
            for z in (zero_stages if dp > 1 else single_rank_stages):
                for t3 in ((False, True) if tmodel is not None and dp > 1 else (False,)):
                    for ck, fu, sq in product(checkpointing, fused, sequence_parallel if tp > 1 else (False,)):
                        if sq and seq_len % tp:
                            continue
                        lay = Layout(tp, z, mb, ck, fused=fu, teacher_zero3=t3, chunk_tokens=chunk_tokens,
                                     bucket_size=bucket_size, sequence_parallel=sq, grad_accum=grad_accum_dtype,
                                     grad_reduce=grad_reduce_dtype, document_mask=document_mask,
                                     compiled=compiled)
                        args = (smodel, lay, gpus, seq_len, batch, precision, tmodel, teacher_dtype, hardware)
                        mem = estimate_layout(*args)
                        rows.append({"layout": asdict(lay), "describe": lay.describe(), "memory": mem,
                                     "time": step_time(*args), "fits": mem["total"] <= hardware.gpu_mem_gib * GIB})
    if not rows:
        raise UserError(f"the global batch of {batch} sequences ({global_batch_tokens} tokens) cannot be split into "
                        f"micro-batches of {list(micro_batches)} over dp = {[gpus // t for t in tps]} ranks; "
                        "choose --global-batch-tokens = seq_len x a multiple of the GPU count")
    fit = sorted((r for r in rows if r["fits"]), key=lambda r: (r["time"]["step_s"], r["memory"]["total"]))
    if not fit:
        best = min(rows, key=lambda r: r["memory"]["total"])
        raise UserError(f"no layout fits in {hardware.gpu_mem_gib:g} GiB per GPU: the smallest needs "
                        f"{best['memory']['total'] / GIB:.1f} GiB ({best['describe']}); use more GPUs, GPUs with more "
                        "memory, a shorter --seq-len or a bf16 teacher")
    return fit + sorted((r for r in rows if not r["fits"]), key=lambda r: r["memory"]["total"])


_COLS = [("weights", "student_weights"), ("grads", "gradients"), ("optim", "optimizer_states"),
         ("teacher", "teacher_weights"), ("acts", "activations"), ("logits", "logits_loss"), ("zero", "zero_buffers"),
         ("step", "step_transient"), ("allow", "overhead"), ("total", "total")]


def format_table(rows: List[Dict], top: int) -> str:
    """Readable table of the first `top` rows: layout, per-GPU GiB by term, fit, step time, throughput."""
    head = f"{'#':>3} {'layout':<52}" + "".join(f"{c:>8}" for c, _ in _COLS) + f" {'fits':>4} {'step s':>8} " \
           f"{'tok/s/GPU':>10} {'MFU':>5}"
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows[:top], 1):
        m, t = r["memory"], r["time"]
        lay = f"{r['describe']} gas={m['grad_accum']}"
        lines.append(f"{i:>3} {lay:<52}" + "".join(f"{m[k] / GIB:8.1f}" for _, k in _COLS)
                     + f" {'yes' if r['fits'] else 'no':>4} {t['step_s']:8.2f} "
                     f"{t['tokens_per_s'] / (m['dp_size'] * r['layout']['tp_size']):10.0f} {t['mfu']:5.2f}")
    return "\n".join(lines)


def _plan_command(args) -> int:
    from megadistill.model.sizes import params_of
    hw = Hardware(gpu_mem_gib=args.gpu_mem_gib, gpus_per_node=args.gpus_per_node, peak_tflops=args.peak_tflops,
                  mfu=args.mfu, intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
                  overhead_gib=args.overhead_gib, fragmentation=args.fragmentation)
    rows = plan(args.student, args.teacher, gpus=args.gpus, seq_len=args.seq_len,
                global_batch_tokens=args.global_batch_tokens, precision=args.precision, teacher_dtype=args.teacher_dtype,
                hardware=hw, checkpointing=tuple(args.checkpointing), chunk_tokens=args.chunk_tokens,
                bucket_size=args.bucket_size, grad_accum_dtype=args.grad_accum_dtype,
                grad_reduce_dtype=args.grad_reduce_dtype, document_mask=args.document_mask,
                sequence_parallel={"off": (False,), "on": (True,), "both": (False, True)}[args.sequence_parallel],
                attention=args.attention, compiled=not args.eager)
    n_fit = sum(r["fits"] for r in rows)
    if args.json:
        print(json.dumps({"student": args.student, "teacher": args.teacher, "gpus": args.gpus,
                          "seq_len": args.seq_len, "global_batch_tokens": args.global_batch_tokens,
                          "precision": args.precision, "grad_accum_dtype": args.grad_accum_dtype,
                          "grad_reduce_dtype": args.grad_reduce_dtype, "attention": args.attention,
                          "document_mask": args.document_mask, "compiled": not args.eager,
                          "teacher_dtype": args.teacher_dtype, "hardware": asdict(hw),
                          "fitting": n_fit, "layouts": rows[:args.top] if args.top else rows}, indent=1))
        return 0
    s = resolve_model(args.student, "student")
    what = f"student {args.student} (N={params_of(s)[0] / 1e9:.3g}B)"
    if args.teacher:
        what = f"{what} distilled from teacher {args.teacher} ({args.teacher_dtype})"
    print(f"plan-memory: {what} on {args.gpus} GPUs x {args.gpu_mem_gib:g} GiB, seq {args.seq_len}, "
          f"{args.global_batch_tokens} tokens/step, {args.precision}")
    print(f"{n_fit} of {len(rows)} layouts fit; per-GPU GiB at the peak phase; 'allow' = {args.overhead_gib:g} GiB "
          f"fixed (CUDA/NCCL) + {args.fragmentation:.0%} fragmentation; step time at MFU {args.mfu:.0%} of "
          f"{args.peak_tflops:g} TFLOP/s + communication at {args.intra_node_gbps:g} GB/s NVLink, "
          f"{args.inter_node_gbps:g} GB/s InfiniBand per GPU, not overlapped")
    print(format_table(rows, args.top))
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan-memory", help="per-GPU memory of every TP x ZeRO x checkpointing layout, ranked by "
                                           "estimated step time", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: megadistill plan-memory --teacher 12.6B --student 2.72B --gpus 64 "
                              "--gpu-mem-gib 80\nwithout --teacher it plans supervised training of --student")
    p.add_argument("--student", required=True, help="the model being trained: a size name (e.g. 2.72B, 12.6B), "
                   "hf:PATH (a local Hugging Face folder's config.json) or a run / model dir")
    p.add_argument("--teacher", default=None, help="the frozen teacher (distillation), given like --student")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch-tokens", type=int, default=2 ** 22,
                   help="tokens per optimizer step (default 4M = 1024 x 4096; the paper does not state its batch)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--teacher-dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--grad-accum-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="train.grad_accum_dtype of a bf16 run (auto: fp32 with ZeRO 1-3, bf16 at stage 0)")
    p.add_argument("--grad-reduce-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="train.grad_reduce_dtype of a bf16 run (auto: the accumulation dtype)")
    p.add_argument("--checkpointing", nargs="+", choices=("off", "full"), default=["off", "full"])
    p.add_argument("--attention", choices=("flash", "sdpa", "flex", "eager"), default=None,
                   help="model.attention of both models (default: as their configs say; a size name: sdpa)")
    p.add_argument("--document-mask", action="store_true",
                   help="data.document_mask=true: count the attention masks of packed documents (sdpa / eager)")
    p.add_argument("--eager", action="store_true",
                   help="train.compile=false (default: compiled, as train.compile=auto runs on a GPU): ZeRO-3 fetches "
                        "per module, not per block")
    p.add_argument("--chunk-tokens", type=int, default=1024, help="token chunk of the fused loss")
    p.add_argument("--sequence-parallel", choices=("off", "on", "both"), default="both",
                   help="layouts with parallel.sequence_parallel false / true / both (tp > 1 only)")
    p.add_argument("--bucket-size", type=int, default=50_000_000, help="ZeRO bucket elements (zero.bucket_size)")
    p.add_argument("--mfu", type=float, default=0.40)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (H100 SXM)")
    p.add_argument("--intra-node-gbps", type=float, default=300.0, help="GB/s per GPU inside a node (NVLink)")
    p.add_argument("--inter-node-gbps", type=float, default=40.0, help="GB/s per GPU across nodes (InfiniBand)")
    p.add_argument("--overhead-gib", type=float, default=2.0, help="fixed per-GPU allowance: CUDA context, NCCL")
    p.add_argument("--fragmentation", type=float, default=0.10, help="allowance as a share of the modelled peak")
    p.add_argument("--top", type=int, default=10, help="rows to print (0 = all, with --json)")
    p.add_argument("--json", action="store_true", help="print the ranked layouts as JSON")
    p.set_defaults(func=_plan_command)
