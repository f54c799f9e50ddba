"""`megadistill <verb>`: the command-line interface; each subsystem registers its own verbs."""
from __future__ import annotations

import argparse
import importlib
import logging
import re
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


OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")  # a key=value override


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The verb's arguments. key=value overrides may also follow the options (`eval RUN --eval-tokens N data.x=y`):
    argparse fills a verb's `overrides` positional at its first positional run only and would call the rest
    unrecognized."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not isinstance(getattr(args, "overrides", None), list) or not all(OVERRIDE.match(a) for a in extra):
            parser.error("unrecognized arguments: " + " ".join(extra))
        args.overrides.extend(extra)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
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
