"""Hugging Face interop: import Qwen3 / Qwen2 / Llama / Mistral / Phi-3 / OLMo 2 / Gemma 2 / Gemma 3 / SmolLM3
checkpoints as teachers or model dirs, export runs transformers loads."""
