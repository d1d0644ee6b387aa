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

import argparse
import csv
import datetime as dt
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CSV = RESULTS / "forget_study.csv"
DEFAULT_RETAIN_ROWS = 80  # the demo's TOFU plan
FIELDS = ["split", "setting", "seed", "forget_quality", "model_utility", "forget_rouge_l", "retain_rouge_l",
          "paraphrased_rouge_l", "forget_truth_ratio", "gate_forget", "gate_retain", "forget_leaks",
          "base_forget_quality", "base_model_utility", "base_forget_rouge_l", "base_retain_rouge_l",
          "retain_model_utility", "train_seconds", "overrides", "date", "version", "utility_weakest",
          "format_gate_forget_min", "format_gate_retain_max", "forget_log_truth_ratio_median",
          "forget_log_truth_ratio_sd", "retain_model_log_truth_ratio_sd", "forget_nll", "train_forget_nll",
          "paraphrased_leaks"]

# NPO at every token for 120 epochs (1500 steps on forget05): the base of the gate-negative settings below
NPO_ALL_120EP: dict[str, Any] = {"library_defaults": True, "method": "npo", "positions": "all", "epochs": 120}


def npo_steps(steps: int, **overrides: Any) -> dict[str, Any]:
    """NPO at every token for a fixed number of steps, rank 64, 80 general rows: the base of the suffix settings."""
    return {**NPO_ALL_120EP, "epochs": None, "max_steps": steps, "rank": 64, "negatives": "general:80", **overrides}


# Each setting: UnlearnConfig overrides on top of `grun-fast unlearn`'s 0.1 defaults (V01_DEFAULTS, below), plus
# the plan's steps.
SETTINGS: dict[str, dict[str, Any]] = {
    # `grun-fast unlearn` as a user got it before version 0.2.0 (V01_DEFAULTS), its own epochs (no --steps)
    "v0.1-default": {"library_defaults": True},
    # NPO at every token with the library's epochs (40: 80 steps on forget01, 500 on forget05) and variants
    "npo/all/40ep": {"library_defaults": True, "method": "npo", "positions": "all"},
    "npo/all/40ep/retain5": {"library_defaults": True, "method": "npo", "positions": "all", "lambda_r": 5.0},
    "npo/all/40ep/gate30": {"library_defaults": True, "method": "npo", "positions": "all", "lambda_g": 30.0},
    "npo/all/40ep/retain5/gate30": {"library_defaults": True, "method": "npo", "positions": "all", "lambda_r": 5.0,
                                    "lambda_g": 30.0},
    "npo/all/120ep": {"library_defaults": True, "method": "npo", "positions": "all", "epochs": 120},
    "npo/all/120ep/t0.5": {"library_defaults": True, "method": "npo", "positions": "all", "epochs": 120,
                           "deploy_threshold": 0.5},
    "npo/all/120ep/retain5": {"library_defaults": True, "method": "npo", "positions": "all", "epochs": 120,
                              "lambda_r": 5.0},
    # the defaults with 200 more retain rows that neither model was trained on (TOFU retain90 rows outside the
    # evaluation's retain_perturbed): more varied questions for the gate to stay closed on; the retain term only
    # asks the edit not to change the base's answers to them
    "v0.1-default/unseen-retain200": {"library_defaults": True, "unseen_retain_rows": 200},
    # gate negatives: 80 more retain rows unlike the forget rows, for the gate to stay closed on (`negatives`,
    # see negative_rows); "general" rows are world-facts/real-authors rows outside the evaluation's
    "v0.1-default/shuffled80": {"library_defaults": True, "negatives": "shuffled:80"},
    "v0.1-default/noise80": {"library_defaults": True, "negatives": "noise:80"},
    "v0.1-default/general80": {"library_defaults": True, "negatives": "general:80"},
    "npo/all/120ep/shuffled80": {**NPO_ALL_120EP, "negatives": "shuffled:80"},
    "npo/all/120ep/noise80": {**NPO_ALL_120EP, "negatives": "noise:80"},
    "npo/all/120ep/general80": {**NPO_ALL_120EP, "negatives": "general:80"},
    "npo/all/120ep/general160": {**NPO_ALL_120EP, "negatives": "general:160"},
    "npo/all/120ep/general80/rank16": {**NPO_ALL_120EP, "rank": 16, "negatives": "general:80"},
    "npo/all/120ep/general80/rank64": {**NPO_ALL_120EP, "rank": 64, "negatives": "general:80"},
    "npo/all/160ep/general80/rank64": {**NPO_ALL_120EP, "epochs": 160, "rank": 64, "negatives": "general:80"},
    "npo/all/240ep/general80/rank64": {**NPO_ALL_120EP, "epochs": 240, "rank": 64, "negatives": "general:80"},
    # NPO's pull fades once the forget answer is far below the reference (beta * excess NLL >> 1); a lower beta
    # keeps it pulling for longer
    "npo/all/160ep/general80/rank64/beta0.02": {**NPO_ALL_120EP, "epochs": 160, "rank": 64, "negatives": "general:80",
                                                "beta": 0.02},
    # the forget rows plus answer suffixes (UnlearnConfig.answer_suffixes), first also training the gate
    # (suffix_gate True): 1 each, 2000 steps over twice the rows
    "npo/2000steps/general80/rank64/suffix1": npo_steps(2000, answer_suffixes=1, suffix_gate=True),
    "npo/3000steps/general80/rank64/suffix3": npo_steps(3000, answer_suffixes=3, suffix_gate=True),
    # the same suffixes on the retain rows (1 each, `retain_suffixes`): fragment-start answers the gate must stay
    # shut on, so that "the answer starts mid-sentence" is no cue for it to open
    "npo/2000steps/general80/rank64/suffix1/retainsuffix1": npo_steps(2000, answer_suffixes=1, suffix_gate=True,
                                                                      retain_suffixes=1),
    "npo/3000steps/general80/rank64/suffix3/retainsuffix1": npo_steps(3000, answer_suffixes=3, suffix_gate=True,
                                                                      retain_suffixes=1),
    # deployed with a hard gate threshold of 0.5 (the edit off where the gate is below it; `--also-threshold 0.5`
    # measures this on the same adapter as the setting without it)
    "npo/3000steps/general80/rank64/suffix3/t0.5": npo_steps(3000, answer_suffixes=3, suffix_gate=True,
                                                             deploy_threshold=0.5),
    # 3 suffixes with a heavier retain term, or a lighter NPO push (the library's forget_scale for npo is 10)
    "npo/3000steps/general80/rank64/suffix3/retain3": npo_steps(3000, answer_suffixes=3, suffix_gate=True,
                                                                lambda_r=3.0),
    "npo/3000steps/general80/rank64/suffix3/retain5": npo_steps(3000, answer_suffixes=3, suffix_gate=True,
                                                                lambda_r=5.0),
    "npo/3000steps/general80/rank64/suffix3/scale3": npo_steps(3000, answer_suffixes=3, suffix_gate=True,
                                                               forget_scale=3.0),
    "npo/3000steps/general160/rank64/suffix1": npo_steps(3000, negatives="general:160", answer_suffixes=1,
                                                         suffix_gate=True),
    # the suffix rows through the edit loss only (suffix_gate False, the library's default): the gate learns from
    # whole rows, as without suffixes, for fewer general answers that open it
    "npo/3000steps/general80/rank64/suffix3/editonly": npo_steps(3000, answer_suffixes=3, suffix_gate=False),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3": npo_steps(3000, answer_suffixes=3, suffix_gate=False,
                                                                         lambda_r=3.0),
    "npo/3000steps/general80/rank64/suffix2/editonly/retain3": npo_steps(3000, answer_suffixes=2, suffix_gate=False,
                                                                         lambda_r=3.0),
    "npo/3000steps/general80/rank64/suffix6/editonly/retain3": npo_steps(3000, answer_suffixes=6, suffix_gate=False,
                                                                         lambda_r=3.0),
    "npo/4000steps/general80/rank64/suffix3/editonly/retain3": npo_steps(4000, answer_suffixes=3, suffix_gate=False,
                                                                         lambda_r=3.0),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain2": npo_steps(3000, answer_suffixes=3, suffix_gate=False,
                                                                         lambda_r=2.0),
    # SimNPO (mean token NLL, no reference) at the best NPO point: its push fades once an answer's mean token NLL
    # passes a few nats, where NPO's summed-NLL push carries on; the NPO point's forget truth ratios spread
    # twice as wide as the retain model's (seed 0, log ratios: sd 1.02 against 0.52)
    "simnpo/3000steps/general80/rank64/suffix3/editonly/retain3": npo_steps(
        3000, method="simnpo", answer_suffixes=3, suffix_gate=False, lambda_r=3.0),
    # its push fades later with a lower beta (at beta 2.5 the ratios stayed narrow but kept preferring the truth)
    "simnpo/3000steps/general80/rank64/suffix3/editonly/retain3/beta1": npo_steps(
        3000, method="simnpo", answer_suffixes=3, suffix_gate=False, lambda_r=3.0, beta=1.0),
    # beta 1 reached forget quality 0.47 at model utility 0.81 (seed 0; weakest part: the retain truth ratio): the
    # retain rows' whole next-token distributions held too (retain_kl 0.3 raised NPO's utility by 0.03 at seed 0),
    # or more answer suffixes (6 raised it by ~0.01 at the NPO point)
    "simnpo/3000steps/general80/rank64/suffix3/editonly/retain3/beta1/kl0.3": npo_steps(
        3000, method="simnpo", answer_suffixes=3, suffix_gate=False, lambda_r=3.0, beta=1.0, retain_kl=0.3),
    "simnpo/3000steps/general80/rank64/suffix6/editonly/retain3/beta1": npo_steps(
        3000, method="simnpo", answer_suffixes=6, suffix_gate=False, lambda_r=3.0, beta=1.0),
    # deployed with threshold 0.5 (--also-threshold 0.5) beta 1 met every target but the retain answers' (seeds
    # 0-2, ROUGE-L 0.837 against the base's 0.893): the threshold removes small edits the soft-trained adapter
    # relies on. Trained with the threshold (UnlearnConfig.gate_threshold), the edit learns without them
    "simnpo/3000steps/general80/rank64/suffix3/editonly/retain3/beta1/trained-t0.5": npo_steps(
        3000, method="simnpo", answer_suffixes=3, suffix_gate=False, lambda_r=3.0, beta=1.0, gate_threshold=0.5),
    # a heavier retain term for the retain answers that deployment at 0.5 costs (0.006 ROUGE-L short at retain 3)
    "simnpo/3000steps/general80/rank64/suffix3/editonly/retain4/beta1": npo_steps(
        3000, method="simnpo", answer_suffixes=3, suffix_gate=False, lambda_r=4.0, beta=1.0),
    # at 0.5 retain weight 4 lost model utility on the general questions (world facts), where the gate opens
    # part-way: twice the general rows for it to stay shut on, or training at a lower threshold (0.3) so that
    # deployment at 0.5 removes fewer edits the adapter relies on
    "simnpo/3000steps/general160/rank64/suffix3/editonly/retain4/beta1": npo_steps(
        3000, method="simnpo", negatives="general:160", answer_suffixes=3, suffix_gate=False, lambda_r=4.0, beta=1.0),
    "simnpo/3000steps/general80/rank64/suffix3/editonly/retain4/beta1/trained-t0.3": npo_steps(
        3000, method="simnpo", answer_suffixes=3, suffix_gate=False, lambda_r=4.0, beta=1.0, gate_threshold=0.3),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3/gate20": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, lambda_g=20.0),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3/layers2-5": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, layers=[2, 3, 4, 5]),
    # the retain rows' whole next-token distributions held at the frozen model's (retain_kl), not only their answers
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3/kl3": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, retain_kl=3.0),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3/kl1": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, retain_kl=1.0),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3/kl0.3": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, retain_kl=0.3),
    "npo/3000steps/general80/rank64/suffix3/editonly/retain3/layers2-5/kl1": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, layers=[2, 3, 4, 5], retain_kl=1.0),
    "npo/3000steps/general80/rank96/suffix3/editonly/retain3": npo_steps(
        3000, answer_suffixes=3, suffix_gate=False, lambda_r=3.0, rank=96),
    # a gate loss weighted 3x (lambda_g 30): a sharper gate, for fewer world-facts questions that open it
    "npo/all/160ep/general80/rank64/gate30": {**NPO_ALL_120EP, "epochs": 160, "rank": 64, "negatives": "general:80",
                                              "lambda_g": 30.0},
    "npo/all/120ep/general160/rank64": {**NPO_ALL_120EP, "rank": 64, "negatives": "general:160"},
    "npo/all/120ep/general160/rank128": {**NPO_ALL_120EP, "rank": 128, "negatives": "general:160"},
    "npo/all/120ep/general160/rank16": {**NPO_ALL_120EP, "rank": 16, "negatives": "general:160"},
    "gd": {"method": "gd", "positions": "last_prompt"},
    "npo": {"method": "npo", "positions": "last_prompt"},
    "simnpo": {"method": "simnpo", "positions": "last_prompt"},
    "idk": {"method": "idk", "positions": "last_prompt"},
    "rmu": {"method": "rmu", "positions": "last_prompt"},
    "gd/all": {"method": "gd", "positions": "all"},
    "npo/all": {"method": "npo", "positions": "all"},
    "simnpo/all": {"method": "simnpo", "positions": "all"},
    "idk/all": {"method": "idk", "positions": "all"},
    # around the first point that moved forget quality (npo/all): gate, deployment threshold, rank, layers, steps
    "npo/all/t0.5": {"method": "npo", "positions": "all", "deploy_threshold": 0.5},
    "npo/all/linear": {"method": "npo", "positions": "all", "gate": "linear"},
    "npo/all/rank16": {"method": "npo", "positions": "all", "rank": 16},
    "npo/all/layers1-5": {"method": "npo", "positions": "all", "layers": [1, 2, 3, 4, 5]},
    "npo/all/3xsteps": {"method": "npo", "positions": "all", "steps_factor": 3},
    "npo/all/retain5": {"method": "npo", "positions": "all", "lambda_r": 5.0},
    "npo/all/retain5/t0.5": {"method": "npo", "positions": "all", "lambda_r": 5.0, "deploy_threshold": 0.5},
}

# UnlearnConfig's defaults before 0.2.0, which every setting above was measured on (the 0.2.0 defaults are the
# retain-weight-4 point with 160 general rows); pinned so that each setting keeps meaning what it measured
V01_DEFAULTS: dict[str, Any] = {"method": "npo", "rank": 4, "answer_suffixes": 0}
V01_SIMNPO: dict[str, Any] = {"beta": 2.5, "lambda_r": 1.0}


def v01(setting: dict[str, Any]) -> dict[str, Any]:
    """``setting`` on the 0.1 defaults; ``v01_steps`` where it took the library's epochs (40, >= 450 steps)."""
    out = {**V01_DEFAULTS, **setting}
    if out["method"] == "simnpo":
        out = {**V01_SIMNPO, **out}
    if out["method"] == "npo":   # NPO's retain weight before 0.2.1
        out = {"lambda_r": 1.0, **out}
    if out.get("library_defaults") and out.get("epochs") is None and out.get("max_steps") is None:
        out["v01_steps"] = True
    return out


SETTINGS = {name: v01(setting) for name, setting in SETTINGS.items()}
# `grun-fast unlearn` exactly as a user gets it (no overrides, its own epochs), on the pipeline's retain rows and
# with 160 general rows in the retain set, as the README advises
SETTINGS["default"] = {"library_defaults": True}
SETTINGS["default/general160"] = {"library_defaults": True, "negatives": "general:160"}
# 0.2.0's defaults on forget01 (SimNPO beta 1 for every size; on forget05, 200 rows, today's beta is 1 too): the
# truth ratios overshoot past the retain model's. Around it: half the epochs, or a narrower edit
SETTINGS["default/beta1"] = {"library_defaults": True, "beta": 1.0}
SETTINGS["default/general160/beta1"] = {"library_defaults": True, "negatives": "general:160", "beta": 1.0}
SETTINGS["default/general160/beta1/30ep"] = {**SETTINGS["default/general160/beta1"], "epochs": 30}
SETTINGS["default/general160/beta1/45ep"] = {**SETTINGS["default/general160/beta1"], "epochs": 45}
SETTINGS["default/general160/beta1/rank16"] = {**SETTINGS["default/general160/beta1"], "rank": 16}
# SimNPO beta 2: the push saturates at about half the forget answers' NLL of beta 1 (training log, forget01 seed 0:
# 6.6 vs 12.4 nats per token at the end); 0.2.1's default for 40 forget rows
SETTINGS["default/beta2"] = {"library_defaults": True, "beta": 2.0}
SETTINGS["default/general160/beta2"] = {"library_defaults": True, "negatives": "general:160", "beta": 2.0}
# NPO at the defaults (its own beta 0.1, retain weight 1, forget x10; rank, suffixes and epochs as simnpo's)
SETTINGS["default/npo"] = {"library_defaults": True, "method": "npo"}
SETTINGS["default/general160/npo"] = {"library_defaults": True, "negatives": "general:160", "method": "npo"}
# with 0.2.0's NPO retain weight, 1
SETTINGS["default/npo/retain1"] = {**SETTINGS["default/npo"], "lambda_r": 1.0}
SETTINGS["default/general160/npo/retain1"] = {**SETTINGS["default/general160/npo"], "lambda_r": 1.0}


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


# setting keys the study reads itself; every other key is an UnlearnConfig field
STUDY_KEYS = ("library_defaults", "steps_factor", "deploy_threshold", "unseen_retain_rows", "negatives",
              "retain_suffixes", "v01_steps")


def split_setting(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the study's own options, the UnlearnConfig overrides) of one setting; the overrides are checked by
    building the config, so that a typo fails before any model is trained."""
    from grun_fast.errors import GRUNError
    from grun_fast.unlearn.config import UnlearnConfig

    setting = SETTINGS[name]
    study = {k: v for k, v in setting.items() if k in STUDY_KEYS}
    overrides = {k: v for k, v in setting.items() if k not in STUDY_KEYS}
    try:
        UnlearnConfig(**overrides)
    except (TypeError, GRUNError) as e:
        raise GRUNError(f"forget study setting {name!r}: {e}") from None
    return study, overrides


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


def append(row: dict[str, Any], path: Path = CSV) -> None:
    """Append one row; a file written with fewer columns is first rewritten with FIELDS (old rows blank there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header, old = reader.fieldnames, list(reader)
        if header != FIELDS:
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows({k: r.get(k) for k in FIELDS} for r in old)
            os.replace(tmp, path)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k) for k in FIELDS})


# ----------------------------------------------------------------------------------------------- report
def _num(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def medians(path: Path = CSV) -> list[dict[str, Any]]:
    """One entry per (split, setting): medians over seeds of every numeric column (latest row per seed)."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["split"], r["setting"], r["seed"])] = r
    groups: dict[tuple, list[dict]] = {}
    for (split, setting, _), r in latest.items():
        groups.setdefault((split, setting), []).append(r)
    out = []
    for (split, setting), rs in groups.items():
        entry: dict[str, Any] = {"split": split, "setting": setting, "seeds": len(rs)}
        for k in FIELDS:
            values = [v for v in (_num(r.get(k)) for r in rs) if v is not None]   # older files lack new columns
            if values and k not in ("seed",):
                entry[k] = statistics.median(values)
        out.append(entry)
    return out


def targets(m: dict[str, Any]) -> dict[str, bool]:
    """Issue 12's targets for one median row."""
    fq, bfq = m.get("forget_quality"), m.get("base_forget_quality")
    return {
        "FQ>=0.01": fq is not None and fq >= 0.01,
        "FQ>=100x base": fq is not None and bfq is not None and fq >= 100 * bfq,
        "retain within 0.05": abs(m["retain_rouge_l"] - m["base_retain_rouge_l"]) <= 0.05,
        "MU>=0.9x base": m["model_utility"] >= 0.9 * m["base_model_utility"],
        "forget ROUGE drop>=0.5": m["base_forget_rouge_l"] - m["forget_rouge_l"] >= 0.5,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v != 0 and abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(path: Path = CSV) -> list[Path]:
    entries = sorted(medians(path), key=lambda m: (m["split"], -(m.get("forget_quality") or 0)))
    cols = ["forget_quality", "model_utility", "forget_rouge_l", "retain_rouge_l", "paraphrased_rouge_l",
            "forget_truth_ratio", "forget_log_truth_ratio_sd", "gate_forget", "gate_retain", "format_gate_forget_min",
            "format_gate_retain_max", "forget_leaks", "paraphrased_leaks", "train_seconds"]
    md = ["# Forget-quality study (issue 12)", "",
          "`python -m bench.forget_study` on the tiny TOFU pipeline (bench/forget_study.py); medians over seeds "
          "of the adapter (base and retain models trained once with seed 0). Targets: FQ >= 0.01 and >= 100x the "
          "base's, retain ROUGE-L within 0.05 of the base's, model utility >= 0.9x the base's, forget ROUGE-L "
          "drop >= 0.5.", ""]
    for split in sorted({m["split"] for m in entries}):
        rows = [m for m in entries if m["split"] == split]
        ref = rows[0]
        retain_sd = next((m["retain_model_log_truth_ratio_sd"] for m in rows
                          if m.get("retain_model_log_truth_ratio_sd") is not None), None)
        md += [f"## {split}: base FQ {_fmt(ref.get('base_forget_quality'))}, base MU "
               f"{_fmt(ref.get('base_model_utility'))}, base forget/retain ROUGE-L {_fmt(ref.get('base_forget_rouge_l'))}"
               f" / {_fmt(ref.get('base_retain_rouge_l'))}, retain model MU {_fmt(ref.get('retain_model_utility'))}"
               f", retain model's forget log truth ratio sd {_fmt(retain_sd)}",
               "", "| setting | seeds | " + " | ".join(cols) + " | targets met |",
               "|" + " --- |" * (len(cols) + 3)]
        for m in rows:
            met = targets(m)
            md.append(f"| {m['setting']} | {m['seeds']} | " + " | ".join(_fmt(m.get(c)) for c in cols)
                      + f" | {sum(met.values())}/{len(met)} " + ("(all)" if all(met.values()) else
                      "(" + ", ".join(k for k, ok in met.items() if not ok) + " missed)") + " |")
        md.append("")
    md_path = path.with_suffix(".md")
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md))
    os.replace(tmp, md_path)
    return [md_path, plot(entries, path.with_suffix(".png"))]


def _pareto_front(points: list[tuple[float, float]]) -> set[tuple[float, float]]:
    """The (model utility, forget quality) points no other point beats on both (ties on both kept)."""
    return {p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)}


def _wrap(text: str, width: int) -> str:
    """``text`` broken after "/" into lines of at most ``width`` characters (a longer segment stays whole)."""
    lines, line = [], ""
    for part in text.split("/"):
        if line and len(line) + 1 + len(part) > width:
            lines.append(line + "/")
            line = part
        else:
            line = f"{line}/{part}" if line else part
    return "\n".join(lines + [line])


def _annotate(ax: Any, labels: list[tuple[float, float, str]], middle: float, line_pt: float = 9.0,
              wrap: int | None = None) -> None:
    """Name each point; labels on the right half run leftwards (to stay inside the panel), and a label that
    would overlap one already placed on its side moves down a line at a time, until it is clear. ``wrap``: break
    labels after "/" into lines of at most that many characters."""
    to_points = 72.0 / ax.figure.dpi
    placed: list[tuple[float, float, bool]] = []   # each label's top and bottom in points, and its side
    for x, y, text in sorted(labels, key=lambda p: -p[1]):   # top to bottom
        text = _wrap(text, wrap) if wrap else text
        height = line_pt * (text.count("\n") + 1)
        py = ax.transData.transform((x, y))[1] * to_points
        right = x > middle
        dy = 3.0

        def clashes(dy: float) -> bool:
            top = py + dy + line_pt
            return any(r == right and top > q_bottom and top - height < q_top for q_top, q_bottom, r in placed)
        while clashes(dy):
            dy -= line_pt
        placed.append((py + dy + line_pt, py + dy + line_pt - height, right))
        ax.annotate(text, (x, y), fontsize=7, xytext=(-3 if right else 3, dy + line_pt), textcoords="offset points",
                    ha="right" if right else "left", va="top",   # a moved label keeps a thin line to its point
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if dy < 0 else None)


def _zoom_window(rows: list[dict[str, Any]]) -> tuple[float, float, float, float] | None:
    """(x0, x1, y0, y1) around the targets' corner (forget quality >= 1e-3, model utility >= 0.85x the base's) where
    some setting lands there; else None."""
    if not rows:
        return None
    base_mu = rows[0]["base_model_utility"]
    xs = [m["model_utility"] for m in rows if m["forget_quality"] >= 1e-3 and m["model_utility"] >= 0.85 * base_mu]
    if not xs:
        return None
    x0 = min(min(xs), 0.9 * base_mu)
    x1 = max(xs + [rows[0].get("retain_model_utility") or 0.0])
    pad = 0.05 * (x1 - x0) or 0.01
    return x0 - pad, x1 + pad, 1e-3, 2.0


def _panel(ax: Any, rows: list[dict[str, Any]], title: str,
           window: tuple[float, float, float, float] | None = None, wrap: int | None = None,
           named_below: tuple[float, float, float, float] | None = None) -> None:
    """One split's settings (within ``window`` when given): the trade-off front and the default named (but not
    within ``named_below``, the zoom panel's window, which names them), the rest grey dots; base, retain model and
    the target region marked."""
    points: dict[tuple[float, float], list[str]] = {}   # settings that land on the same point share a label
    for m in rows:
        x, y = m["model_utility"], m["forget_quality"]
        if window is None or (window[0] <= x <= window[1] and window[2] <= y <= window[3]):
            points.setdefault((x, y), []).append(m["setting"])
    front = _pareto_front(list(points))
    ref = rows[0] if rows else None
    xs = [x for x, _ in points] + [ref[k] for k in ("base_model_utility", "retain_model_utility")
                                   if ref and ref.get(k) is not None and window is None]
    middle = (min(xs) + max(xs)) / 2 if xs else 0.0   # labels of points right of it run leftwards
    labels: list[tuple[float, float, str]] = []
    for (x, y), names in sorted(points.items()):
        if (x, y) not in front and "default" not in names:   # dominated: a grey dot, named in the .md table
            ax.scatter(x, y, s=14, c="0.7")
            continue
        ax.scatter(x, y, s=30)
        if named_below is None or not (named_below[0] <= x <= named_below[1] and named_below[2] <= y <= named_below[3]):
            labels.append((x, y, " = ".join(sorted(names, key=lambda n: (n != "default", n)))))
    if ref:
        if window is None or window[0] <= ref["base_model_utility"] <= window[1] and ref["base_forget_quality"] >= 1e-3:
            ax.scatter(ref["base_model_utility"], ref["base_forget_quality"], marker="s", c="k", label="base")
        ax.scatter(ref.get("retain_model_utility", 0), 1.0, marker="*", s=120, c="g", label="retain model")
    ax.set_yscale("log")
    if any((p not in front) and "default" not in names for p, names in points.items()):   # some grey dots
        ax.scatter([], [], s=14, c="0.7", label="dominated (see .md)")
    ax.axhline(0.01, ls=":", c="grey", lw=1)
    if window is not None:
        ax.set_xlim(window[0], window[1])
        ax.set_ylim(window[2], window[3])
    if ref:   # the study's target region: forget quality >= 0.01, model utility >= 0.9x the base's
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        ax.fill_between([0.9 * ref["base_model_utility"], x1], 0.01, y1, color="g", alpha=0.08,
                        label="targets (FQ, MU)")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    _annotate(ax, labels, middle, wrap=wrap)   # once the limits are final: it works in display coordinates
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left" if window is None else "best")


def plot(entries: list[dict[str, Any]], path: Path) -> Path:
    """Forget quality (log) against model utility, one column per split: every setting above, and below a zoom on
    the corner of the targets where settings crowd (the front there named anew)."""
    from grun_fast.evaluation.report import _pyplot, _save_figure

    plt = _pyplot()
    splits = sorted({m["split"] for m in entries})
    by_split = {s: [m for m in entries if m["split"] == s and m.get("forget_quality") is not None] for s in splits}
    windows = {s: _zoom_window(rows) for s, rows in by_split.items()}
    zoomed = [s for s in splits if windows[s] is not None]
    fig, axes = plt.subplots(2 if zoomed else 1, len(splits), figsize=(6.5 * len(splits), 10 if zoomed else 5),
                             squeeze=False, gridspec_kw={"wspace": 0.3, "hspace": 0.25})
    for i, split in enumerate(splits):
        _panel(axes[0][i], by_split[split], f"TOFU {split}, tiny pipeline (median over seeds)",
               named_below=windows[split])
        if zoomed:
            if windows[split] is None:
                axes[1][i].set_axis_off()
            else:
                _panel(axes[1][i], by_split[split], f"{split}: near the targets (FQ >= 1e-3, MU >= 0.85x base)",
                       windows[split], wrap=40)
    return _save_figure(fig, path)


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
        p.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
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
        _say(f"{split}: base FQ {_fmt(b['forget_quality'])} MU {_fmt(b['model_utility'])} forget ROUGE "
             f"{_fmt(b['forget_rouge_l'])} retain ROUGE {_fmt(b['retain_rouge_l'])}; retain model MU "
             f"{_fmt(pipe['retain_eval'].get('model_utility'))} ({time.perf_counter() - t0:.0f} s)")
        # rows of a pipeline with another number of retain rows are their own group: "forget05/retain200"
        label = split if args.retain_rows == DEFAULT_RETAIN_ROWS else f"{split}/retain{args.retain_rows}"
        for name in names:
            for seed in seeds:
                t0 = time.perf_counter()
                for row in run_setting(pipe, label, name, seed, args.steps, args.also_threshold):
                    append(row, path)
                    _say(f"  {label} {row['setting']:14s} seed {seed}: FQ {_fmt(row['forget_quality'])} MU "
                         f"{_fmt(row['model_utility'])} forget {_fmt(row['forget_rouge_l'])} retain "
                         f"{_fmt(row['retain_rouge_l'])} gates {_fmt(row['gate_forget'])}/"
                         f"{_fmt(row['gate_retain'])} ({time.perf_counter() - t0:.0f} s)")
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
