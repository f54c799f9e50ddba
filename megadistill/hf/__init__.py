"""Hugging Face interop: import Qwen3 / Llama checkpoints as teachers or model dirs, export runs transformers loads."""
