"""What moves TOFU forget quality (issue 12): one GRUN setting per row, on the tiny TOFU pipeline.

    python -m bench.forget_study --data ../shared/data/tofu --split forget01 --split forget05 --seeds 0,1,2

For each forget split: a tiny base model that memorised forget + retain + world-facts/real-authors rows and a
retain model that never saw the forget rows (both trained once, with seed 0, and cached like the demo's), then
for every setting and seed a GRUN adapter trained on the forget split (the seed varies the adapter's
initialisation and data order) and the TOFU evaluation of base + GRUN. Forget quality is the KS test of the
forget truth ratios against the retain model's; model utility the harmonic mean over retain, real authors and
world facts. Only the forget questions/answers and retain rows are trained on; paraphrased and perturbed
answers are scored, never trained on.

Appends one row per (split, setting, seed) to bench/results/forget_study.csv and rewrites
forget_study.md (medians over seeds) and forget_study.png (forget quality against model utility).
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_REPO = str(_Path(__file__).resolve().parents[1])
if _REPO not in _sys.path:  # `python bench/<script>.py` works too, not only `python -m bench.<script>`
    _sys.path.insert(0, _REPO)

import argparse
import datetime as dt
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from bench.forget_report import CSV, append, fmt, write_report
from bench.forget_settings import SETTINGS, split_setting

DEFAULT_RETAIN_ROWS = 80  # the demo's TOFU plan


def _say(message: str) -> None:
    print(message, flush=True)


def pipeline(data: str, split: str, cache: Path, retain_rows: int) -> dict[str, Any]:
    """Rows, base and retain models, and their evaluations for one forget split (models and evaluations
    cached, so several processes can run seeds side by side)."""
    from grun_fast.demo import Plan, build_data, cached_model

    plan = replace(Plan(), tofu_retain_rows=retain_rows)
    rows = build_data(data, plan, split)
    base, tokenizer = cached_model(cache, "base", rows["train_base"], plan)
    retain_model, _ = cached_model(cache, "retain", rows["train_retain"], plan, tokenizer=tokenizer)
    retain_eval = _cached_eval(cache, retain_model, "retain", split,
                               lambda: _evaluate(retain_model, tokenizer, rows["eval_splits"], None, plan))
    ratios = [r["truth_ratio"] for r in retain_eval["splits"]["forget"]["rows"]]
    base_eval = _cached_eval(cache, base, "base", split,
                             lambda: _evaluate(base, tokenizer, rows["eval_splits"], ratios, plan))
    return {"data": data, "plan": plan, "rows": rows, "base": base, "tokenizer": tokenizer, "retain_eval": retain_eval,
            "retain_ratios": ratios, "base_eval": base_eval}


def _evaluation_questions(pipe: dict[str, Any]) -> set[str]:
    """Every question some evaluation split of this pipeline scores."""
    return {r["question"] for rows in pipe["rows"]["eval_splits"].values() for r in rows}


def unseen_retain_rows(pipe: dict[str, Any], n: int) -> list[dict]:
    """``n`` TOFU retain90 rows (seeded) that no model here was trained on and no evaluation split holds: not in
    retain_perturbed (the retain evaluation's pool), so never an evaluation row."""
    if n <= 0:
        return []
    import random

    from grun_fast.data.loading import load_tofu

    held = {r["question"] for r in load_tofu("retain_perturbed", pipe["data"])} | _evaluation_questions(pipe)
    pool = [r for r in load_tofu("retain90", pipe["data"]) if r["question"] not in held]
    return random.Random(pipe["plan"].seed).sample(pool, min(n, len(pool)))


def negative_rows(pipe: dict[str, Any], spec: str, seed: int) -> list[dict]:
    """Extra retain rows for the gate to stay closed on, ``"kind:n"`` (seeded by the adapter's seed):
    ``shuffled``: questions and answers of words drawn from the forget and retain rows (the same words, no
    meaning); ``noise``: random token ids of the tokenizer; ``general``: TOFU world-facts/real-authors rows that
    no evaluation split holds and no model here was trained on (the "general text" a deployment's retain set
    would hold). None is an evaluation row."""
    import random

    kind, n = spec.split(":")
    rng, rows, out = random.Random(seed + 123), pipe["rows"], []
    if kind == "shuffled":
        words = [w for r in rows["retain"] + rows["forget"] for w in (r["question"] + " " + r["answer"]).split()]
        for _ in range(int(n)):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "?"
            out.append({"question": q, "answer": " ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) + "."})
    elif kind == "noise":
        tok = pipe["tokenizer"]
        for _ in range(int(n)):
            q, a = ([rng.randrange(len(tok)) for _ in range(rng.randint(lo, hi))] for lo, hi in ((6, 14), (6, 20)))
            out.append({"question": tok.decode(q, skip_special_tokens=True),
                        "answer": tok.decode(a, skip_special_tokens=True)})
    elif kind == "general":
        from grun_fast.data.loading import load_tofu

        held = _evaluation_questions(pipe)
        pool = [{"question": r["question"], "answer": r["answer"]} for k in ("world_facts", "real_authors")
                for r in load_tofu(k, pipe["data"]) if r["question"] not in held]
        out = rng.sample(pool, min(int(n), len(pool)))
    else:
        raise ValueError(f"unknown negatives {spec!r}")
    return out


def _cached_eval(cache: Path, model, role: str, split: str, compute) -> dict[str, Any]:
    """The evaluation of a model (keyed by a digest of its weights) on ``split``, computed once."""
    import hashlib
    import json

    from grun_fast.evaluation.report import write_json

    digest = hashlib.sha256(b"".join(p.detach().float().numpy().tobytes() for p in model.parameters())).hexdigest()
    path = cache / f"study-eval-{digest[:16]}-{split}-{role}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    write_json(result, path)
    return result


def _evaluate(model, tokenizer, splits, ratios, plan) -> dict[str, Any]:
    from grun_fast.evaluation import evaluate

    return evaluate(model, tokenizer, splits, retain_truth_ratios=ratios, batch_size=32,
                    max_new_tokens=plan.max_new_tokens, progress=False)


def _gate(split: dict) -> float | None:
    values = [v for layers in split["gate"].values() for v in layers.values()]
    return sum(values) / len(values) if values else None


def _utility_values(ev: dict[str, Any]) -> list[tuple[float, str]]:
    from grun_fast.evaluation.metrics import UTILITY_METRICS, UTILITY_SPLITS

    return [(ev["splits"][s][m], f"{s}/{m}") for s in UTILITY_SPLITS for m in UTILITY_METRICS
            if s in ev["splits"] and ev["splits"][s].get(m) is not None]


def _weakest(ev: dict[str, Any]) -> str | None:
    """The smallest of model utility's 9 numbers (it dominates their harmonic mean), e.g. 'world_facts/probability=0.31'."""
    values = _utility_values(ev)
    if not values:
        return None
    value, name = min(values)
    return f"{name}={value:.3f}"


def utility_parts(ev: dict[str, Any]) -> str:
    """All 9 numbers of model utility, e.g. 'retain/probability=0.97 ...' (printed with each run's summary)."""
    return " ".join(f"{name}={value:.3f}" for value, name in _utility_values(ev))


def log_truth_ratio_spread(split: dict[str, Any]) -> tuple[float | None, float | None]:
    """Median and standard deviation of a split's per-question log truth ratios (None without rows).

    Forget quality tests the whole distribution against the retain model's: an edited model can sit at its
    median (no preference left for the true answers) and still fail the test by spreading wider."""
    import numpy as np

    ratios = [r["truth_ratio"] for r in split.get("rows") or [] if r.get("truth_ratio") is not None]
    if not ratios:
        return None, None
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    return float(np.median(logs)), float(logs.std())


def summary(ev: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    forget, retain = ev["splits"]["forget"], ev["splits"]["retain"]
    nlls = [r["nll"] for r in forget.get("rows") or [] if r.get("nll") is not None]
    median, sd = log_truth_ratio_spread(forget)
    return {
        "forget_log_truth_ratio_median": median, "forget_log_truth_ratio_sd": sd,
        "forget_quality": (ev.get("forget_quality") or {}).get("forget"),
        "model_utility": ev.get("model_utility"),
        "forget_rouge_l": forget["rouge_l"], "retain_rouge_l": retain["rouge_l"],
        "paraphrased_rouge_l": forget["paraphrased_question"]["rouge_l"],
        "forget_truth_ratio": forget.get("truth_ratio"),
        "utility_weakest": _weakest(ev),
        "gate_forget": _gate(forget), "gate_retain": _gate(retain),
        "forget_nll": float(np.mean(nlls)) if nlls else None,   # the forget answers' mean token NLL
        "forget_leaks": (forget.get("leaks") or {}).get("count"),
        # reworded forget questions whose generation still carries the original answer (issue 12: <= 1 in 10)
        "paraphrased_leaks": (forget["paraphrased_question"].get("leaks") or {}).get("count"),
    }


def _format_gate_extremes(model, tokenizer, splits) -> dict[str, float]:
    """Under every prompt-format variant (grun-fast eval's format gates): the lowest mean gate on the forget
    questions and the highest on the retain questions."""
    from grun_fast.evaluation.formats import format_gates

    result = format_gates(model, tokenizer, {k: splits[k] for k in ("forget", "retain")})
    return {"format_gate_forget_min": min(v["gates"]["forget"] for v in result["variants"].values()),
            "format_gate_retain_max": max(v["gates"]["retain"] for v in result["variants"].values())}


def run_setting(pipe: dict[str, Any], split: str, name: str, seed: int, steps: int,
                also_thresholds: Sequence[float] = ()) -> list[dict[str, Any]]:
    """Train one adapter on the base, evaluate base + GRUN, take the adapter off again; one CSV row, and per
    value of ``also_thresholds`` one more for the same adapter deployed with that hard gate threshold (setting
    ``<name>+t<threshold>``): paired comparisons, free of training noise."""
    from grun_fast import patching
    from grun_fast.unlearn import unlearn
    from grun_fast.unlearn.config import MIN_DEFAULT_STEPS, UnlearnConfig
    from grun_fast.version import __version__

    study, overrides = split_setting(name)
    factor = study.get("steps_factor", 1)
    # deployed with a threshold the adapter was not trained with (deploy_threshold); else as trained
    threshold = study.get("deploy_threshold", overrides.get("gate_threshold"))
    base, rows = pipe["base"], pipe["rows"]
    retain = rows["retain"] + unseen_retain_rows(pipe, study.get("unseen_retain_rows", 0))
    if "negatives" in study:
        retain += negative_rows(pipe, study["negatives"], seed)
    if study.get("retain_suffixes"):
        from grun_fast.data import with_answer_suffixes

        retain = with_answer_suffixes(retain, study["retain_suffixes"], seed=seed)
    if study.get("v01_steps"):   # 0.1's default: 40 epochs, at least MIN_DEFAULT_STEPS (450 then and now)
        steps_v01 = UnlearnConfig(**{**overrides, "epochs": 40}).steps(len(rows["forget"]))
        overrides = {**overrides, "max_steps": max(steps_v01, MIN_DEFAULT_STEPS)}
    if study.get("library_defaults", False):
        result = unlearn(base, pipe["tokenizer"], rows["forget"], retain, seed=seed, progress=False,
                         adapter_name="study", **overrides)
    else:
        result = unlearn(base, pipe["tokenizer"], rows["forget"], retain, seed=seed,
                         max_steps=steps * factor, progress=False, adapter_name="study", **overrides)
    b = summary(pipe["base_eval"])
    out = []
    try:
        for label, t in [(name, threshold)] + [(f"{name}+t{t}", t) for t in also_thresholds]:
            # deployed with a hard threshold: tokens whose gate is below it are not edited
            patching.set_gate_threshold(base, t, "study")
            ev = _evaluate(base, pipe["tokenizer"], rows["eval_splits"], pipe["retain_ratios"], pipe["plan"])
            _say(f"      {label}, model utility's parts: {utility_parts(ev)}")
            drift = _format_gate_extremes(base, pipe["tokenizer"], rows["eval_splits"])
            setting = {**SETTINGS[name], **({"deploy_threshold": t} if t != overrides.get("gate_threshold") else {})}
            out.append({
                "split": split, "setting": label, "seed": seed, **summary(ev), **drift,
                "base_forget_quality": b["forget_quality"], "base_model_utility": b["model_utility"],
                "base_forget_rouge_l": b["forget_rouge_l"], "base_retain_rouge_l": b["retain_rouge_l"],
                "retain_model_utility": pipe["retain_eval"].get("model_utility"),
                "retain_model_log_truth_ratio_sd": log_truth_ratio_spread(pipe["retain_eval"]["splits"]["forget"])[1],
                "train_seconds": round(result.train_seconds, 1),
                "train_forget_nll": next((e["forget_nll"] for e in reversed(result.log_history) if "forget_nll" in e),
                                         None),
                "overrides": ";".join(f"{k}={v}" for k, v in {**setting, "steps": result.global_step}.items()),
                "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "version": __version__,
            })
    finally:
        patching.unpatch(base, "study")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("TOFU_DATA"), help="TOFU folder or locuslab/TOFU")
    p.add_argument("--split", action="append", help="forget split(s) (default forget01 and forget05)")
    p.add_argument("--settings", default="all", help=f"comma-separated, from: {', '.join(SETTINGS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=150, help="optimiser steps of each adapter (default: the demo's)")
    p.add_argument("--retain-rows", type=int, default=DEFAULT_RETAIN_ROWS,
                   help="retain rows (base training and GRUN's retain set; another number labels the split, "
                        "e.g. forget05/retain200)")
    p.add_argument("--cache", default=os.environ.get("GRUN_FAST_CACHE") or str(Path.home() / ".cache" / "grun_fast"))
    p.add_argument("--csv", default=str(CSV))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--also-threshold", type=float, metavar="T", nargs="+", default=[],
                   help="evaluate each adapter again with gate threshold T, for each T given (rows named "
                        "<setting>+tT)")
    p.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the CSV")
    args = p.parse_args(argv)
    path = Path(args.csv)
    if args.report_only:
        _say(f"wrote {', '.join(map(str, write_report(path)))}")
        return 0
    if not args.data:
        p.error("--data (or $TOFU_DATA) is required")
    names = list(SETTINGS) if args.settings == "all" else args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        family = unknown[0].split("/")[0]
        close = [s for s in SETTINGS if s == family or s.startswith(family + "/")][:5]
        p.error(f"unknown settings {unknown} ({len(SETTINGS)} exist, --help lists them; e.g. "
                f"{', '.join(close or ['default', 'default/general160'])})")
    from grun_fast.data.loading import load_tofu
    from grun_fast.demo import _check_writable

    splits = args.split or ["forget01", "forget05"]
    for name in names:   # bad input fails here, before the cache folder is made or any model trained
        split_setting(name)
    if args.also_threshold:
        from grun_fast.functional import check_threshold

        for t in args.also_threshold:
            check_threshold(t)
    for split in splits:
        load_tofu(split, args.data)
    _check_writable(Path(args.cache))  # a fresh machine has no cache yet
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    for split in splits:
        t0 = time.perf_counter()
        pipe = pipeline(args.data, split, Path(args.cache), args.retain_rows)
        b = summary(pipe["base_eval"])
        _say(f"{split}: base FQ {fmt(b['forget_quality'])} MU {fmt(b['model_utility'])} forget ROUGE "
             f"{fmt(b['forget_rouge_l'])} retain ROUGE {fmt(b['retain_rouge_l'])}; retain model MU "
             f"{fmt(pipe['retain_eval'].get('model_utility'))} ({time.perf_counter() - t0:.0f} s)")
        # rows of a pipeline with another number of retain rows are their own group: "forget05/retain200"
        label = split if args.retain_rows == DEFAULT_RETAIN_ROWS else f"{split}/retain{args.retain_rows}"
        for name in names:
            for seed in seeds:
                t0 = time.perf_counter()
                for row in run_setting(pipe, label, name, seed, args.steps, args.also_threshold):
                    append(row, path)
                    _say(f"  {label} {row['setting']:14s} seed {seed}: FQ {fmt(row['forget_quality'])} MU "
                         f"{fmt(row['model_utility'])} forget {fmt(row['forget_rouge_l'])} retain "
                         f"{fmt(row['retain_rouge_l'])} gates {fmt(row['gate_forget'])}/"
                         f"{fmt(row['gate_retain'])} ({time.perf_counter() - t0:.0f} s)")
        write_report(path)
    _say(f"wrote {path} and its .md/.png")
    return 0


if __name__ == "__main__":
    from grun_fast.errors import GRUNError

    try:
        raise SystemExit(main())
    except GRUNError as error:   # bad input: one line naming it, exit 2, as the CLI does
        print(f"forget_study: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
