"""Evaluation of a 400-question split: batched vs one row at a time, side by side.

Runs `grun_fast.evaluation.evaluate` on a TOFU forget split (forget10: 400 questions, i.e. 3,200 teacher-forced
sequences -- answer, paraphrased answer, 5 perturbed answers, answer after the paraphrased question -- and 800
greedy generations for ROUGE-L) with batch size B and with batch size 1, interleaved, median of several rounds.
The model is GRUN.md section 8's tiny one (Llama d128, 4 layers, 4 heads, a 1,500-token BPE) with a GRUN adapter
at layers 2 and 3, first trained for a few epochs on the split so that its generations end with EOS at
realistic lengths (a random model would run every generation to the token limit, which favours batching).

Reports the whole evaluation and its two parts (scoring: `answer_nll`; generation: `generate` + ROUGE inputs),
and the share of the batched run spent in model compute (backbone, LM head and the answer-head NLL); checks
that both batch sizes give the same generations and the same scores.

    python -m bench.bench_eval                       # TOFU forget10 ($GRUN_TOFU_DIR or ../shared/data/tofu)
    python -m bench.bench_eval --repeats 5 --batch-size 32 --threads 1
Appends rows to bench/results/results.csv (op eval_split; modes evaluate, scoring, generation).
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_REPO = str(_Path(__file__).resolve().parents[1])
if _REPO not in _sys.path:  # `python bench/<script>.py` works too, not only `python -m bench.<script>`
    _sys.path.insert(0, _REPO)

import argparse
import contextlib
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import grun_fast
from bench.common import append_rows, device_name, load_average, now, quantiles, time_interleaved
from grun_fast.architectures import locate
from grun_fast.evaluation import scoring, tofu
from grun_fast.evaluation.tofu import evaluate
from grun_fast.testing import train_tiny_base

REPO = Path(__file__).resolve().parents[1]
_CLASS_ATTR = object()
PARTS = {"scoring": (tofu, "answer_nll"), "generation": (tofu, "generate")}


def load_rows(split: str) -> tuple[list[dict], str]:
    tofu_dir = Path(os.environ.get("GRUN_TOFU_DIR", REPO.parent / "shared" / "data" / "tofu"))
    if (tofu_dir / f"{split}_perturbed.json").is_file():
        from grun_fast.evaluation.splits import tofu_eval_splits

        return tofu_eval_splits(tofu_dir, split, utility=False)[split], f"tofu:{split}"
    from grun_fast.data.synthetic import make_authors

    return make_authors(40, 10), "synthetic:40x10"


class Stopwatch:
    """Adds up the seconds spent inside chosen callables (``(owner, attribute)`` pairs, one bucket each)."""

    def __init__(self, targets: dict[str, list[tuple[object, str]]]):
        self.targets = targets
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def running(self):
        saved = []
        try:
            for bucket, pairs in self.targets.items():
                for owner, attr in pairs:
                    saved.append((owner, attr, vars(owner).get(attr, _CLASS_ATTR)))
                    setattr(owner, attr, self._timed(bucket, getattr(owner, attr)))
            yield self
        finally:
            for owner, attr, own in reversed(saved):
                if own is _CLASS_ATTR:
                    delattr(owner, attr)      # an instance's forward: the class's method shows through again
                else:
                    setattr(owner, attr, own)

    def _timed(self, bucket: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[bucket] += time.perf_counter() - start
        return timed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="forget10")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20,
                        help="base-model training epochs on the split (0: random weights; every generation then "
                             "runs to --max-new-tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, every core)")


def measure(args: argparse.Namespace) -> tuple[list[dict], str]:
    """Train the tiny model, time both batch sizes; (CSV rows, the printed summary)."""
    rows, source = load_rows(args.split)
    model, tokenizer = train_tiny_base(rows, hidden_size=args.hidden, num_layers=args.layers, epochs=args.epochs,
                                       stop_loss=0.0, progress=True, desc="tiny base on the split")
    adapter_layers = sorted({args.layers // 2, args.layers - 1})
    grun_fast.patch(model, grun_fast.GRUNConfig(layers=adapter_layers))
    backbone = locate(model)[0]
    model_parts = [(backbone, "forward"), (model.get_output_embeddings(), "forward"), (scoring, "head_nll")]

    results: dict[str, dict] = {}
    parts: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in ("batched", "one_by_one")}

    def run(name: str, batch_size: int):
        watch = Stopwatch({**{k: [v] for k, v in PARTS.items()}, "model": model_parts})
        start = time.perf_counter()
        with watch.running():
            results[name] = evaluate(model, tokenizer, {args.split: rows}, batch_size=batch_size,
                                     max_new_tokens=args.max_new_tokens, progress=False)
        total = time.perf_counter() - start
        for bucket, seconds in watch.seconds.items():
            parts[name][bucket].append(seconds)
        parts[name]["model_share"].append(watch.seconds["model"] / total)

    for batch_size in (args.batch_size, 1):   # warm-up: first-call costs (allocator, tokenizer, kernels) off the clock
        evaluate(model, tokenizer, {args.split: rows[:8]}, batch_size=batch_size,
                 max_new_tokens=args.max_new_tokens, progress=False)
    samples = time_interleaved({"batched": lambda: run("batched", args.batch_size),
                                "one_by_one": lambda: run("one_by_one", 1)}, args.repeats, warmup=0)
    a, b = (results[k]["splits"][args.split]["rows"] for k in ("batched", "one_by_one"))
    assert [r["generation"] for r in a] == [r["generation"] for r in b], "batched generations differ"
    for key in ("nll", "paraphrased_nll", "truth_ratio"):
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=1e-4, err_msg=key)
    new_tokens = [len(tokenizer(r["generation"], add_special_tokens=False)["input_ids"]) for r in a]

    device = device_name("cpu")
    n_seq = len(rows) * (3 + len(rows[0]["perturbed_answer"]))
    config = (f"{source} {len(rows)} questions ({n_seq} scored sequences, {2 * len(rows)} generations of <= "
              f"{args.max_new_tokens} tokens, mean {np.mean(new_tokens):.0f}); llama d{args.hidden} L{args.layers} "
              f"vocab {len(tokenizer)} trained {args.epochs} epochs; grun layers {adapter_layers}; "
              f"batch {args.batch_size} vs 1; repeats {args.repeats}")
    base = dict(op="eval_split", rows=len(rows), d=args.hidden, dtype="fp32", device=device, date=now(),
                config=config, load=load_average())
    csv_rows, lines = [], []
    for mode in ("evaluate", "scoring", "generation"):
        b_s, o_s = (samples["batched"], samples["one_by_one"]) if mode == "evaluate" else \
            (parts["batched"][mode], parts["one_by_one"][mode])
        bq, oq = quantiles(b_s), quantiles(o_s)
        ratio = oq[0] / bq[0]
        per_round = quantiles([o / b for o, b in zip(o_s, b_s)])    # rounds were interleaved: pair them
        csv_rows += [dict(base, mode=mode, provider="batched", median=bq[0], p20=bq[1], p80=bq[2], unit="s",
                          batch=args.batch_size),
                     dict(base, mode=mode, provider="one_by_one", median=oq[0], p20=oq[1], p80=oq[2], unit="s",
                          batch=1),
                     dict(base, mode=mode, provider="speedup", median=ratio, p20=per_round[1], p80=per_round[2],
                          unit="x", batch=args.batch_size)]
        lines.append(f"{mode:>10}: batched (B={args.batch_size}) {bq[0]:7.2f} s, one by one {oq[0]:7.2f} s, "
                     f"speedup {ratio:.1f}x (per round p20 {per_round[1]:.1f}, p80 {per_round[2]:.1f})")
    share = quantiles(parts["batched"]["model_share"])
    csv_rows.append(dict(base, mode="evaluate", provider="batched_model_share", median=share[0], p20=share[1],
                         p80=share[2], unit="fraction", batch=args.batch_size))
    summary = "\n".join([config, device, *lines,
                          f"share of the batched evaluation inside model compute: {share[0]:.0%}"])
    return csv_rows, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    csv_rows, summary = measure(args)
    path = append_rows(csv_rows)
    print(summary)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
