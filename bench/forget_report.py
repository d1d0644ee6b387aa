"""The forget study's results (bench/forget_study.py): its CSV (one row per split, setting and seed; the file
grows columns without losing rows), medians over seeds against issue 12's targets, forget_study.md and the
forget-quality-against-model-utility plot forget_study.png."""
from __future__ import annotations

import csv
import os
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CSV = RESULTS / "forget_study.csv"
FIELDS = ["split", "setting", "seed", "forget_quality", "model_utility", "forget_rouge_l", "retain_rouge_l",
          "paraphrased_rouge_l", "forget_truth_ratio", "gate_forget", "gate_retain", "forget_leaks",
          "base_forget_quality", "base_model_utility", "base_forget_rouge_l", "base_retain_rouge_l",
          "retain_model_utility", "train_seconds", "overrides", "date", "version", "utility_weakest",
          "format_gate_forget_min", "format_gate_retain_max", "forget_log_truth_ratio_median",
          "forget_log_truth_ratio_sd", "retain_model_log_truth_ratio_sd", "forget_nll", "train_forget_nll",
          "paraphrased_leaks"]


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


def fmt(v: Any) -> str:
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
        md += [f"## {split}: base FQ {fmt(ref.get('base_forget_quality'))}, base MU "
               f"{fmt(ref.get('base_model_utility'))}, base forget/retain ROUGE-L {fmt(ref.get('base_forget_rouge_l'))}"
               f" / {fmt(ref.get('base_retain_rouge_l'))}, retain model MU {fmt(ref.get('retain_model_utility'))}"
               f", retain model's forget log truth ratio sd {fmt(retain_sd)}",
               "", "| setting | seeds | " + " | ".join(cols) + " | targets met |",
               "|" + " --- |" * (len(cols) + 3)]
        for m in rows:
            met = targets(m)
            md.append(f"| {m['setting']} | {m['seeds']} | " + " | ".join(fmt(m.get(c)) for c in cols)
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
