"""The benchmark suite: op level, serving and training, side by side, then the report (CSV, plots, table).

Each group runs its candidates interleaved in this process (the reference stack's training step runs in
its own venv, as a subprocess, and its rows are folded in from bench/results/training.csv). Every figure
is a median over repeated runs after warm-up; every row names its device. `--quick` covers every group
with small sizes and few repeats (under 3 minutes on 2 CPU cores); the full suite runs the sizes of the
issue that fit the device and says which it skipped.

    python -m bench [--quick] [--out DIR] [--groups op serving training reference eval] [--reference | --no-reference]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

from bench import common

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
GROUPS = ("op", "serving", "training", "reference", "eval")
DEFAULT_GROUPS = GROUPS[:4]   # eval (whole-split evaluation, ~6 minutes on 2 cores) only when asked for
REF_VENV = REPO / ".cache" / "ref_venv"
QUICK_BUDGET_S = 170.0  # the whole --quick run, imports and report included, must stay under 3 minutes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, few repeats, every group (under 3 minutes on 2 CPU cores)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for results.csv, the plots and RESULTS.md (default: bench/results)")
    parser.add_argument("--groups", nargs="+", choices=GROUPS, default=list(DEFAULT_GROUPS),
                        help="which groups to run (reference: the training step vs the reference stack; eval: a "
                             "TOFU split's evaluation, batched vs one row at a time, not run unless named)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on CPU (default 1: on a shared 2-core machine two OpenMP threads "
                             "measure contention; 0 keeps torch's default)")
    ref = parser.add_mutually_exclusive_group()
    ref.add_argument("--reference", action="store_true", default=None,
                     help="run the reference stack's training step even if its venv (.cache/ref_venv) is missing "
                          "(creating it downloads about 1.5 GB from PyPI)")
    ref.add_argument("--no-reference", dest="reference", action="store_false",
                     help="skip the reference stack's training step")
    parser.add_argument("--no-report", action="store_true", help="only append to results.csv")


class Suite:
    def __init__(self, args: Namespace):
        self.args = args
        self.quick = args.quick
        self.device = args.device
        self.cuda = torch.device(self.device).type == "cuda"
        self.out = Path(args.out) if args.out else common.RESULTS
        self.start = time.monotonic()
        self.skipped: list[str] = []
        self.rows = 0

    # ---- plumbing -------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def save(self, rows: list[dict], note: str = "") -> None:
        if note:
            rows = [dict(r, note="; ".join(x for x in (r.get("note", ""), note) if x)) for r in rows]
        common.append_rows(rows, self.out)
        self.rows += len(rows)

    def skip(self, what: str, why: str) -> None:
        line = f"skipped: {what} ({why})"
        self.skipped.append(line)
        print(line, flush=True)

    def header(self, title: str) -> None:
        print(f"\n== {title}  [{self.elapsed():.0f} s, {common.load_average()}]", flush=True)

    # ---- groups ---------------------------------------------------------------------------------------------

    def op(self) -> None:
        from bench import bench_kernels, bench_module

        self.header("op level: gated LoReFT, fused Triton / PyTorch path / torch.compile / naive four products")
        if self.quick:
            sizes, rows, repeats = [4096], [1, 256], 5
            providers = ["torch", "reference"]
            if self.cuda:
                providers[:0] = ["triton"]
            else:
                self.skip("torch.compile provider in --quick", "its first compile takes tens of seconds on CPU")
        else:
            sizes, rows, repeats = [4096, 3584, 2048], [1, 16, 256, 4096, 16384], 30 if self.cuda else 7
            providers = ["triton", "torch", "compile", "reference"] if self.cuda else ["torch", "compile", "reference"]
        if not self.cuda:
            self.skip("fused Triton provider", "needs CUDA")
        dtype = "bf16" if self.cuda else "fp32"
        for d in sizes:
            for mode in ("fwd", "fwd+bwd"):
                mode_rows = rows
                if mode == "fwd+bwd" and not self.cuda and 16384 in rows:
                    mode_rows = [n for n in rows if n != 16384]
                    self.skip(f"fwd+bwd at 16384 rows, d={d}", "on CPU: about 1.3 s per naive call at d=4096, "
                              "left out to keep the CPU run short")
                ns = Namespace(device=self.device, dtype=dtype, providers=list(providers), bandwidth=False,
                               modes=[mode], rows=mode_rows, d=d, r=4, repeats=repeats, warmup=2)
                self.save(bench_kernels.bench(ns), "suite quick" if self.quick else "suite")

        self.header("op level: grun_fast.GatedLoReFT vs a module re-orthogonalising R per call (reference stack)")
        modes = ("fwd",) if self.quick else ("fwd", "fwd+bwd")
        if self.quick:
            self.skip("module fwd+bwd in --quick", "the re-orthogonalising module takes ~2 s per training call at d=4096")
        rows = bench_module.measure(4096, 4, tokens=1, runs=5 if self.quick else 7, calls=200 if self.quick else 1000,
                                    ref_calls=1 if self.quick else 2, modes=modes)
        self.save(rows, "suite quick; module on CPU" if self.quick else "suite; module on CPU")

    def serving(self) -> None:
        from bench import bench_serving

        self.header("serving: generate, unpatched vs patched (last_prompt, all), alternated")
        dtype = torch.bfloat16 if self.cuda else torch.float32
        if self.quick:
            plan = [("tiny", [1], 3, 16), ("d512", [1], 3, 16)]
        elif self.cuda:
            plan = [("tiny", [1, 8, 32], 5, 64), ("d512", [1, 8, 32], 7, 64), ("1b", [1, 8, 32], 5, 64),
                    ("8b", [1, 8, 32], 5, 64)]
        else:
            plan = [("tiny", [1, 8, 32], 5, 64), ("d512", [1], 9, 64), ("d512", [8, 32], 4, 64), ("1b", [1], 3, 16)]
            self.skip("serving 1b at batch 8/32 (and at batch 1 only 16 new tokens, 3 alternations) and the "
                      "8B-shaped model", "too slow on CPU (GPU only)")
        for model, batches, repeats, new_tokens in plan:
            rows = bench_serving.run(model, batches, prompt_len=32, new_tokens=new_tokens, repeats=repeats,
                                     device=self.device, dtype=dtype, modes=["last_prompt", "all"])
            self.save(rows, "suite quick" if self.quick else "suite")
            if self.cuda:
                torch.cuda.empty_cache()

    def training(self) -> None:
        self.header("training: one GRUN step vs LoRA (peft) and full fine-tuning, interleaved")
        if self.cuda:
            self.skip("training peers on CUDA", "the peer benchmark times CPU steps; gpu_check.sh covers the GPU ops")
        else:
            from bench import bench_training_peers

            if self.quick:
                self.skip("peak memory of the training peers in --quick", "one fresh process per variant")
                rows = bench_training_peers.measure(rounds=2, memory=False, threads=self.args.threads, batch=2,
                                                    seq_len=48)
            else:
                rows = bench_training_peers.measure(rounds=5, memory=True, threads=self.args.threads)
            self.save(rows, "suite quick" if self.quick else "suite")

    def reference(self) -> None:
        """The reference stack's GD step (pyreft/pyvene in .cache/ref_venv) vs ours, by its own script."""
        self.header("training: one GRUN step vs the reference stack's route (pyreft/pyvene, own venv)")
        ready = (REF_VENV / ".grun_ref_complete").exists()
        if self.args.reference is False:
            return self.skip("reference-stack training step", "--no-reference")
        if not ready and not self.args.reference:
            return self.skip("reference-stack training step",
                             f"its venv {REF_VENV} is missing; --reference creates it (downloads ~1.5 GB)")
        if self.cuda:
            return self.skip("reference-stack training step on CUDA", "the reference comparison runs on CPU")
        cmd = [sys.executable, str(BENCH / "bench_training_vs_reference.py"), "--threads", str(self.args.threads or 0)]
        from bench.bench_training_vs_reference import MODES

        if self.quick:  # the trainer's default route only
            fast = next((m for m in ("prefix_kv", "answer_head") if m in MODES), list(MODES)[-1])
            cmd += ["--rounds", "1", "--steps", "2", "--warmup", "1", "--modes", fast]
            timeout = QUICK_BUDGET_S - 10 - self.elapsed()
            if timeout < 45:
                return self.skip("reference-stack training step", f"the --quick budget is spent ({self.elapsed():.0f} s)")
        else:
            cmd += ["--rounds", "3", "--steps", "2", "--warmup", "1", "--modes", *MODES]
            timeout = 1800
        if self.quick:  # a smoke run: keep it out of bench/results/training.csv; its ratios are parsed below
            cmd.append("--no-csv")
        since = common.now()
        print("$ " + " ".join(cmd[1:]), flush=True)
        try:
            done = subprocess.run(cmd, cwd=REPO, timeout=timeout, text=True, capture_output=True)
        except subprocess.TimeoutExpired:
            return self.skip("reference-stack training step", f"ran past {timeout:.0f} s")
        lines = done.stdout.strip().splitlines()
        print("\n".join(line for line in lines if "ratio" in line or "calibration" in line or "clock" in line))
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return self.skip("reference-stack training step", f"its script failed (exit {done.returncode})")
        if self.quick:
            rows = parse_reference_ratios(done.stdout)
            if not rows:
                return self.skip("reference-stack training step", "no ratio lines in its output")
            return self.save(rows, "suite quick; parsed from bench_training_vs_reference.py --no-csv")
        folded = common.fold_training_csv(self.out, since=since)
        self.rows += folded
        print(f"folded {folded} rows of bench/results/training.csv into {common.results_path(self.out)}")

    def eval(self) -> None:
        """bench_eval: a whole split's evaluation, batched vs one row at a time (forget01 in --quick)."""
        from bench import bench_eval

        self.header("evaluation of a TOFU split: batched vs one row at a time, interleaved")
        parser = argparse.ArgumentParser()
        bench_eval.add_arguments(parser)
        argv = ["--split", "forget01", "--repeats", "1", "--max-new-tokens", "64"] if self.quick else []
        rows, summary = bench_eval.measure(parser.parse_args(argv))
        print(summary, flush=True)
        self.save(rows, "suite quick" if self.quick else "suite")

    # ---- all ------------------------------------------------------------------------------------------------

    def run(self) -> int:
        if not self.cuda and self.args.threads:
            torch.set_num_threads(self.args.threads)
        print(f"grun_fast bench{' --quick' if self.quick else ''}: {common.device_name(self.device)}; "
              f"torch {torch.__version__}; {common.load_average()}; results -> {common.results_path(self.out)}")
        failed = []
        for group in GROUPS:
            if group not in self.args.groups:
                continue
            try:
                getattr(self, group)()
            except ImportError as err:  # a GPU box without transformers/peft still runs the op group
                self.skip(f"group {group}", f"missing dependency: {err}")
            except Exception as err:  # noqa: BLE001 - one failing group must not lose the others' rows
                failed.append(group)
                print(f"group {group} FAILED: {err!r}", file=sys.stderr)
                import traceback

                traceback.print_exc()
        print(f"\n== done in {self.elapsed():.0f} s: {self.rows} rows appended to {common.results_path(self.out)}"
              f" ({common.load_average()})")
        for line in self.skipped:
            print("  " + line)
        if not self.args.no_report:
            from bench import report

            table = report.build(self.out)
            print()
            print(table)
        return 1 if failed else 0


RATIO_LINE = re.compile(r"^\[(wall|cpu)\] GD step ratio ours\((\w+)\) / reference = ([0-9.eE+-]+)")


def parse_reference_ratios(stdout: str) -> list[dict]:
    """Rows for the `[wall|cpu] GD step ratio ours(MODE) / reference = X` lines of the training benchmark."""
    sys.path.insert(0, str(BENCH / "reference_stack"))
    from workload import load_config

    cfg = load_config()
    m = cfg["model"]
    config = (f"llama d={m['hidden_size']} L={m['num_hidden_layers']} heads={m['num_attention_heads']} "
              f"ffn={m['intermediate_size']} vocab={m['vocab_size']} fp32 layers={cfg['layers']}")
    rows = []
    for line in stdout.splitlines():
        hit = RATIO_LINE.match(line.strip())
        if hit:
            clock, mode, value = hit.groups()
            rows.append(dict(op="gd_step_ratio", provider="grun_fast/pyreft", mode=mode, r=cfg["rank"], dtype="fp32",
                             median=float(value), unit="ratio" if clock == "wall" else "ratio_cpu",
                             device=common.device_name(), date=common.now(), config=config,
                             batch=f"{cfg['batch']}+{cfg['batch']}x{cfg['seq_len']}"))
    return rows


def run(args: Namespace) -> int:
    return Suite(args).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
