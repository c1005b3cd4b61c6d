"""The `fastdistil` command (also `python -m fastdistil`). Each subcommand lives in fastdistil/commands/<name>.py
with `add_parser(subparsers)` and `run(args) -> int`; this file lists them, holds the argument types they share,
and turns every failure into one line on stderr:

    exit 0  success            exit 1  an error, printed as `fastdistil COMMAND: error: MESSAGE`
    exit 2  a bad argument     exit 130  interrupted (Ctrl-C)

`--debug` (before the command or after it) or FASTDISTIL_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys

COMMANDS = ("info", "demo", "embed", "check_kernels", "bench", "model_perf", "distill", "gpu_check")


def int_at_least(low: int):
    """An argparse type: an integer >= low (a bad value is a one-line usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v
    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


_FORK_GUARD = []


def fork_safe_threads() -> None:
    """Give a forked child one intra-op thread. torch's OpenMP pool does not survive fork(): a child that runs a
    torch op after its parent already had hangs forever (seen with torch 2.13's GNU OpenMP); with one thread it
    never enters the pool. Idempotent; the CLI calls it, library users may too."""
    if not _FORK_GUARD and hasattr(os, "register_at_fork"):
        import torch
        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))
        _FORK_GUARD.append(True)


def _debug(argv) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get("FASTDISTIL_DEBUG", "") not in ("", "0") or "--debug" in argv


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdistil", description="Fused, padding-free runtime for small BERT "
                                     "encoders: inference and knowledge distillation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also FASTDISTIL_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"fastdistil.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"fastdistil.commands.{name}":
                raise
            continue
        p = mod.add_parser(sub)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); returns the exit status (see the module docstring)."""
    debug, command = _debug(argv), "fastdistil"
    try:
        parser = _parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse: --help (0) or a usage error (2), its message already printed
            return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        command = f"fastdistil {args.command}"
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        fork_safe_threads()
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if isinstance(e, (OSError, ValueError, TypeError, RuntimeError)):
            msg = str(e) or type(e).__name__
        else:  # not an error fastdistil raises on purpose: say so, the traceback is one flag away
            msg = f"{type(e).__name__}: {e} (unexpected; rerun with --debug for the traceback and report it)"
        print(f"{command}: error: " + " / ".join(ln.strip() for ln in msg.splitlines() if ln.strip()),
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
