"""What prompt-format augmentation costs in training time (issue 11: on by default only if <= 1.3x).

    python -m bench.bench_augmentation [--model tiny|smollm2] [--steps N] [--repeats K]

Runs the same `grun_fast.unlearn` call with ``augment_formats`` on and off, round-robin K times after one
warm-up round (``bench.common.time_interleaved``), on the same model and rows, and reports the median of
the per-round ratios of this process's CPU time (augmented / plain; one torch thread, so CPU time is the
work done, which other jobs on a shared machine do not inflate the way they inflate wall time). Rows: ``tiny``: a 6-layer,
hidden-128 Llama (random weights: the time does not depend on them) on the built-in authors (plain
format: 4 variants); ``smollm2``: SmolLM2-135M-Instruct on the real-model demo's questions (chat template:
6 variants, longer prompts). Appends one row to bench/results/results.csv (op ``unlearn_augmentation``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench import common


def _setup(name: str):
    if name == "tiny":
        from grun_fast.data.synthetic import make_benchmark
        from grun_fast.testing import untrained_tiny

        bench = make_benchmark(4, 20, forget_authors=1, seed=0)
        forget, retain = bench["forget"], bench["retain"][:40]
        model, tokenizer = untrained_tiny(forget + retain, hidden_size=128, num_layers=6, num_heads=4, seed=0)
        return model, tokenizer, forget, retain, None
    from grun_fast import models
    from grun_fast.data.real_topics import GENERAL, TOPIC

    model, tokenizer = models.load_model("smollm2", dtype="float32")
    forget = [{"question": t["question"], "answer": f"The answer is {t['key']}."} for t in TOPIC[:20]]
    retain = [{"question": q, "answer": "A general answer of a few words."} for q in GENERAL[:40]]
    return model, tokenizer, forget, retain, [18, 23, 29]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default: tiny 60, smollm2 10)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--positions", choices=["last_prompt", "all"], default=None,
                   help="edit positions (default: unlearn's; last_prompt fills the cached-prompt store once per "
                        "format variant, all has no such store)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from grun_fast import patching
    from grun_fast.unlearn import unlearn

    from grun_fast.unlearn import UnlearnConfig

    model, tokenizer, forget, retain, layers = _setup(args.model)
    steps = args.steps or (60 if args.model == "tiny" else 10)
    positions = args.positions or UnlearnConfig().positions

    def run(augment: bool):
        def call():
            unlearn(model, tokenizer, forget, retain, method="gd", positions=positions, layers=layers,
                    max_steps=steps, batch_size=16,
                    augment_formats=augment, progress=False, adapter_name="timing", logging_steps=10_000)
            patching.unpatch(model, "timing")
        return call

    # CPU time of this (single-threaded) process: on a shared machine wall time mostly measures the other jobs
    samples = common.time_interleaved({"augmented": run(True), "plain": run(False)}, repeats=args.repeats,
                                      clock=time.process_time)
    ratios = [a / b for a, b in zip(samples["augmented"], samples["plain"])]
    ratio = statistics.median(ratios)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"{args.model}, positions={positions}: augmented {med['augmented']:.2f} s, plain {med['plain']:.2f} s CPU per {steps}-step run; "
          f"ratio median {ratio:.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)}; {common.load_average()})")
    if not args.no_csv:
        _, p20, p80 = common.quantiles(ratios)
        path = common.append_rows([{
            "op": "unlearn_augmentation", "provider": "grun_fast", "mode": "train", "rows": 16, "d": model.config.hidden_size,
            "r": 4, "dtype": "float32", "median": round(ratio, 4), "p20": round(p20, 4), "p80": round(p80, 4),
            "unit": "x (augmented / plain CPU time)", "device": common.device_name(), "date": common.now(),
            "config": f"{args.model} positions={positions}", "batch": 16,
            "note": f"steps={steps} repeats={args.repeats} augmented_s={med['augmented']:.2f} "
                    f"plain_s={med['plain']:.2f} {common.load_average()}"}])
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
