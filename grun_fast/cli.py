"""The `grun-fast` command: a thin dispatcher over the modules that implement each subcommand.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`; its docstring's first line
is the help text. Modules are imported only when their subcommand runs, so `grun-fast --help` is quick.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("grun_fast.demo", "train and evaluate GRUN end to end on built-in data (start here)"),
    "unlearn": ("grun_fast.unlearn.command", "train a GRUN adapter (gated GD, NPO, IDK or RMU)"),
    "eval": ("grun_fast.evaluation.command", "evaluate a model (+ adapter) with the TOFU protocol"),
    "compare": ("grun_fast.evaluation.compare", "one table and plot over several evaluation outputs"),
    "serve": ("grun_fast.serve", "serve a model with adapters over an OpenAI-compatible API (per-request adapters)"),
    "bench": ("grun_fast.bench_command", "run the benchmark suite and write CSV, plots and a table"),
}


def _load(name: str):
    module_name = SUBCOMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="grun-fast", description="Fast GRUN unlearning for Hugging Face causal LMs")
    from grun_fast.version import __version__

    parser.add_argument("--version", action="version", version=f"grun_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = _load(name)
            if module is not None:
                module.add_arguments(sub_parser)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = _load(args.command)
    if module is None:
        print(f"grun-fast {args.command}: not yet available in this version", file=sys.stderr)
        return 2
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from grun_fast.errors import GRUNError

    try:
        return int(module.run(args) or 0)
    except GRUNError as error:  # bad input: one line naming it, exit 2, for every command
        print(f"grun-fast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
