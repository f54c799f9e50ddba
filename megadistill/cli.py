"""`megadistill <verb>`: the command-line interface; each subsystem registers its own verbs."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from megadistill.errors import UserError

# Each module defines register(subparsers); every parser it adds sets `func(args) -> int`.
REGISTRARS = (
    "megadistill.train.commands",   # train, eval, export, import, teacher-cache, plan-memory
    "megadistill.demo.commands",    # demo
    "megadistill.data.commands",    # tokenizer
    "megadistill.laws.commands",    # aggregate, fit, predict, plan, sweep, plot
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megadistill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in REGISTRARS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"megadistill {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megadistill {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
