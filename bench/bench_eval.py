"""Evaluation scoring: batched (length-sorted, right-padded) vs one row at a time, side by side.

Scores every teacher-forced sequence the TOFU protocol needs for a 400-question forget split (answer,
paraphrased answer, 5 perturbed answers, answer after the paraphrased question: 3,200 sequences) on a tiny
Llama with a GRUN adapter, with `grun_fast.evaluation.scoring.answer_nll` at batch size B and at batch size 1,
interleaved, median of several runs. Also reports the share of the batched time spent inside the model's
forward (the rest is tokenisation, padding and bookkeeping) and checks both give the same numbers.

    python -m bench.bench_eval                       # TOFU forget10 ($GRUN_TOFU_DIR or ../shared/data/tofu)
    python -m bench.bench_eval --repeats 5 --batch-size 32 --threads 0
Appends rows to bench/results/results.csv.
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_REPO = str(_Path(__file__).resolve().parents[1])
if _REPO not in _sys.path:  # `python bench/<script>.py` works too, not only `python -m bench.<script>`
    _sys.path.insert(0, _REPO)

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

import grun_fast
from bench.common import append_rows, device_name, load_average, now, quantiles, time_interleaved
from grun_fast.evaluation.scoring import answer_nll, gate_modules
from grun_fast.testing import make_tiny_tokenizer, tiny_llama

REPO = Path(__file__).resolve().parents[1]


def load_rows(split: str) -> tuple[list[dict], str]:
    tofu = Path(os.environ.get("GRUN_TOFU_DIR", REPO.parent / "shared" / "data" / "tofu"))
    if (tofu / f"{split}_perturbed.json").is_file():
        from grun_fast.evaluation.splits import tofu_eval_splits

        return tofu_eval_splits(tofu, split, utility=False)[split], f"tofu:{split}"
    from grun_fast.data.synthetic import make_authors

    return make_authors(40, 10), "synthetic:40x10"


def scoring_jobs(rows: list[dict]) -> list[dict]:
    """The (question, answer) pairs `evaluate` scores on a forget split."""
    jobs = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    jobs += [{"question": r["question"], "answer": r["paraphrased_answer"]} for r in rows]
    jobs += [{"question": r["question"], "answer": a} for r in rows for a in r["perturbed_answer"]]
    jobs += [{"question": r["paraphrased_question"], "answer": r["answer"]} for r in rows]
    return jobs


class ForwardTimer:
    """Wraps model.forward to add up the seconds spent inside it."""

    def __init__(self, model):
        self.model, self.seconds, self._forward = model, 0.0, model.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._forward(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        model.forward = timed

    def close(self):
        self.model.forward = self._forward


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="forget10")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU, multi-threaded timings of small ops "
                             "measure OpenMP contention more than the code; 0 keeps torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows, source = load_rows(args.split)
    jobs = scoring_jobs(rows)
    texts = [f"Question: {j['question']}\nAnswer: {j['answer']}" for j in jobs]
    tokenizer = make_tiny_tokenizer(texts, vocab_size=1500)
    model = tiny_llama(tokenizer, hidden_size=args.hidden, num_layers=args.layers).eval()
    adapter_layers = [args.layers // 2, args.layers - 1]
    grun_fast.patch(model, grun_fast.GRUNConfig(layers=adapter_layers))
    gates = gate_modules(model)

    results = {}

    def batched():
        results["batched"] = answer_nll(model, tokenizer, jobs, batch_size=args.batch_size, gates=gates)

    def one_by_one():
        results["one_by_one"] = answer_nll(model, tokenizer, jobs, batch_size=1, gates=gates)

    samples = time_interleaved({"batched": batched, "one_by_one": one_by_one}, args.repeats, warmup=1)
    np.testing.assert_allclose(results["batched"][0], results["one_by_one"][0], rtol=1e-4)
    for layer, values in results["batched"][1]["default"].items():
        np.testing.assert_allclose(values, results["one_by_one"][1]["default"][layer], rtol=1e-4, atol=1e-6)

    timer = ForwardTimer(model)  # one extra batched run, instrumented, for the share of time in the model
    start = time.perf_counter()
    batched()
    total = time.perf_counter() - start
    timer.close()
    share = timer.seconds / total

    b, o = quantiles(samples["batched"]), quantiles(samples["one_by_one"])
    ratio = o[0] / b[0]
    device = device_name("cpu")
    config = (f"{source} {len(rows)} questions {len(jobs)} sequences; llama d{args.hidden} L{args.layers} "
              f"vocab {len(tokenizer)}; grun layers {adapter_layers}; repeats {args.repeats}")
    base = dict(op="eval_scoring", mode=args.split, rows=len(jobs), d=args.hidden, dtype="fp32", device=device,
                date=now(), config=config, load=load_average())
    csv_rows = [
        dict(base, provider="batched", median=b[0], p20=b[1], p80=b[2], unit="s", batch=args.batch_size),
        dict(base, provider="one_by_one", median=o[0], p20=o[1], p80=o[2], unit="s", batch=1),
        dict(base, provider="speedup", median=ratio, unit="x", batch=args.batch_size),
        dict(base, provider="batched_model_share", median=share, unit="fraction", batch=args.batch_size),
    ]
    path = append_rows(csv_rows)
    print(f"{config}\n{device}")
    print(f"batched (B={args.batch_size}): median {b[0]:.2f} s (p20 {b[1]:.2f}, p80 {b[2]:.2f})")
    print(f"one by one:       median {o[0]:.2f} s (p20 {o[1]:.2f}, p80 {o[2]:.2f})")
    print(f"speedup {ratio:.1f}x; share of batched time inside model forward {share:.0%}")
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
