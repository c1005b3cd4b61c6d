"""The `fastdistil` command (also `python -m fastdistil`). Each subcommand lives in fastdistil/commands/<name>.py
with `add_parser(subparsers)` and `run(args) -> int`; this file only lists them."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("info", "demo", "embed", "check_kernels", "bench", "model_perf", "distill")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastdistil", description="Fused, padding-free runtime for small BERT "
                                     "encoders: inference and knowledge distillation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"fastdistil.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"fastdistil.commands.{name}":
                raise
            continue
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(args._run(args) or 0)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print(f"fastdistil {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
