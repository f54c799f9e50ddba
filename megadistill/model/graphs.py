"""How many compiled graphs one compiled callable may hold.

dynamo compiles a new graph for each shape / grad mode / module attributes a compiled function meets, and past
torch._dynamo.config.recompile_limit (8) it runs that call eager, with only a warning. The trainer's compiled blocks
(megadistill.train.compile) and FlexAttention's kernel (megadistill.model.flex) are static (dynamic=False) and meet
more than 8 legitimately: e.g. a distillation run with sliding and full blocks compiles each kind for the teacher's
forward, the student's training step and its evaluation (6), and again for another batch size. with_graph_limit
raises the limit for its callable's calls only, leaving every other compiled function to the process's setting.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

GRAPH_LIMIT = 32  # per compiled callable: generous for a run's (role, mode, block kind, batch) variety, and bounded


def with_graph_limit(fn: Callable, limit: int = GRAPH_LIMIT) -> Callable:
    """fn, called with dynamo's recompile limit at least `limit` (restored after each call; a set/restore of one
    config entry, ~4 us, not config.patch's ~17 us: this wraps every block call)."""
    config = torch._dynamo.config

    @functools.wraps(fn)
    def call(*args, **kwargs):
        old = config.recompile_limit
        if old >= limit:
            return fn(*args, **kwargs)
        config.recompile_limit = limit
        try:
            return fn(*args, **kwargs)
        finally:
            config.recompile_limit = old
    return call
