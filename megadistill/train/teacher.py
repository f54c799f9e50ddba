"""The co-resident frozen teacher: same TP layout as the student, loaded from a finished run or a Hugging Face folder
(`hf:PATH`), no grads, no optimizer; its vocabulary and tokenizer checked against the student's before any compute."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from omegaconf import OmegaConf
from torch import nn

from megadistill import config as config_mod
from megadistill.config import Config, ModelConfig, tp_split_problem
from megadistill.errors import UserError
from megadistill.model.sizes import params_of
from megadistill.model.transformer import Transformer
from megadistill.parallel.groups import ParallelGroups
from megadistill.train import checkpoint

log = logging.getLogger(__name__)


MASKED_LOGIT = -1e4  # logit of a padded vocab row: exp() underflows to exactly 0 against real logits, stays finite


@dataclass
class TeacherSource:
    """Where a teacher's weights come from and what they are, resolved and checked without loading any weight."""

    model_cfg: ModelConfig  # the teacher's shape (vocab cut to the student's when its extra rows are padding)
    weights_dir: Path
    hf: bool  # a Hugging Face folder (HF names, sharded safetensors) rather than a megadistill model dir
    run: str
    tokens: int  # tokens it was trained on (0: unknown, e.g. an external checkpoint)
    eval_loss: Optional[float]
    vocab_limit: Optional[int] = None  # ids >= this are padding beyond the tokenizer: their logits are masked


@dataclass
class Teacher:
    module: nn.Module  # the frozen model (ZeRO-3 hooks installed on it when partitioned); call it like the model
    engine: Optional[object]  # the ZeRO-3 inference engine holding the partitions, or None when replicated
    model_cfg: ModelConfig
    run: str  # the teacher run's name
    params: int  # non-embedding N
    tokens: int  # tokens the teacher was trained on
    eval_loss: Optional[float]  # the teacher's own last recorded eval loss (None if unknown)
    weights_dir: Path


def teacher_model_config(weights_dir: Path) -> Config:
    return config_mod.from_dict(OmegaConf.to_container(OmegaConf.load(weights_dir / "config.yaml")))


def materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """Allocate a meta-device model's parameters (uninitialised) on `device`, keeping their TP / µP tags.

    The teacher (and a student read for eval) is built on the meta device, so its random initialisation (full fp32
    draws on every rank, minutes for a 12.6B model on a CPU, 50 GB of host memory per rank) never happens: every
    weight is overwritten by the load.
    """
    if any(True for _ in model.buffers()):
        raise RuntimeError("the model has buffers, which the weight files do not hold: they would stay uninitialised")
    tags = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model = model.to_empty(device=device)  # new Parameter objects: their attributes must be put back
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty gives each module its own copy of a shared Parameter
    for name, p in model.named_parameters():
        p.__dict__.update(tags[name])
    return model


def _teacher_tokenizer_dir(source_dir: Path, hf: bool, tcfg: Optional[Config]) -> Optional[str]:
    if hf:
        from megadistill.data.tokenizer import has_tokenizer
        return str(source_dir) if has_tokenizer(source_dir) else None
    return tcfg.data.tokenizer if tcfg is not None else None


def weights_source(ref: str) -> Tuple[ModelConfig, Path, bool, Optional[Config]]:
    """A weights reference (run dir, model / export dir, or hf:PATH) -> (its model config, the dir holding the
    weights, whether they carry HF names, the run's full Config when it is one of ours)."""
    from megadistill.hf.config import hf_path, read_config, to_model_config

    folder = hf_path(ref)
    if folder is not None:
        return to_model_config(read_config(folder), where=f"{folder}/config.json"), folder, True, None
    weights_dir = checkpoint.find_weights(ref)
    tcfg = teacher_model_config(weights_dir)
    return tcfg.model, weights_dir, False, tcfg


def teacher_source(cfg: Config) -> TeacherSource:
    """Resolve distill.teacher (a run dir, an export dir or hf:PATH) and check it fits the student: vocabulary,
    tokenizer and TP layout. Reads configs and tokenizers only; every mismatch is a UserError before any compute."""
    ref = cfg.distill.teacher
    tm, weights_dir, hf, tcfg = weights_source(ref)
    if hf:
        run, tokens, eval_loss, origin = weights_dir.name, 0, None, f"{weights_dir}/config.json"
    else:
        meta_file = weights_dir / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        run, tokens = meta.get("run", weights_dir.parent.name), int(meta.get("tokens", 0))
        eval_loss, origin = meta.get("eval_loss"), f"{weights_dir}/config.yaml"

    # tokenizers: the student's data and the teacher must map text to the same ids
    from megadistill.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    t_dir = _teacher_tokenizer_dir(weights_dir, hf, tcfg)
    s_tok = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    t_tok = load_tokenizer(t_dir) if t_dir else None
    if s_tok is not None and t_tok is not None and tokenizer_fingerprint(s_tok) != tokenizer_fingerprint(t_tok):
        raise UserError(f"the teacher's tokenizer ({t_dir}, {len(t_tok)} tokens) differs from the student's "
                        f"data.tokenizer={cfg.data.tokenizer!r} ({len(s_tok)} tokens): the teacher's logits would "
                        "score other tokens; set data.tokenizer to the teacher's tokenizer")
    if s_tok is None and t_tok is not None and cfg.data.source == "synthetic":
        log.warning("teacher %s comes with a tokenizer but data.source=synthetic: the ids mean nothing to it", ref)
    n_tok = len(s_tok) if s_tok is not None else (len(t_tok) if t_tok is not None else None)

    # vocabulary: rows beyond the tokenizer are padding; the teacher's are cut to the student's vocab and masked
    vs, vt = cfg.model.vocab_size, tm.vocab_size
    if vt < vs:
        raise UserError(f"teacher vocab_size={vt} (from {origin}) < model.vocab_size={vs}: teacher and student must "
                        f"share the vocabulary; set model.vocab_size={vt}")
    if vt > vs:
        if n_tok is None or n_tok > vs:
            raise UserError(f"teacher vocab_size={vt} (from {origin}) != model.vocab_size={vs}: teacher and student "
                            "must share the tokenizer" + (f" (it has {n_tok} tokens)" if n_tok else
                            "; set data.tokenizer so the teacher's padding rows can be told apart, or set "
                            f"model.vocab_size={vt}"))
        log.info("teacher vocab %d is padded beyond the tokenizer's %d ids: rows >= %d dropped", vt, n_tok, vs)
        tm.vocab_size = vs
    limit = n_tok if n_tok is not None and n_tok < vs else None
    if limit is not None and cfg.distill.fused:
        raise UserError(f"the vocabulary is padded ({n_tok} tokenizer ids < model.vocab_size={vs}): the teacher's "
                        "padding rows are masked on materialised logits, which distill.fused=true never forms; set "
                        f"distill.fused=false (or model.vocab_size={n_tok} if parallel.tp_size divides it)")

    if tm.logit_softcap and cfg.distill.fused:
        raise UserError(f"the teacher caps its logits (logit_softcap={tm.logit_softcap}, from {origin}), which the "
                        "fused loss (distill.fused=true) never forms; set distill.fused=false")
    problem = tp_split_problem(tm, cfg.parallel.tp_size, lambda key: f"the teacher's {key}")
    if problem:  # the student's own shape passed the same check in Config.validate
        raise UserError(f"{problem} (the teacher, from {origin}, is split over TP like the student)")
    tm.attention = cfg.model.attention  # the backend is a property of this run's hardware, not of the weights
    tm.kernels = cfg.model.kernels  # so are the fused kernels (torch | liger), for our and HF teachers alike
    tm.activation_checkpointing = "off"  # no backward through the teacher
    return TeacherSource(tm, weights_dir, hf, run, tokens, eval_loss, limit)


def _mask_padding(head: nn.Module, limit: int, tp_rank: int) -> None:
    """Forward hook on the head: logits of global ids >= limit (on this rank's vocab shard) are MASKED_LOGIT."""
    local = head.weight.shape[0]
    pad = torch.arange(tp_rank * local, (tp_rank + 1) * local, device=head.weight.device) >= limit  # [V/tp]
    if not bool(pad.any()):
        return

    def hook(_module, _inputs, out):
        return out.masked_fill(pad.to(out.device), MASKED_LOGIT)

    head.register_forward_hook(hook)


def load_teacher(cfg: Config, groups: ParallelGroups, device: torch.device,
                 source: Optional[TeacherSource] = None) -> Teacher:
    """Build the teacher with the student's TP layout, stream its weights in (this rank's shard only), freeze it."""
    src = source if source is not None else teacher_source(cfg)
    tm = src.model_cfg
    dtype = torch.bfloat16 if cfg.distill.teacher_dtype == "bf16" else torch.float32
    factory = groups.teacher_factory(device="meta", dtype=dtype, sequence_parallel=cfg.parallel.sequence_parallel)
    model = materialize(Transformer(tm, factory), device)
    if src.hf:
        from megadistill.hf.weights import load_into
        load_into(model, src.weights_dir, groups.tp_rank, groups.tp_size)
    else:
        checkpoint.load_sharded_weights(model, src.weights_dir, groups)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if src.vocab_limit is not None:
        _mask_padding(model.head, src.vocab_limit, groups.tp_rank)
    n, _ = params_of(tm)
    engine = None
    if cfg.distill.teacher_zero3 and groups.dp_size > 1:
        from megadistill.train import compile as compile_mod
        from megadistill.train.engine import initialize_frozen
        compile_mod.prepare(cfg, device, model)  # before ZeRO-3 hooks it: compiled blocks are gathered whole
        engine = initialize_frozen(model, cfg, groups)
        engine.eval()
    log.info("teacher %s loaded from %s (N=%.3g, zero3=%s)", src.run, src.weights_dir, n, cfg.distill.teacher_zero3)
    return Teacher(module=model, engine=engine, model_cfg=tm, run=src.run, params=n, tokens=src.tokens,
                   eval_loss=src.eval_loss, weights_dir=src.weights_dir)
