#!/usr/bin/env python
"""Fit the supervised or distillation scaling law to a loss table: same as `megadistill fit`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
