"""Hugging Face interop: import Qwen3 / Qwen2 / Llama / Mistral checkpoints as teachers or model dirs, export runs
transformers loads."""
