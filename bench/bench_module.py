"""One gated LoReFT module forward at inference: grun_fast.GatedLoReFT vs the reference stack's way.

The reference stack (pyreft's LoreftIntervention, which GRUN's gated module builds on) keeps R
orthonormal with torch.nn.utils.parametrizations.orthogonal on a [d, r] weight (Householder map, the
default for a tall real matrix) and reads the parametrised weight twice per call (R h, then R^T), so R
is re-orthogonalised at every call, whatever the token count. Ours (eval mode) caches the orthonormal
R and the folded parameters and rebuilds them only when a parameter changes.

Both modules hold the same parameters (checked: same output), run under torch.inference_mode on
hidden states [1, T, d] (default d = 4096, r = 4, T = 1), timed alternately. Medians of --runs runs;
each run times --calls calls of ours (per-call mean) and --ref-calls calls of the reference module.

Usage: python bench/bench_module.py [--hidden 4096 --rank 4 --tokens 1 --runs 7]
Prints the ratio (target >= 100x) and appends rows to bench/results/module.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import grun_fast

RESULTS = Path(__file__).resolve().parent / "results" / "module.csv"
CSV_FIELDS = ["op", "provider", "mode", "x", "median", "p20", "p80", "unit", "n", "device", "date",
              "hidden", "rank", "tokens", "versions"]


class ReorthogonalisingGatedLoReFT(nn.Module):
    """The reference stack's gated LoReFT: R^T is a [d, r] weight under torch's orthogonal
    parametrisation, recomputed at every access (twice per call, as pyreft's LoReFT reads it)."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        rotate = nn.Linear(hidden, rank, bias=False)        # a holder for the [d, r] weight
        rotate.weight = nn.Parameter(torch.empty(hidden, rank))
        nn.init.orthogonal_(rotate.weight)
        self.rotate_layer = torch.nn.utils.parametrizations.orthogonal(rotate)
        self.learned_source = nn.Linear(hidden, rank)
        self.gate_func = nn.Linear(hidden, 1)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate_func(base))
        rotated = torch.matmul(base, self.rotate_layer.weight)                    # R h
        edit = torch.matmul(self.learned_source(base) - rotated, self.rotate_layer.weight.T)
        return base + gate * edit


def matched_pair(hidden: int, rank: int, seed: int = 0):
    """A reference-style module and a grun_fast.GatedLoReFT holding the same R, W, b, w_g, c."""
    torch.manual_seed(seed)
    ref = ReorthogonalisingGatedLoReFT(hidden, rank).eval()
    ours = grun_fast.GatedLoReFT(hidden, rank).eval()
    with torch.no_grad():
        rot = ref.rotate_layer.weight.T.contiguous()                              # R [r, d]
        ours.rotation.copy_(rot)
        # our QR fixes each row's sign; flip W and b with it so the edit is the same function
        sign = torch.sign((ours.orthonormal_rotation() * rot).sum(-1))
        ours.weight.copy_(ref.learned_source.weight * sign[:, None])
        ours.bias.copy_(ref.learned_source.bias * sign)
        ours.gate.weight.copy_(ref.gate_func.weight)
        ours.gate.bias.copy_(ref.gate_func.bias)
    return ref, ours


def check_same_output(ref, ours, hidden: int, tokens: int) -> float:
    h = torch.randn(1, tokens, hidden)
    with torch.inference_mode():
        want = ref(h)
        got = ours(h)[0]
    err = float((got - want).abs().max())
    scale = float((want - h).abs().max())
    if not err <= 1e-4 * max(scale, 1.0):
        raise RuntimeError(f"modules disagree: max |diff| {err:.3g} (edit size {scale:.3g})")
    return err


def per_call(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--runs", type=int, default=7, help="timed runs per module (>= 5)")
    ap.add_argument("--calls", type=int, default=2000, help="calls of ours per run")
    ap.add_argument("--ref-calls", type=int, default=3, help="calls of the reference module per run")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    if args.runs < 5:
        ap.error("--runs must be at least 5")
    if args.threads:
        torch.set_num_threads(args.threads)

    ref, ours = matched_pair(args.hidden, args.rank)
    err = check_same_output(ref, ours, args.hidden, args.tokens)
    h = torch.randn(1, args.tokens, args.hidden)
    times = {"ours": [], "ref": []}
    with torch.inference_mode():
        per_call(lambda: ours(h), 50)          # warm-up (builds our cache once)
        per_call(lambda: ref(h), 1)
        for _ in range(args.runs):
            times["ours"].append(per_call(lambda: ours(h), args.calls))
            times["ref"].append(per_call(lambda: ref(h), args.ref_calls))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ref"] / med["ours"]
    run_ratios = [r / o for r, o in zip(times["ref"], times["ours"])]

    print(f"gated LoReFT forward, d={args.hidden}, r={args.rank}, T={args.tokens}, inference_mode, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; outputs agree to {err:.1e}")
    print(f"  grun_fast.GatedLoReFT (eval, cached R):       median {med['ours'] * 1e6:10.1f} us/call "
          f"(p20 {quantile(times['ours'], .2) * 1e6:.1f}, p80 {quantile(times['ours'], .8) * 1e6:.1f})")
    print(f"  re-orthogonalising per call (reference way): median {med['ref'] * 1e6:10.1f} us/call "
          f"(p20 {quantile(times['ref'], .2) * 1e6:.1f}, p80 {quantile(times['ref'], .8) * 1e6:.1f})")
    print(f"  ratio reference / ours = {ratio:.0f}x (per-run ratios p20 {quantile(run_ratios, .2):.0f}x, "
          f"p80 {quantile(run_ratios, .8):.0f}x; target >= 100x)")

    if not args.no_csv:
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        common = {"x": args.tokens, "device": device_name(), "date": now, "hidden": args.hidden,
                  "rank": args.rank, "tokens": args.tokens,
                  "versions": f"torch {torch.__version__}; grun_fast {grun_fast.__version__}"}
        rows = [
            {"op": "module_forward", "provider": "grun_fast", "mode": "eval_cached_R", "unit": "s",
             "median": f"{med['ours']:.6g}", "p20": f"{quantile(times['ours'], .2):.6g}",
             "p80": f"{quantile(times['ours'], .8):.6g}", "n": args.runs, **common},
            {"op": "module_forward", "provider": "torch_orthogonal", "mode": "reorthogonalise_per_call",
             "unit": "s", "median": f"{med['ref']:.6g}", "p20": f"{quantile(times['ref'], .2):.6g}",
             "p80": f"{quantile(times['ref'], .8):.6g}", "n": args.runs, **common},
            {"op": "module_forward_ratio", "provider": "torch_orthogonal/grun_fast", "mode": "inference",
             "unit": "ratio", "median": f"{ratio:.4g}", "p20": f"{quantile(run_ratios, .2):.4g}",
             "p80": f"{quantile(run_ratios, .8):.4g}", "n": args.runs, **common},
        ]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        new = not RESULTS.exists()
        with RESULTS.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"appended {len(rows)} rows to bench/results/module.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
