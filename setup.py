"""megadistill: distributed distillation trainer and distillation scaling-law toolkit."""
from setuptools import find_packages, setup

setup(
    name="megadistill",
    version="0.1.0",
    description="Megatron-style TP x DeepSpeed ZeRO trainer for distillation scaling-law research",
    packages=find_packages(include=["megadistill", "megadistill.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The torch spec is pinned by the Makefile (TORCH_SPEC) so GPU clusters can pick their build.
        "torch>=2.5",  # SDPA enable_gqa (grouped-query attention); tested: 2.13 (make test), 2.11 (make test-compat)
        # tested with 0.19.8; the memory model and the ZeRO-3 / compile paths read its behaviour (gathers, hooks)
        "deepspeed>=0.19.8,<0.20",
        "transformers>=4.51",  # Qwen3ForCausalLM (export --format hf, interop tests)
        "datasets>=2.18",
        "tokenizers>=0.15",
        "scipy>=1.10",
        "omegaconf>=2.3",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "pytest-xdist>=3"],
        "gpu": ["flash-attn>=2.5"],
        "liger": ["liger-kernel>=0.5"],  # model.kernels=liger (fused RMSNorm / SwiGLU / RoPE); not installed by CI
        "bench": ["liger-kernel>=0.4", "psutil"],
        "plot": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["megadistill=megadistill.cli:main"]},
)
