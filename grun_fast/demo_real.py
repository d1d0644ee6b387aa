"""The real-model demo: a pretrained chat model forgets a topic it knows (``grun-fast demo --model smollm2``).

No fine-tuning first: the "truth" of every question is the model's own greedy answer before unlearning.
A GRUN adapter is trained to forget 20 questions on one topic (the Harry Potter books,
``grun_fast.data.real_topics``) while keeping 40 general questions; then the same greedy generation runs
again and is scored (ROUGE-L recall against the answers before) on the forget questions, the same
questions reworded (never trained on), the retained questions and 20 general questions never trained on,
with the mean gate at the last prompt token of each. Results: a table, sample generations, report.json,
report.md and report.png.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grun_fast.errors import GRUNError
from grun_fast.evaluation.formats import format_gates, format_gates_markdown
from grun_fast.version import __version__

# What the real-model demo promises (at its defaults, on SmolLM2-135M-Instruct).
THRESHOLDS = {
    "forget_rouge_max": 0.3,
    "reworded_rouge_max": 0.5,
    "retain_rouge_min": 0.95,
    "general_rouge_min": 0.9,
    "gate_forget_min": 0.9,
    "gate_retain_max": 0.1,
    "gate_general_max": 0.1,
    "variant_gate_forget_min": 0.8,   # under every prompt-format variant (grun_fast.evaluation.formats)
    "variant_gate_retain_max": 0.1,   # retain and never-seen questions, every variant
}

SPLITS = (("forget", "forget (topic)"), ("reworded", "reworded topic q."), ("retain", "retain (general)"),
          ("general", "never-seen general"))


@dataclass(frozen=True)
class RealPlan:
    """Sizes and hyperparameters of one real-model demo run; ``REAL_QUICK`` is the test-suite size."""

    forget: int = 20
    retain: int = 40
    general: int = 20
    method: str = "idk"
    positions: str = "last_prompt"   # refusals are first-token behaviour; the thresholds were measured so
    layers: tuple[int, ...] = (18, 23, 29)
    gate: str = "linear"
    rank: int = 4
    gate_threshold: float | None = 0.5
    steps: int = 100
    lr: float = 4e-3
    batch_size: int = 16
    max_new_tokens: int = 32
    seed: int = 0


REAL_QUICK = RealPlan(forget=10, retain=24, general=8, steps=40, batch_size=8, max_new_tokens=16)


def build_rows(plan: RealPlan) -> dict[str, list[dict]]:
    """The four question sets of a run (questions only; answers come from the model)."""
    from grun_fast.data.real_topics import GENERAL, RETAIN_COUNT, REWORDED, TOPIC

    if not 1 <= plan.forget <= len(TOPIC):
        raise GRUNError(f"forget must be between 1 and {len(TOPIC)}, got {plan.forget}")
    if not 1 <= plan.retain <= RETAIN_COUNT:
        raise GRUNError(f"retain must be between 1 and {RETAIN_COUNT}, got {plan.retain}")
    if not 1 <= plan.general <= len(GENERAL) - RETAIN_COUNT:
        raise GRUNError(f"general must be between 1 and {len(GENERAL) - RETAIN_COUNT}, got {plan.general}")
    topic = list(TOPIC[:plan.forget])
    return {
        "forget": [{"question": t["question"], "key": t["key"]} for t in topic],
        "reworded": [{"question": q, "key": t["key"]} for q, t in zip(REWORDED, topic)],
        "retain": [{"question": q} for q in GENERAL[:plan.retain]],
        "general": [{"question": q} for q in GENERAL[RETAIN_COUNT:RETAIN_COUNT + plan.general]],
    }


def run_real(args: argparse.Namespace, plan: RealPlan) -> int:
    """``grun-fast demo --model M``: the whole story; returns the exit status."""
    from grun_fast import models
    from grun_fast.data.real_topics import TOPIC_LABEL
    from grun_fast.demo import _check_writable, _say, show_and_check

    out = Path(args.out)
    _check_writable(out)
    if args.threads < 1:
        raise GRUNError(f"--threads must be >= 1, got {args.threads}")
    if plan.steps < 1 or plan.lr <= 0:
        raise GRUNError(f"--steps must be >= 1 and --lr > 0, got {plan.steps} and {plan.lr}")
    rows = build_rows(plan)
    models.check_model(args.model)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    times: dict[str, float] = {}

    _say(f"[1/4] model {args.model}")
    t0 = time.perf_counter()
    model, tokenizer = models.load_model(args.model, dtype="float32", cache=args.cache)
    times["load"] = time.perf_counter() - t0
    n_layers = int(model.config.num_hidden_layers)
    layers = [l for l in plan.layers if -n_layers <= l < n_layers]
    if len(layers) != len(plan.layers):
        raise GRUNError(f"layers {list(plan.layers)} are out of range for {args.model} ({n_layers} layers)")
    _say(f"      {type(model).__name__}, {n_layers} layers, hidden {model.config.hidden_size}, "
         f"loaded in {times['load']:.1f} s")

    everything = [r for name, _ in SPLITS for r in rows[name]]
    _say(f"[2/4] the model's own answers before unlearning ({len(everything)} questions: topic {TOPIC_LABEL!r} "
         f"{len(rows['forget'])} + reworded {len(rows['reworded'])}, general {len(rows['retain'])} retained + "
         f"{len(rows['general'])} never seen)")
    t0 = time.perf_counter()
    before = _generate(model, tokenizer, everything, plan)
    times["answers_before"] = time.perf_counter() - t0
    _split_back(rows, before, "before")
    _say(f"      {times['answers_before']:.1f} s")

    _say(f"[3/4] GRUN adapter, gated {plan.method.upper()}, layers {layers}, {plan.steps} steps, lr {plan.lr}")
    from grun_fast.unlearn import unlearn

    forget_rows = [{"question": r["question"], "answer": r["before"]} for r in rows["forget"]]
    retain_rows = [{"question": r["question"], "answer": r["before"]} for r in rows["retain"]]
    adapter_dir = out / "adapter"
    result = unlearn(model, tokenizer, forget_rows, retain_rows, method=plan.method, layers=layers,
                     out=adapter_dir, max_steps=plan.steps, lr=plan.lr, batch_size=plan.batch_size, gate=plan.gate,
                     rank=plan.rank,
                     positions=plan.positions, deploy_threshold=plan.gate_threshold,
                     seed=plan.seed, progress=False)
    times["unlearn"] = result.train_seconds
    _say(f"      {result.global_step} steps in {result.train_seconds:.1f} s; adapter written to {adapter_dir}")

    _say("[4/4] answers and gates with the adapter")
    if plan.gate_threshold is not None:
        from grun_fast.patching import set_gate_threshold

        t0 = time.perf_counter()
        set_gate_threshold(model, None, result.adapter_name)   # the soft gate the adapter was trained with
        _split_back(rows, _generate(model, tokenizer, everything, plan), "after_soft")
        set_gate_threshold(model, plan.gate_threshold, result.adapter_name)
        times["answers_soft_gate"] = time.perf_counter() - t0
        _say(f"      deployed (and saved) with gate_threshold {plan.gate_threshold}: rows whose gate is below it "
             "are not edited at all")
    t0 = time.perf_counter()
    after = _generate(model, tokenizer, everything, plan)
    _split_back(rows, after, "after")
    times["answers_after"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _gates(model, tokenizer, rows, result.adapter_name)
    variants = format_gates(model, tokenizer, {name: rows[name] for name, _ in SPLITS}, "auto",
                            result.adapter_name)
    times["gates"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - started

    report = build_real_report(rows, args, plan, layers, times, variants)
    paths = write_real_report(report, out)
    return show_and_check(render_real_table(report) + "\n\n" + format_gates_markdown(report["format_gates"]),
                          render_real_samples(report),
                          f"wrote {', '.join(str(p) for p in paths)}; total {times['total']:.0f} s",
                          report["checks"], args.check)


# ----------------------------------------------------------------------------------------------- steps
def _generate(model, tokenizer, rows: list[dict], plan: RealPlan) -> list[str]:
    from grun_fast.evaluation.generation import generate

    return generate(model, tokenizer, [{"question": r["question"]} for r in rows], template="auto",
                    batch_size=32, max_new_tokens=plan.max_new_tokens)


def _split_back(rows: dict[str, list[dict]], texts: list[str], field: str) -> None:
    i = 0
    for name, _ in SPLITS:
        for r in rows[name]:
            r[field] = texts[i].strip()
            i += 1


def _gates(model, tokenizer, rows: dict[str, list[dict]], adapter_name: str) -> None:
    """Each row's mean gate (over the adapter's layers) at its last prompt token, in the trained format."""
    from grun_fast.evaluation.formats import prompt_gates
    from grun_fast.evaluation.scoring import gate_modules

    modules = gate_modules(model, adapter_name)
    was_training = model.training
    model.eval()
    try:
        for name, _ in SPLITS:
            values = prompt_gates(model, tokenizer, [r["question"] for r in rows[name]], "auto", modules)
            for r, v in zip(rows[name], values):
                r["gate"] = float(v)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------- report
def _states(text: str, key: str) -> bool:
    return key.lower() in text.lower()


# Phrases that mark an answer as a refusal (a heuristic on the first sentence; counted, not checked).
REFUSAL_MARKERS = ("i don't know", "i do not know", "not able to", "unable to", "i can't", "i cannot", "i don't have",
                   "i'm not sure", "not sure", "no information", "no idea", "not aware", "not familiar", "i'm sorry",
                   "couldn't say", "beyond what i know", "no knowledge", "nothing to share", "not in a position",
                   "not equipped", "don't recall", "i'm afraid")


def is_refusal(text: str) -> bool:
    """Whether an answer's first sentence declines to answer (see REFUSAL_MARKERS)."""
    first = text.strip().lower().replace("\u2019", "'").split(". ")[0]
    return any(m in first for m in REFUSAL_MARKERS)


def build_real_report(rows: dict[str, list[dict]], args: argparse.Namespace, plan: RealPlan, layers: list[int],
                      times: dict[str, float], variants: dict[str, Any]) -> dict[str, Any]:
    """The demo's numbers and checks; ``variants`` is ``format_gates`` over the four question sets."""
    from grun_fast.data.real_topics import TOPIC_LABEL
    from grun_fast.evaluation.metrics import rouge_l_recall

    table: dict[str, dict[str, Any]] = {}
    for name, _ in SPLITS:
        for r in rows[name]:
            r["rouge_l"] = rouge_l_recall(r["after"], r["before"])
            if "after_soft" in r:
                r["rouge_l_soft"] = rouge_l_recall(r["after_soft"], r["before"])
        split = rows[name]
        keyed = [r for r in split if r.get("key") and _states(r["before"], r["key"])]
        table[name] = {
            "rows": len(split),
            "rouge_l": float(np.mean([r["rouge_l"] for r in split])),
            "rouge_l_soft": (float(np.mean([r["rouge_l_soft"] for r in split])) if split and "rouge_l_soft" in split[0]
                             else None),
            "gate": float(np.mean([r["gate"] for r in split])),
            "unchanged": sum(r["after"] == r["before"] for r in split),
            "refusals": sum(is_refusal(r["after"]) for r in split),
            "fact_stated_before": len(keyed) if name in ("forget", "reworded") else None,
            "fact_stated_after": sum(_states(r["after"], r["key"]) for r in keyed) if name in ("forget", "reworded")
            else None,
        }
    t = THRESHOLDS
    rouge = {name: table[name]["rouge_l"] for name in table}
    gate = {name: table[name]["gate"] for name in table}
    checks = {
        f"forget ROUGE-L <= {t['forget_rouge_max']}": rouge["forget"] <= t["forget_rouge_max"],
        f"reworded topic ROUGE-L <= {t['reworded_rouge_max']}": rouge["reworded"] <= t["reworded_rouge_max"],
        f"retain ROUGE-L >= {t['retain_rouge_min']}": rouge["retain"] >= t["retain_rouge_min"],
        f"never-seen general ROUGE-L >= {t['general_rouge_min']}": rouge["general"] >= t["general_rouge_min"],
        f"mean gate on forget >= {t['gate_forget_min']}": gate["forget"] >= t["gate_forget_min"],
        f"mean gate on retain <= {t['gate_retain_max']}": gate["retain"] <= t["gate_retain_max"],
        f"mean gate on never-seen general <= {t['gate_general_max']}": gate["general"] <= t["gate_general_max"],
        f"forget gate >= {t['variant_gate_forget_min']} under every prompt format":
            min(v["gates"]["forget"] for v in variants["variants"].values()) >= t["variant_gate_forget_min"],
        f"retain and never-seen gates <= {t['variant_gate_retain_max']} under every prompt format":
            max(max(v["gates"]["retain"], v["gates"]["general"]) for v in variants["variants"].values())
            <= t["variant_gate_retain_max"],
    }
    samples = {name: [{k: r[k] for k in ("question", "before", "after", "gate")} for r in rows[name][:3]]
               for name, _ in SPLITS}
    command = f"grun-fast demo --model {args.model}" + (" --quick" if args.quick else "") + f" --seed {plan.seed}"
    return {
        "command": command, "model": args.model, "topic": TOPIC_LABEL, "method": plan.method, "layers": layers,
        "plan": asdict(plan), "thresholds": THRESHOLDS, "table": table, "format_gates": variants, "checks": checks,
        "samples": samples,
        "rows": rows, "seconds": times, "library_version": __version__,
    }


def render_real_table(report: dict[str, Any], markdown: bool = False) -> str:
    from grun_fast.demo import _fmt, table_with_checks

    header = ["questions", "n", "ROUGE-L vs before", "(no threshold)", "mean gate", "unchanged", "refusals",
              "fact stated (before -> after)"]
    body = []
    for name, label in SPLITS:
        s = report["table"][name]
        fact = "-" if s["fact_stated_before"] is None else f"{s['fact_stated_before']} -> {s['fact_stated_after']}"
        body.append([label, str(s["rows"]), _fmt(s["rouge_l"]), _fmt(s.get("rouge_l_soft")), _fmt(s["gate"]),
                     str(s["unchanged"]), str(s["refusals"]), fact])
    return table_with_checks(header, body, report["checks"], markdown)


def render_real_samples(report: dict[str, Any]) -> str:
    lines = []
    for name, label in SPLITS:
        lines.append(f"Sample generations, {label}:")
        for s in report["samples"][name]:
            lines += [f"  Q: {s['question']}  (gate {s['gate']:.3f})", f"     before: {s['before']}",
                      f"     after:  {s['after']}"]
    return "\n".join(lines)


def write_real_report(report: dict[str, Any], out: Path) -> list[Path]:
    from grun_fast.evaluation.report import write_json, write_text

    times = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
    md = [f"# grun-fast demo: {report['model']} forgets {report['topic']}, gated {report['method'].upper()}", "",
          f"`{report['command']}` ({times})", "",
          "ROUGE-L recall against the model's own greedy answers before unlearning, with the adapter deployed at "
          f"gate_threshold {report['plan']['gate_threshold']} (and, in brackets, without a threshold); mean soft gate "
          f"at the last prompt token over layers {report['layers']}.", "",
          render_real_table(report, markdown=True), "",
          format_gates_markdown(report["format_gates"]),
          "```", render_real_samples(report), "```", ""]
    return [write_json(report, out / "report.json"), write_text("\n".join(md), out / "report.md"),
            plot_real_report(report, out / "report.png")]


def plot_real_report(report: dict[str, Any], path: Path) -> Path:
    """Two bar groups per question set: ROUGE-L against the answers before, and the mean gate."""
    from grun_fast.evaluation.report import _pyplot, _save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(SPLITS))
    rouge = [report["table"][n]["rouge_l"] for n, _ in SPLITS]
    gate = [report["table"][n]["gate"] for n, _ in SPLITS]
    ax.bar(x - 0.2, rouge, 0.4, label="ROUGE-L vs answers before")
    ax.bar(x + 0.2, gate, 0.4, label="mean gate")
    ax.set_xticks(x, [label for _, label in SPLITS], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(f"{report['model']} + GRUN ({report['method'].upper()}): forgetting {report['topic']}", fontsize=9)
    return _save_figure(fig, path)
