"""The model's fusable ops -- RMSNorm, SwiGLU's silu(a) * b, RoPE -- as our eager torch ops or Liger-Kernel's Triton
kernels, chosen by model.kernels (torch | liger) and passed in explicitly by the caller; and the grouped matmul of a
mixture of experts (one kernel for all experts where torch has it)."""
from __future__ import annotations

import concurrent.futures
import functools
import logging
from typing import Tuple

import torch
import torch.nn.functional as F

from megadistill.errors import UserError
from megadistill.model.attention import apply_rotary

log = logging.getLogger(__name__)

KERNELS = ("torch", "liger")

# Liger's functions, matched to our ops (liger_kernel.ops, read at 0.8.5):
# - LigerRMSNormFunction(x, w, eps, offset=0, casting_mode="gemma", in_place=False): gemma mode casts x and w to fp32,
#   normalises and scales in fp32 and casts y back to x's dtype, as _RMSNormFn does; it keeps 1 / rms per row in fp32
#   like ours. in_place=False: the default (True) writes dx into the incoming dy, which is only safe when no other
#   node reads that gradient buffer.
# - LigerSiLUMulFunction(a, b): silu computed in fp32 on a, cast to b's dtype, times b (what F.silu(a) * b does in
#   bf16). Its backward writes da, db into the saved a, b (they are not needed afterwards).
# - LigerRopeFunction(q, k, cos, sin): the rotate-half convention (x cos + rotate_half(x) sin, pairs (i, i + hd/2)),
#   cos / sin [s, hd] with the two halves duplicated, exactly our Rotary tables. Its q / k are [b, h, s, hd] views of
#   [b, s, h, hd] storage, so our [b, s, h, hd] tensors go in as .transpose(1, 2) without a copy. It rotates q and k
#   IN PLACE (and dq, dk in backward): the pre-rotation q / k must have no other reader (true in Attention: neither
#   the QK-norm nor the projections save their output for backward).
#
# torch.compile: each Liger call runs under torch.compiler.disable, one graph break per op in a compiled block.
# Dynamo can trace user Triton kernels, but these mutate their inputs in place from inside autograd Functions and
# carry Python-side dispatch (DTensor checks, device properties, context managers). Inductor's handling of such
# mutating kernels has had silent-correctness bugs (pytorch/pytorch#132196, #136550), Liger under compile has raised
# (Liger-Kernel#174), and Hugging Face's Liger wrappers break the graph the same way (kernels-community#906); Inductor
# already fuses these elementwise / row-reduction ops itself. Eager Liger between the graphs is the safe contract.


def validate(kernels: str, key: str = "model.kernels") -> None:
    """kernels is one of KERNELS, and for liger: CUDA is present and liger_kernel imports (UserError naming the fix)."""
    if kernels not in KERNELS:
        raise UserError(f"{key}={kernels!r} is not one of {list(KERNELS)}")
    if kernels != "liger":
        return
    if not torch.cuda.is_available():
        raise UserError(f"{key}='liger' runs Liger-Kernel's Triton kernels, which need a CUDA GPU, and none is "
                        f"available here; set {key}=torch")
    try:
        _liger()
    except ImportError as e:
        raise UserError(f"{key}='liger' needs the liger-kernel package ({e}): pip install liger-kernel (or "
                        f"pip install -e '.[liger]'), or set {key}=torch") from None


@functools.lru_cache(maxsize=None)
def _liger():
    """Liger's autograd functions, each wrapped in torch.compiler.disable (imported on first use only: Triton, and
    torch._dynamo for the wrapper, are not loaded for kernels=torch)."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    @torch.compiler.disable
    def rms_norm(x, gain, eps):
        return LigerRMSNormFunction.apply(x, gain, eps, 0.0, "gemma", False)

    @torch.compiler.disable
    def swiglu(gate, up):
        return LigerSiLUMulFunction.apply(gate, up)

    @torch.compiler.disable
    def rope(q, k, cos, sin):
        qr, kr = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [b, h, s, hd] views
        return qr.transpose(1, 2), kr.transpose(1, 2)  # [b, s, h, hd]

    return rms_norm, swiglu, rope


def traced_output(y: torch.Tensor) -> torch.Tensor:
    """What an autograd Function's forward returns: y, or a view of it inside a torch.compile graph. torch 2.11's
    dynamo drops the gradient of a Function whose output is an in-place result or a collective's result tensor (the
    backward is never called: zero gradients; tests/test_compile.py); a view of it traces correctly, for free. Eager
    code returns y itself (a view made inside a Function could not be modified in place later)."""
    return y.view_as(y) if torch.compiler.is_compiling() else y


class _RMSNormFn(torch.autograd.Function):
    """y = x r g with r = 1 / sqrt(mean(x^2) + eps), in fp32; saves only x and r (one float per row).

    Backward in closed form (xhat = x r, u = dy g): dx = r (u - xhat mean(u xhat)), dg = sum_rows dy xhat: about
    half the passes autograd makes through pow / mean / rsqrt / mul, and no fp32 copies kept for backward.
    """

    @staticmethod
    def forward(ctx, x, g, eps: float):
        xf = x.float()
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))  # [..., 1]
        ctx.save_for_backward(x, r, g)
        y = (xf * r).mul_(g)
        return y.to(x.dtype) if y.dtype != x.dtype else traced_output(y)  # fp32: y is an in-place result

    @staticmethod
    def backward(ctx, dy):
        x, r, g = ctx.saved_tensors
        xhat = x.float() * r
        dyf = dy.float()
        dg = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0).to(g.dtype) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            u = dyf * g
            dx = u.sub_(xhat.mul_((u * xhat).mean(-1, keepdim=True))).mul_(r).to(x.dtype)
        return dx, dg, None


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float, kernels: str = "torch") -> torch.Tensor:
    """x [..., d] / sqrt(mean(x^2) + eps) * gain [d], normalised and scaled in fp32, returned in x's dtype."""
    if kernels == "liger":
        return _liger()[0](x, gain, eps)
    return _RMSNormFn.apply(x, gain, eps)


def activate(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """model.activation elementwise: silu, gelu_tanh (tanh-approximated GELU) or gelu (exact, erf)."""
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "gelu":
        return F.gelu(x)
    return F.silu(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor, kernels: str = "torch", activation: str = "silu") -> torch.Tensor:
    """act(gate) * up, elementwise ([..., f/tp] each): the gated activation between W1 / W3 and W2. silu: SwiGLU
    (Liger's kernel under kernels=liger); gelu_tanh: GeGLU with tanh-approximated GELU (Gemma), gelu: exact GeGLU,
    our torch ops."""
    if activation == "silu" and kernels == "liger":
        return _liger()[1](gate, up)
    return activate(gate, activation) * up


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         kernels: str = "torch") -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [b, s, h, hd] and k [b, s, h_kv, hd] by the tables cos, sin [s, hd] (Rotary's half-split layout).

    Tables narrower than the heads ([s, r], r < hd: partial RoPE, model.rope_fraction) rotate the first r dims of each
    head and pass the rest through; that runs our torch op (Liger's kernel rotates whole heads, in place).
    kernels=liger rotates q and k in place (their storage is reused for the outputs).
    """
    r = cos.shape[-1]
    if r < q.shape[-1]:
        qr, kr = apply_rotary(q[..., :r], cos, sin), apply_rotary(k[..., :r], cos, sin)
        return torch.cat([qr, q[..., r:]], dim=-1), torch.cat([kr, k[..., r:]], dim=-1)
    if kernels == "liger":
        return _liger()[2](q, k, cos, sin)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x [n, in] grouped by expert -- counts[e] consecutive rows for expert e, in expert order, summing to n --
    each through its expert's matrix of weight [E, out, in]: [n, out], F.linear(x_e, weight[e]) per group.

    One grouped GEMM (torch._grouped_mm: CUTLASS on Hopper in bf16, a fallback on the CPU) for all E experts, with the
    group offsets kept on the device (no host sync); where it cannot run (rows not 16-byte aligned, another dtype or
    GPU, a torch without it) a loop over the experts, whose weight gradient is assembled once (unbind), not per
    expert. Experts without rows get zero gradients either way."""
    if (x.dtype == weight.dtype and x.device == weight.device and grouped_mm_usable(x, weight.shape[1], weight.shape[2])
            and (torch.compiler.is_compiling() or _aligned(x, weight))):
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=counts.cumsum(0, dtype=torch.int32))
    parts = x.split(counts.tolist())
    return torch.cat([F.linear(part, w) for part, w in zip(parts, weight.unbind(0))])


def _aligned(*ts: torch.Tensor) -> bool:
    """torch._grouped_mm's check on CUDA that each operand starts 16-byte aligned: DeepSpeed's flat ZeRO-1/2 buffers
    make parameters views at cumulative offsets, so an expert weight after a parameter whose size is not a multiple
    of 16 bytes would be a RuntimeError mid-forward (never seen with widths that are multiples of 8)."""
    return all(t.data_ptr() % 16 == 0 for t in ts)


def group_rows(device: torch.device) -> int:
    """The multiple of rows each expert's group is padded to before the grouped GEMMs (pad_groups): 16 on CUDA, 1
    (none) elsewhere. CUTLASS's grouped GEMM checks in a kernel that a group's extent along the dynamic dimension is
    16-byte aligned (torch 2.8's asked for a multiple of 16 rows, later ones for 16 bytes where the layout needs it)
    and fails with a device-side assert, which ends the process: no try / except (or probe) recovers from it."""
    return 16 if device.type == "cuda" else 1


def pad_groups(x: torch.Tensor, counts: torch.Tensor, multiple: int):
    """Rows grouped by expert (counts[e] consecutive rows for expert e) spread so that every group starts at a
    multiple of `multiple` rows, zeros between. Returns x_padded [n + E (multiple - 1) rounded up to a multiple, d],
    the padded counts (multiples, summing to that) and rows [n], where each row of x went
    (x_padded.index_select(0, rows) == x). The slack past the last group's padding goes to the last group, so every
    row lies inside a group (none left uninitialised by the GEMM). No shape depends on the counts (no host sync;
    traceable)."""
    n, experts = x.shape[0], counts.numel()
    total = -(-(n + experts * (multiple - 1)) // multiple) * multiple  # the last group a multiple too
    padded = (counts + multiple - 1) // multiple * multiple
    padded = torch.cat([padded[:-1], (total - padded[:-1].sum()).reshape(1)])
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # each group's start, padded minus packed
    expert = torch.repeat_interleave(torch.arange(experts, device=x.device), counts, output_size=n)
    rows = torch.arange(n, device=x.device) + shift[expert]
    # index_put: its backward keeps only the indices (index_copy's keeps the packed rows too)
    return x.new_zeros(total, x.shape[1]).index_put((rows,), x), padded, rows


def grouped_mm_usable(x: torch.Tensor, out_features: int, in_features: int) -> bool:
    """Whether grouped_linear runs x (and weights of its dtype) [E, out_features, in_features] as one grouped GEMM:
    rows of in and out features 16-byte aligned, and (probed once per device and dtype) the kernel runs at all."""
    size = x.element_size()
    return (out_features * size % 16 == 0 and in_features * size % 16 == 0
            and _grouped_mm_ok(x.device.type, x.device.index, x.dtype))


def grouped_mm_traceable(x: torch.Tensor, out_features: int, in_features: int) -> bool:
    """Whether torch.compile can trace grouped_linear's grouped GEMM for x: it runs (grouped_mm_usable) and x is bf16,
    the one dtype torch's shape function for _grouped_mm takes (the CPU's eager kernel takes fp32 too)."""
    return x.dtype == torch.bfloat16 and grouped_mm_usable(x, out_features, in_features)


@torch.compiler.assume_constant_result  # a fact of the device: dynamo calls it while tracing, as a constant
def _grouped_mm_ok(device_type: str, index, dtype: torch.dtype) -> bool:
    return _grouped_mm_works(device_type, index, dtype)


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, index, dtype: torch.dtype) -> bool:
    """One tiny forward and backward of torch._grouped_mm in this layout (three experts, one empty, the others' rows
    as group_rows pads them) against per-expert matmuls, output and both gradients; False (the loop is used, logged
    once) where it is absent, raises, or is wrong.

    Run in a thread of its own: the caller's thread-local autograd state stays out of it -- the saved-tensor hooks
    of an activation checkpoint (the probe's backward would set off the block's recompute, which stops itself with
    an exception: the probe failed under every checkpointed mixture), a teacher's inference mode, a tracer."""
    if not hasattr(torch, "_grouped_mm") or device_type not in ("cpu", "cuda"):
        return False
    if device_type == "cuda" and dtype != torch.bfloat16:  # CUTLASS's grouped GEMM is bf16-only
        return False
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grouped-mm-probe") as pool:
        return pool.submit(_probe_grouped_mm, device_type, index, dtype).result()


def _probe_grouped_mm(device_type: str, index, dtype: torch.dtype) -> bool:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    try:
        with torch.inference_mode(False), torch.enable_grad():  # a fresh thread's defaults, stated
            g = torch.Generator(device="cpu").manual_seed(0)
            # groups of rows as the dispatch makes them (group_rows): elsewhere not multiples of 8, on CUDA padded
            # (an unaligned group there is a device-side assert, the end of the process, not an exception)
            multiple = group_rows(device)
            first, last = (3, 10) if multiple == 1 else (multiple, 2 * multiple)  # expert 1 gets no rows
            x = torch.randn(first + last, 16, generator=g).to(device, dtype)
            w = torch.randn(3, 8, 16, generator=g).to(device, dtype)
            gy = torch.randn(first + last, 8, generator=g).to(device, dtype)
            offs = torch.tensor([first, first, first + last], device=device, dtype=torch.int32)
            results = []
            for grouped in (True, False):
                xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
                y = (torch._grouped_mm(xl, wl.transpose(1, 2), offs=offs) if grouped
                     else torch.cat([xl[:first] @ wl[0].T, xl[first:] @ wl[2].T]))
                y.backward(gy)
                results.append([y.float(), xl.grad.float(), wl.grad.float()])
            ok = all(torch.allclose(a, b, rtol=2e-2, atol=5e-2) for a, b in zip(*results))
            ok = ok and bool(results[0][2][1].eq(0).all())
    except (RuntimeError, NotImplementedError, TypeError) as e:
        log.info("torch._grouped_mm unavailable on %s in %s (%s): mixture-of-experts matmuls loop over the experts",
                 device_type, dtype, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    if not ok:
        log.warning("torch._grouped_mm disagrees with the per-expert loop on %s in %s: the loop is used",
                    device_type, dtype)
    return ok
