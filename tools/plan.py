#!/usr/bin/env python
"""Compute-optimal distillation vs supervised training at a FLOPs budget: same as `megadistill plan`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
