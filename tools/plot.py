#!/usr/bin/env python
"""Scaling-law figures (fit, isoflop, capacity-gap, allocation, crossover): same as `megadistill plot`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["plot", *sys.argv[1:]]))
