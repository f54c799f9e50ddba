"""µP (simple), after Wortsman et al. 2024: per-role init std, LR multipliers and weight-decay flags for the optimizer."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Union

import torch.nn as nn

# Every parameter of the Transformer carries `mup_role`, one of:
#   embedding  input token embedding [V, d]
#   hidden     Q, K, V, O and the FFN's matrices (three SwiGLU, or two of a plain MLP)
#   head       output (unembedding) matrix [V, d]
#   norm       RMSNorm / LayerNorm gains (pre-norms, QK-norm, final norm)
#   bias       biases: of the Q, K, V projections (model.qkv_bias, Qwen2-style models), of O and the FFN matrices
#              (model.o_bias, model.ffn_bias) and of LayerNorms (model.norm_type=layer)
#
# The paper (Appendix H) uses µP (simple) with peak LR 1e-2 at every size and does not state the details; ours:
#   role       init std            LR multiplier              weight decay
#   embedding  1                   1                          yes
#   hidden     1/sqrt(fan_in)      base_width / d_model       yes
#   head       1/sqrt(d_model)     base_width / d_model       yes
#   norm       gain = 1            1                          no
#   bias       0                   1                          no
# Why: with Adam, a matrix whose fan_in grows with width must take steps ~ 1/width for its output to change by
# O(1) per step (the µP hidden-layer rule); the embedding's fan_in is a one-hot (1), so neither its init nor its LR
# depends on width; the head is a fan_in = d_model matrix and is treated like the hidden ones ("simple" µP: no
# extra 1/width logit multiplier and no zero init), which keeps the initial logits O(1) after the final RMSNorm.
# The multiplier uses d_model for every hidden matrix (also the d_ff-fan-in down projection): d_ff / d_model is
# fixed (8/3), so this differs from a per-matrix 1/fan_in only by a width-independent constant absorbed by the LR.
# Norm gains are not decayed: decoupled decay pulls them towards 0, not towards their identity value 1.
# Biases are vectors whose size grows with width but whose fan_in is 1 (like the embedding's): µP leaves their LR
# unscaled; like norm gains they are not decayed (the common practice for biases).
ROLES = ("embedding", "hidden", "head", "norm", "bias")
ATTR = "mup_role"


def init_std_for(role: str, fan_in: Optional[int] = None) -> float:
    """Initial N(0, std^2) std of a weight of this role (norm gains are initialised to 1, not drawn)."""
    _check(role)
    if role == "embedding":
        return 1.0
    if role in ("hidden", "head"):
        if not fan_in or fan_in <= 0:
            raise ValueError(f"init_std_for({role!r}) needs the matrix's fan_in (> 0), got {fan_in!r}")
        return 1.0 / math.sqrt(fan_in)
    raise ValueError("norm gains are initialised to 1 and biases to 0, they have no init std")


def lr_mult_for(role: str, d_model: int, base_width: int) -> float:
    """Multiplier on the optimizer's base LR for parameters of this role."""
    _check(role)
    return base_width / d_model if role in ("hidden", "head") else 1.0


def decay_for(role: str) -> bool:
    """Whether decoupled weight decay applies to this role."""
    _check(role)
    return role not in ("norm", "bias")


def tag(params: Union[nn.Module, nn.Parameter, Iterable[nn.Parameter]], role: str) -> None:
    """Set `mup_role` on a parameter, an iterable of parameters, or every parameter of a module."""
    _check(role)
    if isinstance(params, nn.Module):
        params = params.parameters()
    elif isinstance(params, nn.Parameter):
        params = [params]
    for p in params:
        setattr(p, ATTR, role)


def param_groups(model: nn.Module, cfg) -> List[Dict]:
    """Optimizer groups [dict(name, params, lr_mult, decay)], one per role present, in ROLES order.

    `cfg` is a ModelConfig (or a Config, whose .model is used): d_model and mup_base_width set the hidden LR
    multiplier. Frozen parameters are left out. Every trainable parameter must carry `mup_role`.
    """
    mcfg = getattr(cfg, "model", cfg)
    by_role: Dict[str, list] = {r: [] for r in ROLES}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = getattr(p, ATTR, None)
        if role not in by_role:
            raise ValueError(f"parameter {name!r} has no µP role (attribute {ATTR!r}); tag it with mup.tag(...)")
        by_role[role].append(p)
    return [dict(name=role, params=ps, lr_mult=lr_mult_for(role, mcfg.d_model, mcfg.mup_base_width),
                 decay=decay_for(role))
            for role, ps in by_role.items() if ps]


def _check(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown µP role {role!r}; one of {ROLES}")
