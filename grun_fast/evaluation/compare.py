"""Compare several evaluation outputs in one table and one plot (forget quality vs model utility).

    grun-fast compare runs/base runs/retain runs/gd runs/gd_grun ... [--out DIR] [--baselines]

Each RUN is a folder written by ``grun-fast eval`` (or its eval.json). Writes comparison.md and
comparison.png to --out (default: the current folder) and prints the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="evaluation folders (or eval.json files)")
    parser.add_argument("--out", default=".", help="folder for comparison.md and comparison.png")
    parser.add_argument("--baselines", action="store_true",
                        help="also list each run's no-adapter baseline as its own row")


def collect_runs(paths: list[str], baselines: bool = False) -> list[dict]:
    from grun_fast.evaluation.report import load_run

    runs = []
    for path in paths:
        run = load_run(path)
        runs.append(run)
        if baselines and run.get("baseline"):
            meta = dict(run["meta"], label=f"{run['meta']['label']} (base)")
            runs.append({"meta": meta, "metrics": run["baseline"]})
    seen: dict[str, int] = {}
    for r in runs:  # distinct labels keep the table and the plot readable
        label = r["meta"]["label"]
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            r["meta"]["label"] = f"{label} ({seen[label]})"
    return runs


def run(args: argparse.Namespace) -> int:
    from grun_fast.errors import GRUNError
    from grun_fast.evaluation.report import comparison_markdown, plot_tradeoff, write_text

    try:
        runs = collect_runs(args.runs, args.baselines)
        table = comparison_markdown(runs)
        out = Path(args.out)
        written = [write_text(table, out / "comparison.md")]
    except GRUNError as e:
        print(f"grun-fast compare: error: {e}", file=sys.stderr)
        return 2
    print(table)
    try:
        written.append(plot_tradeoff(runs, out / "comparison.png"))
    except GRUNError as e:
        print(f"grun-fast compare: no plot: {e}", file=sys.stderr)
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0
