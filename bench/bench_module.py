"""One gated LoReFT module forward at inference: grun_fast.GatedLoReFT vs the reference stack's way.

The reference stack (pyreft's LoreftIntervention, which GRUN's gated module builds on) keeps R
orthonormal with torch.nn.utils.parametrizations.orthogonal on a [d, r] weight (Householder map, the
default for a tall real matrix) and reads the parametrised weight twice per call (R h, then R^T), so R
is re-orthogonalised at every call, whatever the token count. Ours (eval mode) caches the orthonormal
R and the folded parameters and rebuilds them only when a parameter changes.

Both modules hold the same parameters (checked: same output), run under torch.inference_mode on
hidden states [1, T, d] (default d = 4096, r = 4, T = 1), timed alternately. Medians of --runs runs;
each run times --calls calls of ours (per-call mean) and --ref-calls calls of the reference module.

With --modes fwd+bwd, also one training forward+backward of each (ours recomputes R by QR then).

Usage: python -m bench.bench_module [--hidden 4096 --rank 4 --tokens 1 --runs 7 --modes fwd fwd+bwd]
Prints the ratio (target >= 100x) and appends rows to bench/results/results.csv.
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_REPO = str(_Path(__file__).resolve().parents[1])
if _REPO not in _sys.path:  # `python bench/<script>.py` works too, not only `python -m bench.<script>`
    _sys.path.insert(0, _REPO)

import argparse
import sys
import time

import torch
from torch import nn

import grun_fast
from bench.common import append_rows, device_name, now, quantiles


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


def _steps(ref, ours, h: torch.Tensor, mode: str):
    """Zero-argument calls of one forward (inference) or one forward+backward (training) of each module."""
    if mode == "fwd":
        ref.eval(), ours.eval()

        def ours_step():
            with torch.inference_mode():
                ours(h)

        def ref_step():
            with torch.inference_mode():
                ref(h)

        return ours_step, ref_step
    ref.train(), ours.train()
    hg = h.detach().clone().requires_grad_()

    def ours_step():
        out, gate = ours(hg)
        (out.sum() + gate.sum()).backward()

    def ref_step():
        ref(hg).sum().backward()

    return ours_step, ref_step


def measure(hidden: int = 4096, rank: int = 4, tokens: int = 1, runs: int = 7, calls: int = 2000,
            ref_calls: int = 3, modes: tuple[str, ...] = ("fwd",)) -> list[dict]:
    """Rows (results CSV) of ours vs the re-orthogonalising module, alternated run by run, per mode."""
    ref, ours = matched_pair(hidden, rank)
    err = check_same_output(ref, ours, hidden, tokens)
    h = torch.randn(1, tokens, hidden)
    rows = []
    for mode in modes:
        ours_step, ref_step = _steps(ref, ours, h, mode)
        ours_calls = calls if mode == "fwd" else max(1, calls // 20)
        per_call(ours_step, min(50, ours_calls))  # warm-up (builds our cache once)
        per_call(ref_step, 1)
        times = {"ours": [], "ref": []}
        for _ in range(runs):
            times["ours"].append(per_call(ours_step, ours_calls))
            times["ref"].append(per_call(ref_step, ref_calls))
        q = {k: quantiles(v) for k, v in times.items()}
        run_ratios = [r / o for r, o in zip(times["ref"], times["ours"])]
        qr = quantiles(run_ratios)
        ratio = q["ref"][0] / q["ours"][0]
        print(f"gated LoReFT module {mode}, d={hidden}, r={rank}, T={tokens}, fp32, {torch.get_num_threads()} "
              f"threads, torch {torch.__version__}; outputs agree to {err:.1e}")
        print(f"  grun_fast.GatedLoReFT ({'eval, cached R' if mode == 'fwd' else 'train'}): "
              f"median {q['ours'][0] * 1e6:10.1f} us/call (p20 {q['ours'][1] * 1e6:.1f}, p80 {q['ours'][2] * 1e6:.1f})")
        print(f"  re-orthogonalising per call (reference way): median {q['ref'][0] * 1e6:10.1f} us/call "
              f"(p20 {q['ref'][1] * 1e6:.1f}, p80 {q['ref'][2] * 1e6:.1f})")
        print(f"  ratio reference / ours = {ratio:.0f}x (per-run ratios p20 {qr[1]:.0f}x, p80 {qr[2]:.0f}x"
              f"{'; target >= 100x' if mode == 'fwd' else ''})")
        common = {"op": "module", "mode": mode, "rows": tokens, "d": hidden, "r": rank, "dtype": "fp32",
                  "device": device_name(), "date": now(), "n": runs,
                  "versions": f"torch {torch.__version__}; grun_fast {grun_fast.__version__}"}
        for key, provider, how in (("ours", "grun_fast", "eval_cached_R" if mode == "fwd" else "train"),
                                   ("ref", "torch_orthogonal", "reorthogonalise_per_call")):
            rows.append(dict(common, provider=provider, median=q[key][0], p20=q[key][1], p80=q[key][2], unit="s",
                             how=how))
        rows.append(dict(common, op="module_ratio", provider="torch_orthogonal/grun_fast", median=ratio,
                         p20=qr[1], p80=qr[2], unit="ratio"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--runs", type=int, default=7, help="timed runs per module (>= 5)")
    ap.add_argument("--calls", type=int, default=2000, help="calls of ours per run (forward; /20 for fwd+bwd)")
    ap.add_argument("--ref-calls", type=int, default=3, help="calls of the reference module per run")
    ap.add_argument("--modes", nargs="+", default=["fwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    if args.runs < 5:
        ap.error("--runs must be at least 5")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args.hidden, args.rank, args.tokens, args.runs, args.calls, args.ref_calls, tuple(args.modes))
    if not args.no_csv:
        print(f"appended {len(rows)} rows to {append_rows(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
