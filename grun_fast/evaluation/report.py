"""Report writers for evaluation results: ``eval.json``, a Markdown summary, PNG plots.

A *run* is what ``grun-fast eval`` writes to ``eval.json``: ``{"meta": {...}, "metrics": evaluate(...) dict,
"baseline": the same without adapters, or null}``. The writers take runs (or bare ``evaluate`` dicts) so
the demo and the CLI share them. Every file is written to a temporary name and moved into place.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from grun_fast.errors import GRUNError

SPLIT_METRICS = (("probability", "probability"), ("rouge_l", "ROUGE-L"), ("truth_ratio", "truth ratio"))


def _atomic_write(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_text(text: str, path: str | os.PathLike) -> Path:
    """``text`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return _atomic_write(path, write)


def write_json(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=_json_default, allow_nan=True)
            f.write("\n")
    return _atomic_write(path, write)


def write_text(text: str, path: str | os.PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return _atomic_write(path, write)


def load_run(path: str | os.PathLike) -> dict[str, Any]:
    """A run from an ``eval.json`` file or the folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "eval.json"
    if not p.is_file():
        raise GRUNError(f"no evaluation found at {path} (expected an eval.json file or a folder with one)")
    try:
        with p.open(encoding="utf-8") as f:
            run = json.load(f)
    except json.JSONDecodeError as e:
        raise GRUNError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(run, dict) or "metrics" not in run or "splits" not in run["metrics"]:
        raise GRUNError(f"{p}: not a grun-fast evaluation (no metrics.splits)")
    run.setdefault("meta", {}).setdefault("label", p.parent.name)
    return run


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and abs(x) < 10 ** -digits:
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def mean_gate(gates: Mapping[str, Mapping[str, float]]) -> float | None:
    """Mean over every adapter and layer of per-layer mean gates (None when no gates were read)."""
    values = [v for layers in gates.values() for v in layers.values()]
    return sum(values) / len(values) if values else None


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _models(run: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    out = []
    if run.get("baseline"):
        out.append(("base (no adapter)", run["baseline"]))
    out.append(("with adapter" if run.get("baseline") or run.get("meta", {}).get("adapters") else "model",
                run["metrics"]))
    return out


def summary_markdown(run: Mapping[str, Any]) -> str:
    """The Markdown summary of one run: split metrics, forget quality, model utility, gates per layer."""
    meta = run.get("meta", {})
    lines = [f"# Evaluation: {meta.get('label', 'run')}", ""]
    for key in ("model", "adapters", "data", "split", "max_rows", "created"):
        if meta.get(key) not in (None, [], ""):
            lines.append(f"- {key}: {meta[key]}")
    models = _models(run)
    rows = []
    for label, res in models:
        for name, s in res["splits"].items():
            rows.append([label, name, s["n"], s["probability"], s["rouge_l"], s["truth_ratio"],
                         s.get("truth_ratio_prob_mean"), s.get("extraction_strength"), s.get("exact_memorization"),
                         mean_gate(s["gate"])])
            if "paraphrased_question" in s:
                pq = s["paraphrased_question"]
                rows.append([label, f"{name} (paraphrased question)", s["n"], pq["probability"], pq["rouge_l"], None,
                             None, None, None, mean_gate(pq["gate"])])
    lines += ["", "## Splits", ""]
    lines += _table(["model", "split", "n", "probability", "ROUGE-L", "truth ratio", "truth ratio (prob_mean)",
                     "extraction strength", "exact memorization", "mean gate"], rows)
    lines += _leak_lines(models)
    lines += _privacy_lines(models)
    lines += ["", "## Summary", ""]
    summary = []
    for label, res in models:
        fq = res.get("forget_quality") or {}
        summary.append([label, ", ".join(f"{k}: {_fmt(v)}" for k, v in fq.items()) or None, res.get("model_utility")])
    lines += _table(["model", "forget quality (KS p-value)", "model utility"], summary)
    gate_rows = []
    for label, res in models:
        parts = []
        for name, s in res["splits"].items():
            parts.append((name, s["gate"]))
            if "paraphrased_question" in s:
                parts.append((f"{name} (paraphrased question)", s["paraphrased_question"]["gate"]))
        parts += [(name, mc["gate"]) for name, mc in (res.get("multiple_choice") or {}).items()]
        gate_rows += [(label, part, adapter, layers) for part, gates in parts for adapter, layers in gates.items()]
    if gate_rows:
        layer_keys = sorted({k for *_, layers in gate_rows for k in layers}, key=int)
        lines += ["", "## Mean gate per layer (at the edited token)", ""]
        lines += _table(["model", "split", "adapter"] + [f"layer {k}" for k in layer_keys],
                        [[label, part, adapter] + [layers.get(k) for k in layer_keys]
                         for label, part, adapter, layers in gate_rows])
    lines += _sample_lines(run)
    mc_rows = [[label, name, mc["n"], mc["accuracy"], mean_gate(mc["gate"])]
               for label, res in models for name, mc in (res.get("multiple_choice") or {}).items()]
    if mc_rows:
        lines += ["", "## Multiple choice", ""]
        lines += _table(["model", "set", "n", "accuracy", "mean gate"], mc_rows)
    return "\n".join(lines) + "\n"


def _leak_lines(models: list[tuple[str, Mapping[str, Any]]]) -> list[str]:
    rows = []
    for label, res in models:
        for name, s in res["splits"].items():
            for part, leaks in ((name, s.get("leaks")),
                                (f"{name} (paraphrased question)", s.get("paraphrased_question", {}).get("leaks"))):
                if leaks:
                    rows.append([label, part, leaks["count"], leaks["n"], leaks["rate"]])
    if not rows:
        return []
    threshold = next(s["leaks"]["threshold"] for _, res in models for s in res["splits"].values() if s.get("leaks"))
    return ["", f"## Leaks (generations with ROUGE-L recall >= {_fmt(threshold, 2)} against the original answer)",
            ""] + _table(["model", "split", "leaks", "n", "rate"], rows)


def _privacy_lines(models: list[tuple[str, Mapping[str, Any]]]) -> list[str]:
    rows = []
    for label, res in models:
        for name, p in (res.get("privleak") or {}).items():
            mia = res["splits"][name].get("mia", {})
            rows.append([label, name, mia.get("holdout_n"), mia.get("auc_min_k_plus_plus"), p.get("min_k_plus_plus"),
                         mia.get("auc_min_k"), p.get("min_k"), p.get("reference_min_k_plus_plus")])
    if not rows:
        return []
    return ["", "## Membership inference (forget vs holdout; privleak in %, 0 = like the retain model)", ""] + _table(
        ["model", "split", "holdout n", "AUC Min-K++", "privleak Min-K++", "AUC Min-K", "privleak Min-K",
         "reference"], rows)


SAMPLES = 3


def _clip(text: str, width: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _sample_lines(run: Mapping[str, Any]) -> list[str]:
    """A few forget questions before and after the adapter: those that still leak after it first, then those
    it stopped leaking, then the rest."""
    baseline = run.get("baseline")
    if not baseline:
        return []
    lines: list[str] = []
    for name, s in run["metrics"]["splits"].items():
        before = baseline["splits"].get(name, {}).get("rows")
        if s.get("kind") != "forget" or not before or not s.get("rows"):
            continue
        after = s["rows"]
        pairs = list(zip(before, after))
        pairs.sort(key=lambda p: (not p[1].get("leak", False), not p[0].get("leak", False)))
        lines += ["", f"## Sample generations: {name} (before / after the adapter)", ""]
        for b, a in pairs[:SAMPLES]:
            lines += [f"- Q: {_clip(a['question'])}", f"  - truth: {_clip(a['answer'])}",
                      f"  - before (ROUGE-L {_fmt(b['rouge_l'], 2)}): {_clip(b['generation'])}",
                      f"  - after (ROUGE-L {_fmt(a['rouge_l'], 2)}{', leak' if a.get('leak') else ''}): "
                      f"{_clip(a['generation'])}"]
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | os.PathLike) -> Path:
    plt = _pyplot()
    try:
        return _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_splits(run: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Per-split bars (probability, ROUGE-L, truth ratio, mean gate), before/after when a baseline exists."""
    plt = _pyplot()
    import numpy as np

    models = _models(run)
    splits = list(run["metrics"]["splits"])
    panels = list(SPLIT_METRICS) + [("gate", "mean gate")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    width = 0.8 / len(models)
    x = np.arange(len(splits))
    for ax, (key, title) in zip(axes[0], panels):
        for k, (label, res) in enumerate(models):
            values = []
            for name in splits:
                s = res["splits"].get(name)
                v = None if s is None else (mean_gate(s["gate"]) if key == "gate" else s[key])
                values.append(np.nan if v is None else v)
            ax.bar(x + (k - (len(models) - 1) / 2) * width, values, width, label=label)
        ax.set_title(title)
        ax.set_xticks(x, splits, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
    axes[0][0].legend(fontsize=8)
    notes = []
    for label, res in models:
        fq = next(iter((res.get("forget_quality") or {}).values()), None)
        notes.append(f"{label}: forget quality {_fmt(fq)}, model utility {_fmt(res.get('model_utility'))}")
    fig.suptitle(run.get("meta", {}).get("label", "") + "\n" + "; ".join(notes), fontsize=10)
    return _save_figure(fig, path)


def plot_tradeoff(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Forget quality (log scale) against model utility, one point per run. Runs without a forget quality
    are plotted by their forget-split ROUGE-L instead, on a second panel."""
    plt = _pyplot()
    with_fq, without = [], []
    for run in runs:
        res, label = run["metrics"], run.get("meta", {}).get("label", "run")
        mu = res.get("model_utility")
        fq = next(iter((res.get("forget_quality") or {}).values()), None)
        forget = next((s for s in res["splits"].values() if s.get("kind") == "forget"), None)
        if mu is None:
            continue
        if fq is not None:
            with_fq.append((label, mu, fq))
        elif forget is not None:
            without.append((label, mu, forget["rouge_l"]))
    panels = [p for p in (("forget quality (KS p-value)", with_fq, True), ("forget ROUGE-L", without, False)) if p[1]]
    if not panels:
        raise GRUNError("nothing to plot: no run has a model utility (evaluate retain, real_authors and world_facts)")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (ylabel, points, log) in zip(axes[0], panels):
        for label, mu, y in points:
            ax.scatter([mu], [max(y, 1e-300) if log else y])
            ax.annotate(label, (mu, max(y, 1e-300) if log else y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("model utility")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    return _save_figure(fig, path)


def comparison_rows(runs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One row per run: forget quality, model utility, forget/retain numbers and mean gates."""
    header = ["run", "forget quality", "model utility", "forget prob", "forget ROUGE-L", "forget truth ratio",
              "para-q ROUGE-L", "retain ROUGE-L", "forget leak rate", "para-q leak rate", "forget ES",
              "privleak", "gate forget", "gate para-q", "gate retain"]
    rows = []
    for run in runs:
        res = run["metrics"]
        splits = res["splits"]
        forget = next((s for s in splits.values() if s.get("kind") == "forget"), {})
        retain = splits.get("retain", {})
        pq = forget.get("paraphrased_question", {})
        fq = next(iter((res.get("forget_quality") or {}).values()), None)
        leak = next(iter((res.get("privleak") or {}).values()), {}).get("min_k_plus_plus")
        rows.append([run.get("meta", {}).get("label", "run"), fq, res.get("model_utility"),
                     forget.get("probability"), forget.get("rouge_l"), forget.get("truth_ratio"), pq.get("rouge_l"),
                     retain.get("rouge_l"), (forget.get("leaks") or {}).get("rate"), (pq.get("leaks") or {}).get("rate"),
                     forget.get("extraction_strength"), leak, mean_gate(forget.get("gate", {})),
                     mean_gate(pq.get("gate", {})), mean_gate(retain.get("gate", {}))])
    return header, rows


def comparison_markdown(runs: Sequence[Mapping[str, Any]]) -> str:
    header, rows = comparison_rows(runs)
    return "\n".join(["# Comparison", ""] + _table(header, rows)) + "\n"


def write_run(run: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """``eval.json``, ``summary.md`` and ``eval.png`` for one run in ``out_dir``."""
    out = Path(out_dir)
    return {"json": write_json(run, out / "eval.json"), "markdown": write_text(summary_markdown(run), out / "summary.md"),
            "plot": plot_splits(run, out / "eval.png")}
