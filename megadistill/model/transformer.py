"""The paper's decoder-only Transformer (MHA + QK-norm + RoPE, pre-norm RMSNorm, SwiGLU, untied head), TP-agnostic.

Options for imported models (Qwen3 / Qwen2 / Llama / Mistral / Phi-3 / OLMo 1 and 2 / Gemma 2 / Gemma 3 / SmolLM3 /
GPT-NeoX and Pythia / StableLM; the mixtures of experts Mixtral / Qwen3-MoE / OLMoE / Qwen2-MoE): GQA (n_kv_heads),
QK-norm off or over all heads' dims, biases on Q/K/V, O and the FFN, post-norm, sandwich and parallel-residual
blocks, LayerNorm (with or without gain and bias), clamped q / k / v, 1 + w norm gains, GeGLU and a plain GELU MLP,
scaled embeddings and attention, softcapped attention and output logits, tied embeddings, RoPE scaling and partial
RoPE, blocks without RoPE, a sliding attention window on all or some blocks (with a RoPE of their own), routed and
shared experts.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megadistill.errors import UserError
from megadistill.model import kernels as kernels_mod
from megadistill.model import mup
from megadistill.model.attention import BACKENDS, AttnMask, RopeScaling, Rotary, attention, build_mask
from megadistill.model.sizes import ffn_width
from megadistill.parallel.layers import LayerFactory, RMSNorm

# Tensor parallelism enters only through `factory` (megadistill.parallel.layers.LayerFactory): Q, K, V and the
# SwiGLU gate/up are column-parallel (rank r owns heads [r h/tp, (r+1) h/tp), key/value heads [r h_kv/tp, ...) --
# exactly the ones its query heads read under GQA -- and ffn columns [r f/tp, ...)), O and
# the SwiGLU down projection are row-parallel (all-reduce of partial sums), the embedding is vocab-parallel and
# the head returns this rank's vocab shard of the logits. Per block that is 2 all-reduces forward, 2 backward.
# With the factory's sequence parallelism the residual stream between blocks is this rank's sequence slice
# [b, s/tp, d]: each all-reduce becomes an all-gather on entering a TP region and a reduce-scatter on leaving it
# (same bytes moved; norms and residual adds do 1/tp of the work and keep 1/tp of the activations).


def use_kernels(module: nn.Module, kernels: str) -> None:
    """Every RMSNorm in `module` runs with `kernels` (the factory builds norms kernel-agnostic; the config chooses;
    a full-width QK-norm split over TP always runs its torch ops: its sum of squares spans the TP ranks).

    cfg.kernels (model.kernels) picks the implementation of RMSNorm, silu(a) * b and RoPE: our torch ops or
    Liger-Kernel's (megadistill.model.kernels); Attention and SwiGLU read it from cfg, the norms get it here.
    """
    for m in module.modules():
        if isinstance(m, RMSNorm):
            m.kernels = kernels


class Attention(nn.Module):
    """Causal self-attention (MHA or GQA) with optional per-head QK-norm and RoPE; this rank computes n_heads / tp
    query heads and n_kv_heads / tp key/value heads (one, replicated, when n_kv_heads < tp: LayerFactory.kv_column)."""

    def __init__(self, cfg, factory: LayerFactory):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        n_kv = cfg.n_kv_heads or cfg.n_heads
        if cfg.n_heads % n_kv:
            raise UserError(f"model.n_kv_heads={n_kv} must divide model.n_heads={cfg.n_heads}")
        inner, kv_inner = cfg.n_heads * hd, n_kv * hd
        self.head_dim, self.backend, self.kernels = hd, cfg.attention, cfg.kernels
        scale_dim = cfg.attn_scale_dim
        self.scale = 1.0 / math.sqrt(scale_dim) if scale_dim else None  # None: 1 / sqrt(head_dim)
        offset = cfg.norm_offset
        self.softcap = float(cfg.attn_softcap)  # Gemma 2: scores capped as c tanh(s / c)
        self.clip = float(cfg.qkv_clip)  # OLMo 1: q, k, v clamped to [-clip, clip]
        self.local_heads = factory.local(cfg.n_heads, "model.n_heads")
        self.local_kv_heads = factory.local_kv_heads(n_kv)  # h_kv/tp, or 1 with fewer key/value heads than ranks
        self.gqa = bool(self.local_kv_heads != self.local_heads)  # a constant for SDPA's enable_gqa (see attention())
        std_in, std_out = mup.init_std_for("hidden", d), mup.init_std_for("hidden", inner)
        bias = bool(cfg.qkv_bias)  # Qwen2: biases on Q, K and V (not on O)
        self.wq = factory.column(d, inner, std_in, copy_input=False, bias=bias)  # [d] -> [h/tp hd]
        # [d] -> [h_kv/tp hd]; with h_kv < tp every rank holds all h_kv heads and computes the one it reads
        self.wk = factory.kv_column(d, n_kv, hd, std_in, bias=bias)
        self.wv = factory.kv_column(d, n_kv, hd, std_in, bias=bias)
        self.enter = factory.columns_entry(self.wq, self.wk, self.wv)  # one TP-region entry for the three
        self.wo = factory.row(inner, d, std_out, bias=bool(cfg.o_bias))  # [h/tp hd] -> [d], all-reduce
        self.qk_norm_full = bool(cfg.qk_norm) and cfg.qk_norm_scope == "full"
        if self.qk_norm_full and factory.replicates_heads(n_kv):
            raise UserError(f"model.qk_norm_scope=full normalises k over all {n_kv} key/value heads, but with "
                            f"parallel.tp_size={factory.tp_size} each rank computes one of them; use a tp_size that "
                            f"divides model.n_kv_heads={n_kv}")
        if self.qk_norm_full:  # OLMo 2: RMSNorm over all heads' dims of q (and of k), a gain per dim, split over TP
            self.q_norm = factory.width_sharded_norm(inner, cfg.norm_eps, offset)
            self.k_norm = factory.width_sharded_norm(kv_inner, cfg.norm_eps, offset)
        elif cfg.qk_norm:  # RMSNorm over head_dim, one learnable gain shared by all heads
            self.q_norm = factory.sharded_input_norm(hd, cfg.norm_eps, offset)
            self.k_norm = factory.sharded_input_norm(hd, cfg.norm_eps, offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask: Optional[AttnMask]):
        q, k, v = self.enter(x)  # x [b, s, d] (or its [b, s/tp, d] slice under sequence parallelism, gathered inside)
        b, s = q.shape[0], q.shape[1]
        if self.qk_norm_full:  # over [b, s, h/tp hd] and [b, s, h_kv/tp hd], before the split into heads
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip:  # after a full-width QK-norm (OLMoE's order)
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(b, s, self.local_heads, self.head_dim)  # [b, s, h/tp, hd]
        k = k.view(b, s, self.local_kv_heads, self.head_dim)  # [b, s, h_kv/tp, hd]
        v = v.view(b, s, self.local_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:  # None: a block without positional encoding (model.nope_blocks)
            q, k = kernels_mod.rope(q, k, cos, sin, self.kernels)  # liger: in place (q, k have no other reader)
        o = attention(q, k, v, self.backend, mask, self.scale, gqa=self.gqa, softcap=self.softcap)  # [b, s, h/tp, hd]
        return self.wo(o.reshape(b, s, self.local_heads * self.head_dim))  # [b, s, d]


class FeedForward(nn.Module):
    """FFN(x) = W2 (silu(W1 x) * W3 x), three matrices, hidden width d_ff split over TP (model.activation=gelu_tanh:
    GeGLU, gelu in place of silu). model.ffn_gated=false: the plain MLP W2 act(W1 x) (GPT-NeoX / Pythia), no W3.
    model.ffn_bias: biases on W1 (and W3), split like their columns, and on W2, replicated."""

    def __init__(self, cfg, d_ff: int, factory: LayerFactory):
        super().__init__()
        d, self.kernels, self.activation = cfg.d_model, cfg.kernels, cfg.activation
        self.gated, bias = bool(cfg.ffn_gated), bool(cfg.ffn_bias)
        factory.local(d_ff, "model.d_ff")
        std = mup.init_std_for("hidden", d)
        self.w1 = factory.column(d, d_ff, std, copy_input=False, bias=bias)  # gate (plain: in) [d] -> [f/tp]
        if self.gated:
            self.w3 = factory.column(d, d_ff, std, copy_input=False, bias=bias)  # up [d] -> [f/tp]
            self.enter = factory.columns_entry(self.w1, self.w3)
        else:
            self.enter = factory.columns_entry(self.w1)
        self.w2 = factory.row(d_ff, d, mup.init_std_for("hidden", d_ff), bias=bias)  # down [f/tp] -> [d], all-reduce

    def forward(self, x):
        if not self.gated:
            (h,) = self.enter(x)  # [b, s, f/tp]
            return self.w2(kernels_mod.activate(h, self.activation))  # W2 act(W1 x)
        gate, up = self.enter(x)  # [b, s, f/tp] each
        return self.w2(kernels_mod.swiglu(gate, up, self.kernels, self.activation))  # W2 (act(W1 x) * W3 x)


SwiGLU = FeedForward  # the paper's (default) form


class Experts(nn.Module):
    """The E gated FFNs of a mixture as stacked weights -- w1 (gate), w3 (up) [E, f/tp, d], w2 (down) [E, d, f/tp],
    each expert split over TP like the dense SwiGLU -- run on token rows already inside the TP region and grouped by
    expert: forward returns this rank's partial sums (the mixture reduces over TP once for all experts). Each
    projection is one grouped GEMM for all experts (megadistill.model.kernels.grouped_linear); every expert gets a
    gradient (zeros for the unrouted), as ZeRO expects one per parameter."""

    def __init__(self, cfg, d_ff: int, factory: LayerFactory):
        super().__init__()
        d, n = cfg.d_model, cfg.moe_experts
        self.kernels, self.activation = cfg.kernels, cfg.activation
        std_in = mup.init_std_for("hidden", d)
        self.w1 = factory.region_column(d, d_ff, std_in, experts=n)  # gate [E, f/tp, d]
        self.w3 = factory.region_column(d, d_ff, std_in, experts=n)  # up [E, f/tp, d]
        self.w2 = factory.region_row(d_ff, d, mup.init_std_for("hidden", d_ff), experts=n)  # down [E, d, f/tp]
        self.width = self.w1.shape[1]  # f/tp, kept: a ZeRO-3-partitioned weight is empty outside this forward

    def traceable(self, x: torch.Tensor) -> bool:
        """Whether torch.compile can trace this forward for rows like x: every projection one grouped GEMM (the loop
        splits by counts, which are data)."""
        return kernels_mod.grouped_mm_traceable(x, self.width, x.shape[-1])

    def forward(self, x: torch.Tensor, src: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Tokens x [t, d] and src [n], the token of each routed copy in expert order (counts[e] consecutive copies
        for expert e) -> W2_e (act(W1_e x_src) * W3_e x_src) partial sums [n, d]. Grouped GEMMs on CUDA take each
        group padded to 16 rows (kernels.group_rows): the packed copies live only while they are spread into the
        padded layout, which is unpadded once at the end."""
        multiple = kernels_mod.group_rows(x.device)
        if multiple == 1 or not kernels_mod.grouped_mm_usable(x, self.width, x.shape[-1]):
            return self._project(x[src], counts)  # advanced indexing: its backward sums by sort, without atomics
        padded, padded_counts, rows = kernels_mod.pad_groups(x[src], counts, multiple)
        y = self._project(padded, padded_counts)
        del padded  # without autograd (a teacher) freed before unpadding
        return y.index_select(0, rows)

    def _project(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate = kernels_mod.grouped_linear(x, self.w1, counts)  # [n, f/tp]
        up = kernels_mod.grouped_linear(x, self.w3, counts)
        return kernels_mod.grouped_linear(kernels_mod.swiglu(gate, up, self.kernels, self.activation), self.w2, counts)

    def extra_repr(self) -> str:
        return f"experts={self.w1.shape[0]}, d={self.w1.shape[2]}, d_ff/tp={self.w1.shape[1]}"


class SharedExpert(nn.Module):
    """Qwen2-MoE's shared expert: a gated FFN of width model.moe_shared_ff that every token goes through, split over
    TP like the routed experts and run inside the mixture's TP region (this rank's partial sums), its output scaled
    by sigmoid(w . x) with w [1, d] replicated (gradient summed over TP, like the router's)."""

    def __init__(self, cfg, factory: LayerFactory):
        super().__init__()
        d, width = cfg.d_model, cfg.moe_shared_ff
        self.kernels, self.activation = cfg.kernels, cfg.activation
        factory.local(width, "model.moe_shared_ff")
        std = mup.init_std_for("hidden", d)
        self.w1 = factory.region_column(d, width, std)  # gate [f_s/tp, d]
        self.w3 = factory.region_column(d, width, std)  # up [f_s/tp, d]
        self.w2 = factory.region_row(width, d, mup.init_std_for("hidden", width))  # down [d, f_s/tp]
        self.gate = factory.replicated(d, 1, std)  # [1, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [t, d] (inside the TP region) -> sigmoid(w . x) W2 (act(W1 x) * W3 x), this rank's partial sums."""
        h = kernels_mod.swiglu(F.linear(x, self.w1), F.linear(x, self.w3), self.kernels, self.activation)
        return torch.sigmoid(self.gate(x)) * F.linear(h, self.w2)


class MoEFeedForward(nn.Module):
    """Mixture of experts (Mixtral, Qwen3-MoE, OLMoE; model.moe_experts): a router scores each token against every
    expert (softmax in fp32), the token goes to its moe_top_k best, and their outputs are summed weighted by those
    probabilities (renormalised over the k when model.moe_norm_topk). Every rank holds its TP shard of every expert:
    the block enters the TP region once (all-gather under SP), runs the experts on their tokens (Experts: one grouped
    GEMM per projection) and leaves once (all-reduce / reduce-scatter of the weighted partial sums, a shared expert's
    (model.moe_shared_ff, Qwen2-MoE) added before). The router is replicated; its gradient is summed over TP (each
    rank's weighted partials see only its share)."""

    def __init__(self, cfg, d_ff: int, factory: LayerFactory):
        super().__init__()
        d = cfg.d_model
        factory.local(d_ff, "model.d_ff")
        self.top_k, self.norm_topk, self.n_experts = int(cfg.moe_top_k), bool(cfg.moe_norm_topk), cfg.moe_experts
        self.enter, self.exit = factory.region_entry(), factory.region_exit()
        self.router = factory.replicated(d, cfg.moe_experts, mup.init_std_for("hidden", d))  # [E, d]
        self.experts = Experts(cfg, d_ff, factory)
        self.shared = SharedExpert(cfg, factory) if cfg.moe_shared_ff else None
        # the router's losses of this block's last forward with autograd on, [2]: (load balance, z-loss); None
        # otherwise. Set by every forward -- a checkpoint's recompute too, so that it saves what the forward saved,
        # also when compiled -- and taken off the module by Transformer.hidden_states right after each call
        # (Transformer.moe_router_losses)
        self.router_losses: Optional[torch.Tensor] = None

    def route(self, x: torch.Tensor):
        """x [t, d] -> (weights [t, k] in x's dtype, expert ids [t, k], router probabilities [t, E] in fp32,
        logsumexp of the router logits [t] in fp32)."""
        logits = self.router(x).float()
        probs = torch.softmax(logits, dim=-1)  # [t, E]
        top, ids = probs.topk(self.top_k, dim=-1)
        # logsumexp(z) = z_j - log p_j for any j, gradient included; at the top-1 expert p_j >= 1 / E (no underflow),
        # and autograd saves only [t] vectors beside what the softmax kept (logsumexp itself would keep [t, E])
        lse = logits.gather(-1, ids[:, :1]).squeeze(-1) - top[:, 0].log()
        if self.norm_topk:
            top = top / top.sum(-1, keepdim=True)
        return top.to(x.dtype), ids, probs, lse

    def forward(self, x):
        full = self.enter(x)  # [b, s, d] on every rank
        flat = full.reshape(-1, full.shape[-1])
        weights, ids, probs, lse = self.route(flat)
        # [t, d] partial sums; traced by torch.compile where the experts run as grouped GEMMs (bf16), which need no
        # host sync: sorting, counting and gathering have data-independent shapes
        dispatch = self._dispatch if self.experts.traceable(flat) else self._dispatch_eager
        out = dispatch(flat, weights, ids, probs, lse)
        if self.shared is not None:
            out = out + self.shared(flat)
        return self.exit(out.view(full.shape))

    def _dispatch(self, flat, weights, ids, probs, lse):
        """sum over each token's k experts of weight x expert(token): this rank's partial sums [t, d]. The t k
        (token, slot) copies are sorted by expert, run through the experts together, put back in token order and
        summed over the k slots (a permutation and a bmm: deterministic, no atomics, no host sync)."""
        t = flat.shape[0]
        ids = ids.reshape(-1)  # [t k]
        order = ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
        # per expert: how many copies; a scatter-add, not bincount, whose output size is data (a host sync on CUDA)
        counts = torch.zeros(self.n_experts, dtype=ids.dtype, device=ids.device).scatter_add_(0, ids,
                                                                                            torch.ones_like(ids))
        # Switch Transformer's load balance: E sum_e f_e P_e, f_e the share of copies routed to e (no gradient), P_e
        # its mean probability; 1 when routing is uniform, E / k when every token picks the same k experts. ST-MoE's
        # router z-loss: the mean over tokens of logsumexp(router logits)^2 (keeps the logits small)
        self.router_losses = (torch.stack([self.n_experts * (counts.float() / ids.numel() * probs.mean(0)).sum(),
                                           lse.square().mean()]) if torch.is_grad_enabled() else None)
        y = self.experts(flat, order // self.top_k, counts)  # [t k, d], grouped by expert
        back = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        # [t, k, d] in token order: a gather by the inverse permutation, which keeps only `back` for backward (an
        # index_copy by `order` would keep a copy of y); its backward adds each row once
        per_slot = y.index_select(0, back).view(t, self.top_k, -1)
        return torch.bmm(weights.unsqueeze(1), per_slot).squeeze(1)  # [t, d]: sum_k w_k y_k

    # the expert loop splits rows by counts, which are data: left eager in a compiled block (one graph break)
    _dispatch_eager = torch.compiler.disable(_dispatch)


class Block(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then h + SwiGLU(RMSNorm(h)). model.norm_position=post (OLMo 2):
    x + RMSNorm(Attn(x)), then h + RMSNorm(SwiGLU(h)), those norms named attn_out_norm / ffn_out_norm; sandwich
    (Gemma 3): both, x + RMSNorm(Attn(RMSNorm(x))). model.parallel_residual (GPT-NeoX / Pythia, pre-norm):
    x + Attn(norm1(x)) + FFN(norm2(x)). model.norm_type=layer: LayerNorms in place of the RMSNorms."""

    def __init__(self, cfg, d_ff: int, factory: LayerFactory):
        super().__init__()
        position, d, eps, offset, kind = cfg.norm_position, cfg.d_model, cfg.norm_eps, cfg.norm_offset, cfg.norm_type
        self.pre_norm, self.post_norm = position in ("pre", "sandwich"), position in ("post", "sandwich")
        self.parallel_residual = bool(cfg.parallel_residual)
        if self.pre_norm:
            self.attn_norm = factory.norm(d, eps, offset, kind)
        self.attn = Attention(cfg, factory)
        if self.post_norm:
            self.attn_out_norm = factory.norm(d, eps, offset, kind)
        if self.pre_norm:
            self.ffn_norm = factory.norm(d, eps, offset, kind)
        self.ffn = MoEFeedForward(cfg, d_ff, factory) if cfg.moe_experts else FeedForward(cfg, d_ff, factory)
        if self.post_norm:
            self.ffn_out_norm = factory.norm(d, eps, offset, kind)
        use_kernels(self, cfg.kernels)

    def forward(self, x, cos, sin, mask: Optional[AttnMask]):
        a = self.attn(self.attn_norm(x) if self.pre_norm else x, cos, sin, mask)  # [b, s, d]
        if self.parallel_residual:  # both sublayers read x (validate: pre-norm only)
            return x + a + self.ffn(self.ffn_norm(x))
        h = x + (self.attn_out_norm(a) if self.post_norm else a)
        f = self.ffn(self.ffn_norm(h) if self.pre_norm else h)
        return h + (self.ffn_out_norm(f) if self.post_norm else f)


class Transformer(nn.Module):
    """Decoder LM: embedding -> n_layers blocks -> RMSNorm -> head (untied unless cfg.tie_embeddings); logits are
    this rank's vocab shard.

    `factory` None builds the dense TP=1 model. Built from the same torch seed, the model at any tp_size computes
    the same function (weights are sharded from the same full initialisation).
    """

    def __init__(self, cfg, factory: Optional[LayerFactory] = None):
        super().__init__()
        factory = factory if factory is not None else LayerFactory()
        if cfg.attention not in BACKENDS:
            raise UserError(f"model.attention={cfg.attention!r} is not one of {list(BACKENDS)}")
        if cfg.activation_checkpointing not in ("off", "full", "every_k"):
            raise UserError(f"model.activation_checkpointing={cfg.activation_checkpointing!r} is not one of "
                            "['off', 'full', 'every_k']")
        kernels_mod.validate(cfg.kernels)  # liger without CUDA / liger_kernel: a UserError before any weight
        d, vocab = cfg.d_model, cfg.vocab_size
        d_ff = cfg.d_ff or ffn_width(d, cfg.ff_multiple)
        self.cfg, self.tp_size = cfg, factory.tp_size
        self.vocab_size, self.local_vocab = vocab, factory.local(vocab, "model.vocab_size")
        self.embed = factory.embedding(vocab, d, mup.init_std_for("embedding"))  # [V/tp, d]
        self.embed_scale = float(cfg.embed_scale)
        self.blocks = nn.ModuleList(Block(cfg, d_ff, factory) for _ in range(cfg.n_layers))
        self.norm = factory.norm(d, cfg.norm_eps, cfg.norm_offset, cfg.norm_type)
        self.sequence_shards = factory.sequence_shards  # > 1: the residual stream is cut along the sequence
        self.gather_sequence = factory.sequence_output()  # [b, s/tp, d] -> [b, s, d]; identity otherwise
        self.head = factory.head(d, vocab, mup.init_std_for("head", d))  # [V/tp, d]
        # tied: embedding rows and head rows are split alike over TP ([V/tp, d] each), one parameter serves both
        self.tie_weights()
        self.rope = Rotary(cfg.rotary_dim, cfg.rope_base, RopeScaling.of(cfg))  # partial RoPE: rotary_dim < head_dim
        # which blocks attend through the sliding window; those may have RoPE of their own (Gemma 3's local base)
        self.layer_kinds = cfg.block_kinds
        local_base = cfg.rope_local_base
        self.local_rope = Rotary(cfg.rotary_dim, local_base) if local_base else self.rope
        self.nope = set(cfg.nope_blocks)
        self._router_losses: list = []  # the mixtures' router losses of the last forward (moe_router_losses)
        use_kernels(self, cfg.kernels)
        self._tag_roles()

    def tie_weights(self) -> None:
        """Re-point the head at the embedding when tied (after anything that replaces Parameters, e.g. to_empty)."""
        if self.cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _tag_roles(self) -> None:
        mup.tag(self, "hidden")
        mup.tag(self.head, "head")
        mup.tag(self.embed, "embedding")  # after the head: a tied matrix is an embedding
        for m in self.modules():
            if isinstance(m, RMSNorm):
                mup.tag(m, "norm")
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                mup.tag(p, "bias")

    @property
    def output_weight(self) -> torch.Tensor:
        """The head's local weight [V/tp, d]: logits = hidden_states @ output_weight.T (for fused losses)."""
        return self.head.weight

    def _checkpointed(self, i: int) -> bool:
        mode = self.cfg.activation_checkpointing
        if mode == "off" or not (self.training and torch.is_grad_enabled()):
            return False
        return mode == "full" or i % self.cfg.checkpoint_every_k == 0  # every_k: blocks 0, k, 2k, ...

    def hidden_states(self, input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-norm hidden states [b, s, d] (replicated over TP ranks), before the head."""
        if doc_ids is not None and doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}")
        s = input_ids.shape[1]
        if s % self.sequence_shards:
            raise UserError(f"sequence length {s} is not divisible by parallel.tp_size={self.sequence_shards}: "
                            "parallel.sequence_parallel=true cuts the sequence into tp_size slices; use a train.seq_len "
                            "that tp_size divides, or parallel.sequence_parallel=false")
        x = self.embed(input_ids)  # [b, s, d], or [b, s/tp, d] (this rank's slice) under sequence parallelism
        if self.embed_scale != 1.0:  # Gemma: x sqrt(d), the factor rounded to the activations' dtype as HF does
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        # per kind of block: RoPE tables [s, hd] and the mask (documents, and the window for sliding blocks), built
        # once for all layers; mask None: plain causal
        window = self.cfg.sliding_window
        inputs = {kind: (*(self.local_rope if kind == "sliding" else self.rope)(s, x.device, x.dtype),
                         build_mask(doc_ids, self.cfg.attention, s, window if kind == "sliding" else 0, x.device,
                                    bias_dtype=x.dtype if not self.cfg.attn_softcap else None))
                  for kind in sorted(set(self.layer_kinds))}
        router_losses, forwarding = [], True

        def run(block, *args):
            """The block, its mixture's router losses taken off it: kept from this forward, dropped from a
            checkpoint's recompute in backward (they would hold that recompute's graph past the step). `finally`: the
            recompute stops with an exception once it has rebuilt what backward needs, after the mixture has run."""
            try:
                return block(*args)
            finally:
                if isinstance(block.ffn, MoEFeedForward):
                    losses, block.ffn.router_losses = block.ffn.router_losses, None
                    if forwarding and losses is not None:
                        router_losses.append(losses)

        for i, block in enumerate(self.blocks):
            cos, sin, mask = inputs[self.layer_kinds[i]]
            if i in self.nope:
                cos = sin = None
            if self._checkpointed(i):
                # recompute the block in backward (its collectives too, in the same order on every TP rank)
                x = checkpoint(run, block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = run(block, x, cos, sin, mask)
        forwarding = False
        self._router_losses = router_losses
        return self.gather_sequence(self.norm(x))

    def moe_router_losses(self) -> Optional[torch.Tensor]:
        """The mixture blocks' router losses of the last forward run with autograd on, [2], each summed over blocks
        (as Megatron-LM does): the load balance (a block's is E sum_e f_e P_e over the tokens it routed) and the
        z-loss (a block's is the mean over its tokens of logsumexp(router logits)^2). Every TP rank routes the same
        tokens, so each holds the whole values. Then forgotten; None for a dense model or after a forward without
        autograd."""
        losses, self._router_losses = self._router_losses, []
        return torch.stack(losses).sum(0) if losses else None

    def forward(self, input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of this rank's vocab shard, [b, s, V/tp] (rank r holds classes [r V/tp, (r+1) V/tp)); capped as
        c tanh(z / c) with model.logit_softcap = c > 0 (Gemma 2; elementwise, so per shard)."""
        logits = self.head(self.hidden_states(input_ids, doc_ids))
        cap = self.cfg.logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits
