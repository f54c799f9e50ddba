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


def configure_logging(verbose: bool) -> None:
    """INFO on rank 0; on a multi-process launch the other ranks log warnings and errors only (their INFO lines
    repeat rank 0's, once per GPU of the job), each line tagged with its rank. -v: DEBUG on every rank."""
    from megadistill.parallel.init import launch_rank

    rank, world = launch_rank()
    tag = f"[rank {rank}] " if world > 1 else ""
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
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
