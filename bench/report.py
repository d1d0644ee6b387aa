"""The report of the benchmark suite: from results.csv, one PNG per group and a Markdown table (RESULTS.md).

Only the latest row per key (op, provider, mode, rows, d, r, dtype, unit, device, config, batch) is shown;
every table row names its device, and ratios are taken between rows measured side by side in one run
(the suite writes the run's ratios as their own rows where it has the paired samples).

    python -m bench.report [--out DIR]       # reads DIR/results.csv (default bench/results)
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path

from bench import common

KEY = ("op", "provider", "mode", "rows", "d", "r", "dtype", "unit", "device", "config", "batch")
OP_PROVIDERS = ("triton", "triton-det", "torch", "compile", "reference")
TRAIN_VARIANTS = ("grun", "grun_fast", "lora", "full")


def latest(rows: list[dict]) -> list[dict]:
    """The last row (file order = time order) of each key, in the order keys first appeared."""
    out: OrderedDict[tuple, dict] = OrderedDict()
    for row in rows:
        out[tuple(row.get(k, "") for k in KEY)] = row
    return list(out.values())


def num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def fmt(value: float, digits: int = 3) -> str:
    if value != value:  # nan
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def spread(row: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    """median [p20, p80] of a row, scaled."""
    if row is None:
        return "-"
    med, p20, p80 = (num(row.get(k)) * scale for k in ("median", "p20", "p80"))
    if p20 != p20 or p80 != p80 or (p20 == med == p80):
        return fmt(med, digits)
    return f"{fmt(med, digits)} [{fmt(p20, digits)}, {fmt(p80, digits)}]"


def note_value(row: dict, key: str) -> str:
    m = re.search(rf"(?:^|; ){re.escape(key)}=([^;]*)", row.get("note", ""))
    return m.group(1).strip() if m else ""


def table(head: list[str], lines: list[list[str]]) -> str:
    if not lines:
        return "_no rows yet_\n"
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def pick(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def one(rows: list[dict], **match) -> dict | None:
    found = pick(rows, **match)
    return found[-1] if found else None


def sort_num(value: str) -> tuple:
    v = num(value)
    return (0, v, "") if v == v else (1, 0.0, value)


# ---- sections -----------------------------------------------------------------------------------------


def op_section(rows: list[dict]) -> str:
    ops = pick(rows, op="gated_loreft")
    cases = OrderedDict()
    for r in ops:
        cases.setdefault((r["device"], r["dtype"], r["d"], r["r"], r["mode"], r["rows"]), {})[r["provider"]] = r
    present = [p for p in OP_PROVIDERS if any(p in c for c in cases.values())]
    lines = []
    for (device, dtype, d, rank, mode, n), case in sorted(
            cases.items(), key=lambda kv: (kv[0][0], kv[0][1], -num(kv[0][2]), kv[0][4], num(kv[0][5]))):
        torch_ms = num(case["torch"]["median"]) if "torch" in case else math.nan
        fastest = "triton" if "triton" in case else "torch"
        ratio = num(case["reference"]["median"]) / num(case[fastest]["median"]) if "reference" in case and fastest in case else math.nan
        vs_compile = num(case["compile"]["median"]) / torch_ms if "compile" in case else math.nan
        peak = " / ".join(f"{p} {fmt(num(note_value(case[p], 'peak_mib')))}" for p in present
                          if p in case and note_value(case[p], "peak_mib"))
        lines.append([device, dtype, d, rank, mode, n] + [spread(case.get(p)) for p in present]
                     + [fmt(ratio), fmt(vs_compile), peak or "-"])
    head = ["device", "dtype", "d", "r", "mode", "rows"] + [f"{p} ms" for p in present] + \
           ["naive / fastest", "compile / torch", "peak MiB (CUDA)"]
    text = "### Gated intervention, functional (median [p20, p80] ms; naive = the four-product reference)\n\n"
    text += table(head, lines)
    mods = OrderedDict()
    for r in rows:
        if r["op"] in ("module", "module_ratio"):
            mods.setdefault((r["device"], r["mode"], r["d"], r["r"], r["rows"]), {})[
                "ratio" if r["op"] == "module_ratio" else r["provider"]] = r
    mlines = [[device, mode, d, rank, n, spread(c.get("grun_fast"), 1e6), spread(c.get("torch_orthogonal"), 1e6),
               spread(c.get("ratio"), digits=4)] + [target_mark(num(c["ratio"]["median"]) >= 100, mode == "fwd"
                                                                  and n == "1" and d == "4096") if "ratio" in c else "-"]
              for (device, mode, d, rank, n), c in mods.items()]
    text += ("\n### Module: grun_fast.GatedLoReFT vs re-orthogonalising R per call (the reference stack's way; "
             "us per call)\n\n")
    text += table(["device", "mode", "d", "r", "rows", "grun_fast us", "re-orth per call us",
                   "ratio (per-run p20, p80)", "target >= 100x"], mlines)
    return text + host_section(rows)


def host_section(rows: list[dict]) -> str:
    """bench_host.py: Python-side time per call with the Triton launches stubbed out."""
    lines = []
    for r in rows:
        if r["op"] == "host_time":
            target = num(note_value(r, "target_us"))
            lines.append([r["device"], r["dtype"], r["d"], r["r"], r["mode"], r["rows"], r["config"], spread(r),
                          f"<= {fmt(target)}" if target == target else "-",
                          target_mark(num(r["median"]) <= target, target == target), note_value(r, "load")])
    return ("\n### Host time per call, Triton launches stubbed (bench/bench_host.py; us, median [p20, p80])\n\n"
            "CPU-side work around the kernels (validation, fold, allocation, dispatch, autograd). Measured on a "
            "CPU with the launches replaced by a no-op: GPU host time adds the CUDA allocator and Triton's "
            "launcher and needs a GPU.\n\n"
            + table(["device", "dtype", "d", "r", "call", "rows", "clock", "us", "target", "on this CPU", "load"],
                    lines))


def target_mark(ok: bool, applies: bool = True) -> str:
    if not applies:
        return "-"
    return "met" if ok else "NOT met"


def serving_section(rows: list[dict]) -> str:
    cases = OrderedDict()
    for r in rows:
        if r["op"] in ("generate", "generate_tokens_per_s", "generate_overhead"):
            c = cases.setdefault((r["device"], r["config"], r["dtype"], r["batch"], r["mode"]), {})
            c[(r["op"], r["provider"], r["unit"])] = r
    lines = []
    for (device, config, dtype, batch, mode), c in sorted(
            cases.items(), key=lambda kv: (kv[0][0], num(note_d(kv[0][1])), kv[0][1], num(kv[0][3]), kv[0][4])):
        over = c.get(("generate_overhead", mode, "fraction"))
        over_cpu = c.get(("generate_overhead", mode, "fraction_cpu"))
        target = 3.0 if mode == "last_prompt" else 10.0
        applies = config.startswith("llama-d512") and batch == "1"
        marks = [target_mark(num(o["median"]) * 100 <= target) for o in (over, over_cpu) if o]
        lines.append([device, config, dtype, batch, mode, spread(c.get(("generate", "unpatched", "s")), 1e3),
                      spread(c.get(("generate", mode, "s")), 1e3),
                      fmt(num((c.get(("generate_tokens_per_s", "unpatched", "tok/s")) or {}).get("median"))),
                      fmt(num((c.get(("generate_tokens_per_s", mode, "tok/s")) or {}).get("median"))),
                      spread(over, 100, 2), spread(over_cpu, 100, 2),
                      f"{' / '.join(marks)} (<= {target:.0f} %)" if applies and marks else "-"])
    head = ["device", "model (random weights)", "dtype", "batch", "mode", "unpatched ms", "patched ms",
            "unpatched tok/s", "patched tok/s", "overhead % wall [p20, p80]", "overhead % CPU time [p20, p80]",
            "CPU target (d512, batch 1): wall / CPU time"]
    return ("Overhead: the median over repeats of patched / unpatched - 1, each pair timed back to back; on CPU also "
            "in process CPU seconds (steadier on a shared machine).\n\n" + table(head, lines))


def new_tokens(config: str) -> str:
    m = re.search(r"new=(\d+)", config)
    return m.group(1) if m else "0"


def note_d(config: str) -> str:
    m = re.search(r"llama-(?:d)?(\d+)", config)
    return m.group(1) if m else "nan"


def training_section(rows: list[dict]) -> str:
    cases = OrderedDict()
    for r in rows:
        if r["op"] in ("train_step", "train_step_peak_memory", "train_step_ratio"):
            cases.setdefault((r["device"], r["config"], r["batch"]), {})[(r["op"], r["provider"])] = r
    lines = []
    for (device, config, batch), c in cases.items():
        step = [spread(c.get(("train_step", v)), 1e3, 3) for v in TRAIN_VARIANTS]
        ratios = [spread(c.get(("train_step_ratio", f"{g}/{v}"))) for g in ("grun", "grun_fast") for v in ("lora", "full")]
        mem = " / ".join(fmt(num(c[("train_step_peak_memory", v)]["median"])) if ("train_step_peak_memory", v) in c
                         else "-" for v in TRAIN_VARIANTS)
        lines.append([device, config, batch] + step + ratios + [mem])
    text = "### GRUN step vs LoRA (peft, r=8, q/k/v/o) and full fine-tuning (same model and rows, interleaved)\n\n"
    text += ("grun: the trainer's step with its shortcuts off (the same work as the peers); grun_fast: with the "
             "trainer's shortcuts (cached prefix or lower layers, LM head at answer tokens).\n\n")
    text += table(["device", "model", "rows (forget+retain x tokens)", "grun ms", "grun_fast ms", "lora ms", "full ms",
                   "grun / lora", "grun / full", "grun_fast / lora", "grun_fast / full",
                   "peak MiB grun / grun_fast / lora / full"], lines)
    ref = OrderedDict()
    for r in rows:
        if r["op"] in ("gd_step", "gd_step_ratio", "calibration"):
            ref.setdefault((r["device"], r["config"], r["batch"], r["unit"].replace("ratio_cpu", "cpu_s")
                            .replace("ratio", "s")), {})[(r["op"], r["provider"], r["mode"])] = r
    rlines = []
    for (device, config, batch, clock), c in ref.items():
        ref_step = c.get(("gd_step", "pyreft", "reference"))
        for (op, provider, mode), r in c.items():
            if op != "gd_step_ratio":
                continue
            ours = c.get(("gd_step", "grun_fast", mode))
            ok = num(r["median"]) <= 0.5
            rlines.append([device, config, batch, "wall" if clock == "s" else "process CPU", mode,
                           spread(ours, 1e3), spread(ref_step, 1e3), spread(r), target_mark(ok)])
    text += "\n### GRUN step vs the reference stack's route (pyreft + pyvene, own venv; interleaved)\n\n"
    text += table(["device", "model", "rows", "clock", "ours (mode)", "ours ms", "pyreft ms",
                   "ours / pyreft (per-round p20, p80)", "target <= 0.5x"], rlines)
    return text


def _target_split(row: dict) -> bool:
    """The evaluation target (>= 5x) is set for a 400-question split (TOFU forget10)."""
    return num(row["rows"]) >= 400


def eval_section(rows: list[dict]) -> str:
    """Evaluation of a whole split, batched vs one row at a time (bench_eval), and its two parts."""
    lines = []
    for r in rows:
        if r["op"] == "eval_split" and r["provider"] == "speedup":
            same = [x for x in rows if x["op"] == "eval_split" and x["device"] == r["device"]
                    and x["config"] == r["config"] and x["mode"] == r["mode"]]
            pick = {x["provider"]: x for x in same if x["provider"] == "one_by_one" or x["batch"] == r["batch"]}
            share = next((x for x in rows if x["op"] == "eval_split" and x["provider"] == "batched_model_share"
                          and x["device"] == r["device"] and x["config"] == r["config"]
                          and x["batch"] == r["batch"]), None)
            lines.append([r["device"], r["config"], r["mode"], r["batch"], spread(pick.get("batched")),
                          spread(pick.get("one_by_one")), spread(r),
                          spread(share) if r["mode"] == "evaluate" else "",
                          target_mark(num(r["median"]) >= 5, r["mode"] == "evaluate" and _target_split(r))])
    return table(["device", "workload", "part", "B", "batched s", "one by one s", "speedup",
                  "share in model compute", "target >= 5x"], lines)


def headline(rows: list[dict]) -> str:
    """The figures the README quotes, each with its target, from the latest rows."""
    items = []
    mod = [r for r in rows if r["op"] == "module_ratio" and r["mode"] == "fwd" and r["d"] == "4096" and r["rows"] == "1"]
    for r in mod[-1:]:
        items.append(f"- Module forward, d=4096, r=4, 1 row: re-orthogonalising module / ours = "
                     f"**{fmt(num(r['median']))}x** (target >= 100x: {target_mark(num(r['median']) >= 100)}) "
                     f"on {r['device']}, {r['date']}")
    for mode, target in (("last_prompt", 3), ("all", 10)):
        for unit, clock in (("fraction", "wall clock"), ("fraction_cpu", "process CPU time")):
            over = [r for r in rows if r["op"] == "generate_overhead" and r["mode"] == mode and r["unit"] == unit
                    and r["config"].startswith("llama-d512") and r["batch"] == "1"]
            # the longest generation measured (the full suite's 64 tokens over --quick's 16), then the latest
            over.sort(key=lambda r: (num(new_tokens(r["config"])), r["date"]))
            for r in over[-1:]:
                pct = num(r["median"]) * 100
                lo, hi = num(r["p20"]) * 100, num(r["p80"]) * 100
                band = f" [p20 {lo:+.1f}, p80 {hi:+.1f}]" if lo == lo and hi == hi else ""
                items.append(f"- `generate` overhead, {mode} mode, d=512, 8 layers, 3 edited layers, batch 1 "
                             f"({clock}): **{pct:+.1f} %**{band} (target <= {target} %: {target_mark(pct <= target)}) "
                             f"on {r['device']}, {r['date']}")
    ref = [r for r in rows if r["op"] == "gd_step_ratio"]
    if ref:
        best = {}
        for r in ref:
            best.setdefault(r["unit"], []).append(r)
        for unit, rs in best.items():
            date = max(r["date"] for r in rs)  # the latest run of the training benchmark
            for r in [x for x in rs if x["date"] == date]:
                clock = "process CPU time" if unit == "ratio_cpu" else "wall clock"
                items.append(f"- Training step vs the reference stack ({clock}, ours = `{r['mode']}`): "
                             f"**{fmt(num(r['median']))}x** (target <= 0.5x: {target_mark(num(r['median']) <= 0.5)}) "
                             f"on {r['device']}, {r['date']}")
    for r in [x for x in rows if x["op"] == "eval_split" and x["mode"] == "evaluate" and x["provider"] == "speedup"]:
        target = (f"target >= 5x: {target_mark(num(r['median']) >= 5)}" if _target_split(r)
                  else "the target is set for 400 questions")
        items.append(f"- Evaluation of a {r['rows']}-question split (scores + generations), batch {r['batch']} vs one "
                     f"row at a time: **{fmt(num(r['median']))}x** ({target}) on {r['device']}, {r['date']}")
    for r in [x for x in rows if x["op"] == "train_step_ratio"][-4:]:
        items.append(f"- Training step {r['provider']} (peers, {r['batch']}): **{fmt(num(r['median']))}x** "
                     f"(reported) on {r['device']}, {r['date']}")
    return "\n".join(items) + "\n" if items else "_no headline rows yet_\n"


def markdown(rows: list[dict], source: str) -> str:
    rows = latest(rows)
    return (
        "# Benchmark results\n\n"
        f"Generated by `python -m bench.report` from `{source}` (latest measurement per key; every row names "
        "its device). Regenerate with `grun-fast bench [--quick]`; on a GPU through `bash bench/gpu_check.sh`. "
        "Medians over repeated runs after warm-up, [p20, p80] in brackets; ratios come from samples measured "
        "side by side in one run. CPU figures come from a shared 2-core machine: read the ratios, not the "
        "absolute times.\n\n"
        "## Headline\n\n" + headline(rows) + "\n"
        "## Op level\n\n" + op_section(rows) + "\n"
        "## Serving (`generate`, prompt 32 tokens; unpatched and patched alternated in one process)\n\n"
        + serving_section(rows) + "\n"
        "## Training\n\n" + training_section(rows) + "\n"
        "## Evaluation of a split (batched vs one row at a time)\n\n" + eval_section(rows)
    )


# ---- plots -------------------------------------------------------------------------------------------


def plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest(rows)
    written = []

    def save(fig, name):
        path = out / name
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
        written.append(path)

    # op: ms vs rows per provider, one panel per mode, at the largest d of the latest device
    ops = pick(rows, op="gated_loreft")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if ops:
        device = ops[-1]["device"]
        d = max((r["d"] for r in ops if r["device"] == device), key=num)
        for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
            for provider in OP_PROVIDERS:
                pts = sorted((num(r["rows"]), num(r["median"])) for r in ops
                             if r["device"] == device and r["d"] == d and r["mode"] == mode and r["provider"] == provider)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=provider)
            ax.set(xscale="log", yscale="log", xlabel="rows", ylabel="ms (median)", title=f"{mode}, d={d}, r=4")
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.suptitle(f"gated LoReFT op on {device}", fontsize=9)
    save(fig, "op.png")

    # serving: overhead % per (model, batch), one bar per mode, on the latest device
    over = pick(rows, op="generate_overhead", unit="fraction")
    clock = "wall clock"
    fig, ax = plt.subplots(figsize=(9, 4))
    if over:
        device = over[-1]["device"]
        if pick(rows, op="generate_overhead", unit="fraction_cpu", device=device):  # CPU: the steadier clock
            over, clock = pick(rows, op="generate_overhead", unit="fraction_cpu"), "process CPU time"
        over = [r for r in over if r["device"] == device]
        def label(r):
            return f"{r['config'].split()[0]}\nnew={new_tokens(r['config'])} b={r['batch']}"

        labels = list(OrderedDict.fromkeys(label(r) for r in sorted(
            over, key=lambda r: (num(note_d(r["config"])), num(new_tokens(r["config"])), num(r["batch"])))))
        for i, mode in enumerate(("last_prompt", "all")):
            vals = {label(r): 100 * num(r["median"]) for r in over if r["mode"] == mode}
            ax.bar([j + 0.4 * i for j in range(len(labels))], [vals.get(l, math.nan) for l in labels], 0.4, label=mode)
        ax.set_xticks([j + 0.2 for j in range(len(labels))], labels, fontsize=7)
        ax.axhline(0, color="black", lw=0.5)
        ax.set(ylabel=f"generate overhead, % of unpatched ({clock})", title=f"serving overhead on {device}")
        ax.legend()
    save(fig, "serving.png")

    # training: step time per variant (peers) and ours / reference ratios
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = pick(rows, op="train_step")
    if steps:
        last = steps[-1]
        same = [r for r in steps if (r["device"], r["config"], r["batch"]) == (last["device"], last["config"], last["batch"])]
        axes[0].bar([r["provider"] for r in same], [num(r["median"]) * 1e3 for r in same],
                    yerr=[[max(0.0, (num(r["median"]) - num(r["p20"])) * 1e3) for r in same],
                          [max(0.0, (num(r["p80"]) - num(r["median"])) * 1e3) for r in same]])
        axes[0].set(ylabel="ms per step (median, p20-p80)", title=f"{last['config']}, {last['batch']}")
    ratios = pick(rows, op="gd_step_ratio")
    if ratios:
        date = ratios[-1]["date"]
        rs = [r for r in ratios if r["date"] == date]
        axes[1].bar([f"{r['mode']}\n{'cpu' if r['unit'] == 'ratio_cpu' else 'wall'}" for r in rs],
                    [num(r["median"]) for r in rs])
        axes[1].axhline(0.5, color="red", ls="--", label="target 0.5x")
        axes[1].axhline(1.0, color="black", lw=0.5)
        axes[1].set(ylabel="ours / pyreft step time", title="vs the reference stack")
        axes[1].legend()
    fig.suptitle(f"training step on {(steps or ratios or [{'device': '-'}])[-1]['device']}", fontsize=9)
    save(fig, "training.png")
    return written


def build(out: str | Path | None = None) -> str:
    """Write the PNGs and RESULTS.md next to results.csv; return the Markdown."""
    out = common.results_dir(out)
    path = common.results_path(out)
    if out.resolve() == common.RESULTS.resolve():  # bench_training_vs_reference.py keeps its own CSV: fold it in
        common.fold_training_csv(out, min_n=3)  # (smoke runs of fewer samples would replace real ones per key)
    rows = common.read_rows(path)
    if not rows:
        raise SystemExit(f"no results in {path}: run `grun-fast bench` first")
    text = markdown(rows, path.name)
    try:
        written = plots(rows, out)
    except ImportError as err:  # a bare GPU machine may lack matplotlib: the table still gets written
        print(f"plots skipped: {err}")
        written = []
    target = out / "RESULTS.md"
    tmp = out / ".RESULTS.md.tmp"
    tmp.write_text(text)
    tmp.replace(target)
    print(f"wrote {target}" + (f" and {', '.join(p.name for p in written)}" if written else ""))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder holding results.csv (default bench/results)")
    args = parser.parse_args(argv)
    print(build(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
