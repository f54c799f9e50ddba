"""Step metrics: append-only train.jsonl (rank 0), optional TensorBoard, model FLOPs and MFU from PAPER.md's F(N)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch

from megadistill.config import ModelConfig
from megadistill.fileio import append_line
from megadistill.laws.flops import forward_flops_per_token
from megadistill.model.sizes import active_params

# dense bf16 peak FLOP/s per device (no sparsity), by substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "V100": 125e12}
# IEEE fp32 (no tensor cores) per device, for fp32 runs with train.tf32=false
PEAK_FP32 = {"H200": 67e12, "H100": 67e12, "A100": 19.5e12, "L40S": 91.6e12, "A10G": 31.2e12, "V100": 15.7e12}


def peak_flops(precision: str, tf32: bool = True, name: Optional[str] = None) -> Optional[float]:
    """Per-device peak for MFU; None on CPU or an unknown card (MFU is then not reported). fp32 runs: the TF32 rate
    (half the bf16 one on these parts) with train.tf32, else IEEE fp32's. name: the device's (default: this one's)."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16.items():
        if key in name:
            if precision == "bf16":
                return peak
            return peak / 2 if tf32 else PEAK_FP32[key]
    return None


def forward_flops(model: ModelConfig, seq_len: int) -> float:
    """F(N) of PAPER.md (Eq. 9) for this model shape, with its own aspect ratio rho = d_model / n_layers (N: the
    weights a token is multiplied by, a mixture of experts' routed ones only)."""
    n = active_params(model)
    return forward_flops_per_token(n, n_ctx=seq_len, n_vocab=model.vocab_size, rho=model.d_model / model.n_layers)


class MetricsLog:
    """Appends one JSON object per line (flushed) to <run_dir>/train.jsonl; mirrors scalars to TensorBoard if asked."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "train.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard not installed: keep the jsonl only
                self.tb = None

    def write(self, record: Dict) -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps(record))
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
