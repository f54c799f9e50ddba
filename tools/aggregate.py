#!/usr/bin/env python
"""Collect eval records from run dirs / eval.jsonl / CSV into one loss table: same as `megadistill aggregate`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["aggregate", *sys.argv[1:]]))
