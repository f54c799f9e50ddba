"""Offline conversions: `megadistill import hf:PATH -o DIR` (HF folder -> megadistill model dir) and
`megadistill export RUN --format hf -o DIR` (a run -> a folder transformers.AutoModelForCausalLM loads)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch

from megadistill import config as config_mod
from megadistill.config import Config
from megadistill.errors import UserError
from megadistill.hf.config import from_model_config, fused_layout, hf_path, read_config, to_model_config
from megadistill.hf.weights import full_shape, hf_name, open_hf, state_to_hf, write_json, write_safetensors
from megadistill.model.sizes import params_of
from megadistill.train import checkpoint

log = logging.getLogger(__name__)

_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}
# tokenizer files a Hugging Face tokenizer folder may hold (copied along with the weights)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def _param_names(model_cfg) -> list:
    """Our parameter names for this shape (a tied head is not listed), from a meta-device build: no memory."""
    from megadistill.model.transformer import Transformer
    from megadistill.parallel.layers import LayerFactory
    return [n for n, _ in Transformer(model_cfg, LayerFactory(device="meta")).named_parameters()]


def _copy_tokenizer(src: Path, dst: Path) -> bool:
    files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not files:
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dst / f.name)
    return True


def import_hf(ref: str, out_dir: str, dtype: str = "auto") -> Path:
    """Write a megadistill model dir (model.safetensors with our names, config.yaml, meta.json, tokenizer/) from a
    local HF folder of a supported family (megadistill.hf.config.ARCHITECTURES). dtype auto keeps the stored dtype
    (bit-exact), else casts per tensor."""
    folder = hf_path(ref) if hf_path(ref) is not None else Path(ref)
    if dtype not in _DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {list(_DTYPES)}")
    m = to_model_config(read_config(folder), where=f"{folder}/config.json")
    st = open_hf(folder, m)
    state = {}
    for name in _param_names(m):
        h = hf_name(name, m)
        if h not in st:
            raise UserError(f"{folder}: tensor {h!r} (our {name}) is missing: does config.json match the weights?")
        t = st.read(h)
        expected = full_shape(m, name)
        if tuple(t.shape) != expected:
            raise UserError(f"{folder}: {h} has shape {tuple(t.shape)} but config.json implies {expected}: the "
                            "config contradicts the weights")
        state[name] = t if _DTYPES[dtype] is None else t.to(_DTYPES[dtype])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.model = m
    if _copy_tokenizer(folder, out / "tokenizer"):
        cfg.data.tokenizer = str((out / "tokenizer").resolve())
    checkpoint.write_weights(state, out, config_mod.to_yaml(cfg))
    meta = {"run": folder.name, "tokens": 0, "params": params_of(m)[0], "source": f"hf:{folder.resolve()}"}
    checkpoint.atomic_write_text(out / "meta.json", json.dumps(meta) + "\n")
    return out


def _weights_of_run(run_dir: Path, work: Path, step: Optional[int] = None) -> Path:
    """A run's consolidated weights dir: its model/ (finished run, or an export dir), else consolidated now from the
    latest checkpoint; with `step`, consolidated from that step's checkpoint."""
    if step is None:
        try:
            return checkpoint.find_weights(str(run_dir))
        except UserError:
            if not (run_dir / "checkpoints").is_dir():
                raise
    from megadistill.train.offline import export_run
    return export_run(str(run_dir), str(work), step)


def export_hf(run_dir: str, out_dir: str, max_position: Optional[int] = None, step: Optional[int] = None) -> Path:
    """Write config.json + model.safetensors (+ generation_config.json and the tokenizer files when the run used an
    HF tokenizer) that transformers loads, with no custom code, as the class that computes the run's model
    (megadistill.hf.config.from_model_config: Qwen3, Llama, ..., a mixture's Mixtral / Qwen3-MoE / OLMoE).
    step: the weights of that kept checkpoint (default: the finished run's, else its latest checkpoint's)."""
    from safetensors.torch import load_file

    from megadistill.train.teacher import teacher_model_config

    run_dir, out = Path(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = _weights_of_run(run_dir, out / ".consolidated", step)
    tcfg = teacher_model_config(weights)
    m = tcfg.model
    state = load_file(str(weights / checkpoint.WEIGHTS))  # our names, fp32 as trained
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(next(iter(state.values())).dtype, "float32")
    hf = from_model_config(m, max_position or max(tcfg.train.seq_len, 2048), dtype)
    tok_src = Path(tcfg.data.tokenizer) if tcfg.data.tokenizer else None
    if tok_src is not None and tok_src.is_dir() and _copy_tokenizer(tok_src, out):
        from megadistill.data.tokenizer import load_tokenizer
        tok = load_tokenizer(str(tok_src))
        hf.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
        write_json(out / "generation_config.json", {"eos_token_id": tok.eos_token_id,
                                                    "bos_token_id": tok.bos_token_id})
    write_safetensors(state_to_hf(state, m.tie_embeddings, fused=fused_layout(hf), model_cfg=m), out)
    write_json(out / "config.json", hf)
    shutil.rmtree(out / ".consolidated", ignore_errors=True)
    return out
