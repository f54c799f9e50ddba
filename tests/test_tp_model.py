"""Tensor parallelism on gloo: groups, mpu, mappings, and the TP=2 / TP=4 model against the dense TP=1 model."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from dist_harness import run_distributed
from megadistill.config import ModelConfig
from megadistill.errors import UserError
from megadistill.model.transformer import Transformer
from megadistill.parallel.groups import ParallelGroups
from megadistill.train.objective import add_router_losses
from megadistill.parallel.mappings import (columns_entry, copy_to_tp_region, gather_from_tp_region, gather_sequence,
                                           gather_sequence_into_tp_region, reduce_from_tp_region,
                                           reduce_scatter_to_sequence_region, scatter_to_sequence_region,
                                           scatter_to_tp_region)

pytestmark = pytest.mark.multiproc

V = 128


# GPT-NeoX / Pythia: LayerNorms, a plain GELU MLP, biases on every linear, parallel residual, partial RoPE
NEOX_LIKE = dict(norm_type="layer", ffn_gated=False, activation="gelu", parallel_residual=True, qk_norm=False,
                 qkv_bias=True, o_bias=True, ffn_bias=True, rope_fraction=0.25, d_ff=256)
MOE_LIKE = dict(moe_experts=4, moe_top_k=2, d_ff=64, n_kv_heads=2)
GEMMA3_LIKE = dict(norm_position="sandwich", norm_offset=1.0, activation="gelu_tanh", embed_scale=8.0,
                   attn_scale_dim=24, sliding_window=6, layer_types=["sliding", "full"], rope_local_base=100.0,
                   n_kv_heads=2)


def _cfg(**kw):
    base = dict(n_layers=2, d_model=64, n_heads=4, head_dim=16, d_ff=192, vocab_size=V)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def _per_rank(shape, n, seed):
    g = torch.Generator().manual_seed(seed)  # every process draws every rank's tensor: all know all values
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(n)]


def check_mappings(group, rank, size):
    """Each mapping's forward value and backward gradient for a group of `size` ranks."""
    x_all, w_all = _per_rank((3, 4 * size), size, 11), _per_rank((3, 4 * size), size, 12)
    chunk = lambda t, r: t[:, 4 * r:4 * (r + 1)]  # noqa: E731
    # copy: forward identity, backward sum of every rank's upstream grad
    x = x_all[0].clone().requires_grad_()
    y = copy_to_tp_region(x, group)
    (y * w_all[rank]).sum().backward()
    assert_close(y, x_all[0])
    assert_close(x.grad, sum(w_all))
    # reduce: forward sum over ranks, backward identity
    x = x_all[rank].clone().requires_grad_()
    y = reduce_from_tp_region(x, group)
    (y * w_all[0]).sum().backward()
    assert_close(y, sum(x_all))
    assert_close(x.grad, w_all[0])
    # scatter: forward keeps chunk r, backward all-gathers every rank's chunk grad
    x = x_all[0].clone().requires_grad_()
    y = scatter_to_tp_region(x, group)
    (y * chunk(w_all[rank], rank)).sum().backward()
    assert_close(y, chunk(x_all[0], rank))
    assert_close(x.grad, torch.cat([chunk(w_all[r], r) for r in range(size)], dim=-1))
    # gather: forward concatenates chunks in rank order, backward keeps chunk r of the (replicated) grad
    x = chunk(x_all[rank], rank).clone().requires_grad_()
    y = gather_from_tp_region(x, group)
    (y * w_all[0]).sum().backward()
    assert_close(y, torch.cat([chunk(x_all[r], r) for r in range(size)], dim=-1))
    assert_close(x.grad, chunk(w_all[0], rank))


def check_sequence_mappings(group, rank, size):
    """The sequence-parallel collectives on [b, s, d] tensors (b = 2, s = 3 size, d = 5): values and grads."""
    full_all, w_all = _per_rank((2, 3 * size, 5), size, 21), _per_rank((2, 3 * size, 5), size, 22)
    sl = lambda t, r: t[:, 3 * r:3 * (r + 1)]  # noqa: E731  rank r's sequence slice
    # gather into TP: forward concatenates the slices along s, backward sums every rank's grad and keeps slice r
    x = sl(full_all[rank], rank).clone().requires_grad_()
    y = gather_sequence_into_tp_region(x, group)
    (y * w_all[rank]).sum().backward()
    assert_close(y, torch.cat([sl(full_all[r], r) for r in range(size)], dim=1))
    assert_close(x.grad, sl(sum(w_all), rank))
    # reduce-scatter: forward sums the ranks' partials and keeps slice r, backward all-gathers the slice grads
    x = full_all[rank].clone().requires_grad_()
    y = reduce_scatter_to_sequence_region(x, group)
    (y * sl(w_all[rank], rank)).sum().backward()
    assert_close(y, sl(sum(full_all), rank))
    assert_close(x.grad, torch.cat([sl(w_all[r], r) for r in range(size)], dim=1))
    # gather for a replicated consumer: backward keeps slice r of the (replicated) grad, no sum
    x = sl(full_all[rank], rank).clone().requires_grad_()
    y = gather_sequence(x, group)
    (y * w_all[0]).sum().backward()
    assert_close(y, torch.cat([sl(full_all[r], r) for r in range(size)], dim=1))
    assert_close(x.grad, sl(w_all[0], rank))
    # scatter: forward keeps slice r, backward all-gathers
    x = full_all[0].clone().requires_grad_()
    y = scatter_to_sequence_region(x, group)
    (y * sl(w_all[rank], rank)).sum().backward()
    assert_close(y, sl(full_all[0], rank))
    assert_close(x.grad, torch.cat([sl(w_all[r], r) for r in range(size)], dim=1))
    with pytest.raises(ValueError, match="sequence length 7 is not divisible"):
        reduce_scatter_to_sequence_region(torch.zeros(1, 7, 2), group)


def check_groups(groups: ParallelGroups, world, tp):
    rank = dist.get_rank()
    assert (groups.world_size, groups.rank, groups.tp_size, groups.dp_size) == (world, rank, tp, world // tp)
    assert (groups.tp_rank, groups.dp_rank) == (rank % tp, rank // tp)
    assert groups.tp_ranks == tuple(range(rank // tp * tp, rank // tp * tp + tp))
    assert groups.dp_ranks == tuple(range(rank % tp, world, tp))
    # the groups really contain those ranks
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=groups.tp_group)
    assert t.item() == sum(groups.tp_ranks)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=groups.dp_group)
    assert t.item() == sum(groups.dp_ranks)
    assert dist.get_rank(groups.tp_group) == groups.tp_rank and dist.get_rank(groups.dp_group) == groups.dp_rank
    mpu = groups.mpu()
    assert (mpu.get_model_parallel_rank(), mpu.get_tensor_model_parallel_rank()) == (rank % tp, rank % tp)
    assert (mpu.get_model_parallel_world_size(), mpu.get_tensor_model_parallel_world_size()) == (tp, tp)
    assert mpu.get_model_parallel_group() is groups.tp_group is mpu.get_tensor_model_parallel_group()
    assert (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()) == (rank // tp, world // tp)
    assert mpu.get_data_parallel_group() is groups.dp_group
    assert mpu.get_data_parallel_group_ranks() == list(range(rank % tp, world, tp))
    assert mpu.get_tensor_model_parallel_src_rank() == rank // tp * tp
    assert (mpu.get_sequence_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size()) == (1, 1)
    assert mpu.get_sequence_data_parallel_group() is groups.dp_group
    assert not hasattr(mpu, "initialize_sequence_parallel")  # would make DeepSpeed ignore the DP group
    from deepspeed.utils import bwc
    assert bwc.bwc_tensor_model_parallel_rank(mpu) == rank % tp
    assert bwc.bwc_tensor_model_parallel_world_size(mpu) == tp
    assert bwc.bwc_pipeline_parallel_world_size(mpu) == 1


def check_model_vs_dense(groups: ParallelGroups, docs: bool, sequence_parallel: bool = False, **cfg_kw):
    """The TP model from the same seed: same weights (sliced), logits, hidden states and grads as the dense model.

    sequence_parallel: the residual stream is cut along the sequence (the norm gains' grads come from every rank's
    slice, summed over TP; they must still equal the dense grads)."""
    cfg = _cfg(**cfg_kw)
    tp, tp_rank = groups.tp_size, groups.tp_rank
    torch.manual_seed(1234)
    dense = Transformer(cfg)
    torch.manual_seed(1234)
    model = Transformer(cfg, groups.factory(sequence_parallel=sequence_parallel))
    assert model.sequence_shards == (tp if sequence_parallel else 1)
    full_qk = cfg.qk_norm and cfg.qk_norm_scope == "full"
    biases = any(name.endswith(".bias") for name, _ in dense.named_parameters())
    if biases or full_qk:  # built as zeros / ones: give both models the same random biases and full-width
        # QK-norm gains (this rank's slice for the TP one), so that a wrong slice shows in the values
        with torch.no_grad():
            tp_params = dict(model.named_parameters())
            for i, (name, p) in enumerate(dense.named_parameters()):
                if name.endswith(".bias") or (full_qk and name.endswith(("q_norm.weight", "k_norm.weight"))):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i)))
                    n, sharded = tp_params[name].shape[0], getattr(tp_params[name], "tensor_model_parallel", False)
                    tp_params[name].copy_(p[tp_rank * n:(tp_rank + 1) * n] if tp > 1 and sharded else p)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (2, 16), generator=g)
    doc_ids = torch.tensor([[0] * 5 + [1] * 11, [3] * 9 + [4] * 7]) if docs else None
    targets = torch.randint(0, V, (2, 16), generator=g)
    r = torch.randn(2, 16, V, generator=g)

    def objective(logits, net, tp_size):  # nonlinear in the logits: the head and every block get non-trivial grads
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)) + 1e-2 * (logits.tanh() * r).sum()
        if cfg.moe_experts:  # the routers' balance and z-losses, added as the trainer does (heavily: 0.1, 0.05)
            router = net.moe_router_losses()
            auxes.append(router.detach())
            loss = add_router_losses(loss, router, (0.1, 0.05), tp_size)
        return loss

    auxes = []
    dense_logits = dense(ids, doc_ids)
    objective(dense_logits, dense, 1).backward()
    local = model(ids, doc_ids)
    assert local.shape == (2, 16, V // tp)
    assert_close(local, dense_logits[..., tp_rank * V // tp:(tp_rank + 1) * V // tp], atol=1e-5, rtol=1e-5)
    full = gather_from_tp_region(local, groups.tp_group)  # test only: the trainer never gathers the vocab
    assert_close(full, dense_logits, atol=1e-5, rtol=1e-5)
    objective(full, model, tp).backward()
    if cfg.moe_experts:  # the same routing, so the same losses (balance > 1 per block: random routers are uneven)
        assert_close(auxes[1], auxes[0], atol=1e-6, rtol=1e-6)
        assert float(auxes[0][0]) > cfg.n_layers and float(auxes[0][1]) > 0
    with torch.no_grad():
        assert_close(model.hidden_states(ids, doc_ids), dense.hidden_states(ids, doc_ids), atol=1e-5, rtol=1e-5)
    dense_params = dict(dense.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert names == list(dense_params)
    for name, p in model.named_parameters():
        ref_w, ref_g = dense_params[name].detach(), dense_params[name].grad
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            dim = p.partition_dim
            n = p.shape[dim]
            assert n * tp == ref_w.shape[dim], name
            ref_w, ref_g = ref_w.narrow(dim, tp_rank * n, n), ref_g.narrow(dim, tp_rank * n, n)
        assert_close(p.detach(), ref_w, atol=0, rtol=0, msg=name)
        assert_close(p.grad, ref_g, atol=1e-5, rtol=1e-4, msg=name)
    assert model.output_weight.shape == (V // tp, cfg.d_model)
    check_grad_norm(groups, model, dense)


def check_kv_replicated(groups: ParallelGroups, n_kv: int):
    """With fewer key/value heads than ranks each rank holds all of K and V (not TP-marked: a replicated parameter
    for the grad norm and the consolidator) and computes the head its query heads read; the refusals."""
    tp, rank = groups.tp_size, groups.tp_rank
    attn = Transformer(_cfg(n_kv_heads=n_kv), groups.factory()).blocks[0].attn
    assert (attn.local_heads, attn.local_kv_heads, attn.gqa) == (4 // tp, 1, 4 // tp != 1)
    for w in (attn.wk, attn.wv):
        assert w.weight.shape == (n_kv * 16, 64) and not getattr(w.weight, "tensor_model_parallel", False)
        assert w.head == rank // (tp // n_kv)  # ranks [j tp / h_kv, (j + 1) tp / h_kv) read head j
        assert_close(w.local_weight(), w.weight[w.head * 16:(w.head + 1) * 16], atol=0, rtol=0)
    with pytest.raises(UserError, match="qk_norm_scope=full normalises k over all"):
        Transformer(_cfg(n_kv_heads=n_kv, qk_norm_scope="full"), groups.factory())


def check_grad_norm(groups: ParallelGroups, model, dense):
    """DeepSpeed's model-parallel grad norm with our mpu counts every TP parameter once (= the dense norm)."""
    import deepspeed
    from deepspeed.runtime.utils import clip_grad_norm_
    from deepspeed.utils import groups as ds_groups
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the existing process group
    ds_groups.mpu = groups.mpu()  # what deepspeed.initialize(mpu=...) sets
    dense_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in dense.parameters()]))
    tp_norm = clip_grad_norm_(list(model.parameters()), max_norm=1e9, mpu=groups.mpu())
    assert_close(tp_norm.reshape(()), dense_norm, atol=1e-6, rtol=1e-5)


def check_columns_entry(group, rank, size):
    """columns_entry (the Q/K/V and gate/up entry) against dense matmuls: outputs, dL/dx and dL/dW_i, with and without
    sequence parallelism; what its autograd node keeps for backward (the sequence slice under sequence parallelism)."""
    b, s, d, outs = 2, 4 * size, 8, (12, 4, 4)  # three columns of different widths (GQA-like q, k, v)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(b, s, d, generator=g, dtype=torch.float64)
    ws = [torch.randn(o, d, generator=g, dtype=torch.float64) for o in outs]  # full weights, rows sharded over TP
    ups = [torch.randn(b, s, o, generator=g, dtype=torch.float64) for o in outs]  # upstream grads (full)
    rows = lambda t: t.narrow(0, rank * (t.shape[0] // size), t.shape[0] // size)  # noqa: E731
    cols = lambda t: t.narrow(-1, rank * (t.shape[-1] // size), t.shape[-1] // size)  # noqa: E731
    xr = x.clone().requires_grad_()  # dense reference
    wr = [w.clone().requires_grad_() for w in ws]
    sum((F.linear(xr, w) * u).sum() for w, u in zip(wr, ups)).backward()
    for sp in (False, True):
        x_in = (x.narrow(1, rank * (s // size), s // size) if sp else x).clone().requires_grad_()
        w_loc = [rows(w).clone().requires_grad_() for w in ws]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            ys = columns_entry(x_in, w_loc, group, sequence_parallel=sp)
        assert (b, s // size if sp else s, d) in saved and (not sp or (b, s, d) not in saved), saved  # the slice
        sum((y * cols(u)).sum() for y, u in zip(ys, ups)).backward()
        for y, w in zip(ys, ws):
            assert_close(y, cols(F.linear(x, w)))
        assert_close(x_in.grad, xr.grad.narrow(1, rank * (s // size), s // size) if sp else xr.grad)
        for w, r in zip(w_loc, wr):
            assert_close(w.grad, rows(r.grad))
        with torch.no_grad():  # the teacher's / eval's forward: no autograd node, same values
            for y, w in zip(columns_entry(x_in, w_loc, group, sequence_parallel=sp), ws):
                assert_close(y, cols(F.linear(x, w)))


def tp2_worker(rank, world):
    groups = ParallelGroups.build(2)
    check_groups(groups, world, 2)
    check_mappings(groups.tp_group, groups.tp_rank, 2)
    check_columns_entry(groups.tp_group, groups.tp_rank, 2)
    for docs in (False, True):
        check_model_vs_dense(groups, docs)
    check_model_vs_dense(groups, True, attention="eager", activation_checkpointing="full")
    check_model_vs_dense(groups, False, qk_norm=False, activation_checkpointing="every_k")
    # sequence parallelism: collectives, then the model (GQA, tied, checkpointed) against the dense reference
    check_sequence_mappings(groups.tp_group, groups.tp_rank, 2)
    check_model_vs_dense(groups, True, sequence_parallel=True)
    check_model_vs_dense(groups, False, sequence_parallel=True, n_kv_heads=2, tie_embeddings=True,
                         activation_checkpointing="full")
    # Q/K/V biases (Qwen2): split like the columns, added after the TP-region entry, with and without SP
    check_model_vs_dense(groups, True, qkv_bias=True, qk_norm=False, n_kv_heads=2)
    check_model_vs_dense(groups, False, sequence_parallel=True, qkv_bias=True, qk_norm=False,
                         activation_checkpointing="full")
    # a sliding window (Mistral, Phi-3) of 6 of the 16 tokens, with documents, under SP: the mask spans the gathered
    # sequence, not this rank's slice
    check_model_vs_dense(groups, True, sequence_parallel=True, sliding_window=6, qk_norm=False, n_kv_heads=2,
                         nope_blocks=[0])  # and SmolLM3's block without RoPE
    # OLMo 2: post-norm blocks and a QK-norm over all heads' dims (sum of squares summed over TP), with and without SP
    check_model_vs_dense(groups, False, norm_position="post", qk_norm_scope="full", n_kv_heads=2)
    check_model_vs_dense(groups, True, sequence_parallel=True, norm_position="post", qk_norm_scope="full",
                         activation_checkpointing="full")
    # Gemma 3: sandwich norms with 1 + w gains, GeGLU, scaled embeddings and attention, a windowed block with its own
    # RoPE next to a full one
    check_model_vs_dense(groups, True, sequence_parallel=True, **GEMMA3_LIKE)
    check_model_vs_dense(groups, False, **dict(GEMMA3_LIKE, attn_softcap=2.0, logit_softcap=3.0))  # Gemma 2's caps
    # GPT-NeoX / Pythia (LayerNorm gains and biases summed over TP under SP, O / FFN biases added after the
    # reduction), and Llama's attention_bias / mlp_bias on a gated FFN
    check_model_vs_dense(groups, True, **NEOX_LIKE)
    check_model_vs_dense(groups, False, sequence_parallel=True, activation_checkpointing="full", **NEOX_LIKE)
    check_model_vs_dense(groups, False, sequence_parallel=True, qk_norm=False, qkv_bias=True, o_bias=True,
                         ffn_bias=True, n_kv_heads=2)
    # a mixture of 4 experts, top 2 (Mixtral / Qwen3-MoE): every rank runs its shard of each expert on the tokens
    # routed to it, one reduction for all; the replicated router's gradient summed over TP
    check_model_vs_dense(groups, True, **MOE_LIKE)
    check_model_vs_dense(groups, False, sequence_parallel=True, activation_checkpointing="full",
                         **dict(MOE_LIKE, moe_norm_topk=False))
    # Qwen2-MoE: a shared expert split over TP in the same region, its replicated sigmoid gate's grad summed
    check_model_vs_dense(groups, True, **dict(MOE_LIKE, moe_shared_ff=96, qk_norm=False, qkv_bias=True))
    # one key/value head for two ranks (Gemma 3 1B, MQA): replicated K / V, each rank's gradient share summed
    check_kv_replicated(groups, 1)
    check_model_vs_dense(groups, True, n_kv_heads=1, qkv_bias=True, qk_norm=False)
    check_model_vs_dense(groups, False, sequence_parallel=True, **dict(GEMMA3_LIKE, n_kv_heads=1),
                         activation_checkpointing="full")
    sp = Transformer(_cfg(), groups.factory(sequence_parallel=True))
    with pytest.raises(UserError, match="sequence length 15 is not divisible by parallel.tp_size=2"):
        sp(torch.zeros(1, 15, dtype=torch.long))
    return "ok"


def world4_worker(rank, world):
    # TP=2 x DP=2: groups, mpu, and each TP pair reproducing the dense model
    groups = ParallelGroups.build(2)
    check_groups(groups, world, 2)
    check_model_vs_dense(groups, True)
    with pytest.raises(UserError, match="parallel.tp_size=3 does not divide the world size 4"):
        ParallelGroups.build(3)
    # TP=4 on the same processes
    groups4 = ParallelGroups.build(4)
    check_groups(groups4, world, 4)
    check_mappings(groups4.tp_group, groups4.tp_rank, 4)
    check_columns_entry(groups4.tp_group, groups4.tp_rank, 4)
    for docs in (False, True):
        check_model_vs_dense(groups4, docs)
    check_sequence_mappings(groups4.tp_group, groups4.tp_rank, 4)
    check_model_vs_dense(groups4, True, sequence_parallel=True)
    check_model_vs_dense(groups4, False, sequence_parallel=True, n_kv_heads=4, qk_norm=False,
                         activation_checkpointing="every_k")
    check_model_vs_dense(groups4, False, sequence_parallel=True, n_kv_heads=4, qk_norm=False, qkv_bias=True,
                         sliding_window=6)
    check_model_vs_dense(groups4, True, sequence_parallel=True, n_kv_heads=4, norm_position="post",
                         qk_norm_scope="full")
    check_model_vs_dense(groups4, False, **dict(GEMMA3_LIKE, n_kv_heads=4))
    check_model_vs_dense(groups4, True, sequence_parallel=True, **dict(NEOX_LIKE, parallel_residual=False))
    check_model_vs_dense(groups4, True, sequence_parallel=True, **dict(MOE_LIKE, moe_shared_ff=128))
    # OLMo 1: LayerNorms without parameters, q / k / v clamped (0.3: inside the tiny model's projections' range)
    check_model_vs_dense(groups4, False, sequence_parallel=True, norm_type="layer_noaffine", qkv_clip=0.3,
                         qk_norm=False, n_kv_heads=2)
    # fewer key/value heads than the 4 ranks: 2 (Qwen2.5-3B at TP=4), each read by a pair of ranks, and 1
    check_kv_replicated(groups4, 2)
    check_model_vs_dense(groups4, True, n_kv_heads=2, qkv_bias=True, qk_norm=False)
    check_model_vs_dense(groups4, False, sequence_parallel=True, n_kv_heads=2, sliding_window=6,
                         activation_checkpointing="every_k")
    check_model_vs_dense(groups4, True, sequence_parallel=True, n_kv_heads=1)
    return "ok"


def test_tp2_model_mappings_groups():
    assert run_distributed(tp2_worker, 2) == ["ok", "ok"]


def test_world4_tp2_dp2_and_tp4():
    assert run_distributed(world4_worker, 4) == ["ok"] * 4


def test_single_groups_need_no_distributed():
    g = ParallelGroups.single()
    assert (g.world_size, g.tp_size, g.dp_size, g.tp_group, g.dp_group) == (1, 1, 1, None, None)
    mpu = g.mpu()
    assert (mpu.get_model_parallel_world_size(), mpu.get_data_parallel_rank()) == (1, 0)
    assert g.factory().tp_size == 1
