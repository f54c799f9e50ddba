"""megadistill: Megatron-style TP x DeepSpeed ZeRO distillation trainer and distillation scaling-law toolkit."""
__version__ = "0.1.0"
