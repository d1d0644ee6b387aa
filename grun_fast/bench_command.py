"""run the benchmark suite (op level, serving, training) and write CSV, plots and a Markdown table

`grun-fast bench` runs `bench/suite.py` of the repository this package was installed from (editable
install): the benchmarks live in the repository, not in the installed package, since they need the
reference stack's files and write their results next to them.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from grun_fast.errors import GRUNError

REPO = Path(__file__).resolve().parents[1]


def repository() -> Path:
    """The checkout holding bench/ (the package's parent folder in an editable install)."""
    if not (REPO / "bench" / "suite.py").is_file():
        raise GRUNError(
            f"grun-fast bench needs the grun_fast repository's bench/ folder, which is not next to the installed "
            f"package ({REPO}). Install from a checkout with `pip install -e .` and run it there, or run "
            f"`python -m bench` from the repository root."
        )
    return REPO


def _suite():
    root = str(repository())
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module("bench.suite")
    if not str(Path(module.__file__).resolve()).startswith(root):
        raise GRUNError(f"`bench` resolves to {module.__file__}, not to the repository's bench/ in {root}")
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        _suite().add_arguments(parser)
    except GRUNError as err:  # --help still works; run() reports the problem
        parser.epilog = str(err)


def run(args: argparse.Namespace) -> int:
    try:
        suite = _suite()
    except GRUNError as err:
        print(f"grun-fast bench: {err}", file=sys.stderr)
        return 2
    return suite.run(args)
