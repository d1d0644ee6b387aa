"""Kernel benchmark of gated LoReFT: fused Triton vs the PyTorch path vs the naive reference vs torch.compile.

    python bench/bench_kernels.py                 # rows 1..16384, d 4096, r 4, bf16 (CUDA)
    python bench/bench_kernels.py --quick         # small sizes; runs on CPU (providers that exist there)
    python bench/bench_kernels.py --check         # kernels vs a float64 reference (outputs, all gradients)
    python bench/bench_kernels.py --sweep         # Triton block sizes at the largest row count (CUDA)

Prints a table and appends rows to bench/results/results.csv (median/p20/p80 in milliseconds; peak_mib is
the peak CUDA memory of one forward+backward above the inputs). On CUDA each timed call starts with a
cold L2 (a 256 MiB buffer is zeroed before it, outside the timed region) and providers run round-robin;
with --bandwidth the copy bandwidth is measured too and each row shows the fraction of the roofline
reached (bytes: read h + write out forward; plus read h, dout + write dh backward).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def ensure_importable() -> str:
    """Make `grun_fast` and `grun_fast.kernels` importable from the checkout when the package is not
    installed (the GPU machine): returns how ("installed", "checkout", "stub")."""
    try:
        import grun_fast.kernels.gated_loreft  # noqa: F401

        return "installed"
    except ImportError:
        pass
    how = "checkout"
    try:
        import grun_fast  # noqa: F401
    except ImportError:  # a dependency of the full package is missing: load the submodules we need only
        for name in [m for m in sys.modules if m == "grun_fast" or m.startswith("grun_fast.")]:
            del sys.modules[name]
        stub = types.ModuleType("grun_fast")
        stub.__path__ = [str(REPO / "grun_fast")]
        sys.modules["grun_fast"] = stub
        how = "stub"
    spec = importlib.util.spec_from_file_location(
        "grun_fast.kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["grun_fast.kernels"] = module
    spec.loader.exec_module(module)
    sys.modules["grun_fast"].kernels = module
    return how


IMPORT_MODE = ensure_importable()

from bench.common import append_rows, cuda_peak_mib, device_name, quantiles, results_path, today  # noqa: E402
from grun_fast import functional, reference  # noqa: E402
from grun_fast.kernels import gated_loreft as K  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("triton", "torch", "reference", "compile")
EXTRA_PROVIDERS = ("triton-det",)  # the kernels with deterministic=True (on request: --providers)
MODES = ("fwd", "fwd+bwd")
_FNS: dict[str, Callable] = {}  # provider functions shared by every size (compile once, dynamic shapes)


# ---- inputs and steps ----------------------------------------------------------------------------------


def make_inputs(rows: int, d: int, r: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Hidden states in `dtype`, fp32 parameters (as the module keeps them), upstream gradients."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0].T.float()
    params = {
        "rotation": rot,
        "weight": rot + torch.randn(r, d, generator=g) / d**0.5,
        "bias": torch.randn(r, generator=g),
        "gate_weight": 3 * torch.randn(d, generator=g) / d**0.5,
        "gate_bias": torch.randn(1, generator=g),
    }
    return {
        "h": torch.randn(rows, d, generator=g).to(device=device, dtype=dtype),
        "params": {k: v.to(device) for k, v in params.items()},
        "dout": torch.randn(rows, d, generator=g).to(device=device, dtype=dtype),
        "dgate": torch.randn(rows, generator=g).to(device),
    }


def provider_fn(provider: str) -> Callable:
    """(h, R, W, b, wg, c) -> (out, gate) for one provider."""
    if provider == "triton":
        return lambda *a: functional.gated_loreft(*a, impl="triton")
    if provider == "triton-det":
        return lambda *a: functional.gated_loreft(*a, impl="triton", deterministic=True)
    if provider == "torch":
        return lambda *a: functional.gated_loreft(*a, impl="torch")
    if provider == "reference":
        return reference.gated_loreft
    if provider == "compile":
        return torch.compile(lambda *a: functional.gated_loreft(*a, impl="torch"), dynamic=True)
    raise ValueError(f"unknown provider {provider!r}")


def available_providers(device: str) -> list[str]:
    names = ["torch", "reference", "compile"]
    if device == "cuda":
        names[:0] = ["triton", "triton-det"]
    return names


def make_step(provider: str, mode: str, inputs: dict, fn: Callable | None = None) -> Callable[[], object]:
    """A zero-argument call doing one forward (no grad) or one forward+backward of `provider`."""
    fn = fn or provider_fn(provider)
    h = inputs["h"]
    p = inputs["params"]
    order = ("rotation", "weight", "bias", "gate_weight", "gate_bias")
    if mode == "fwd":
        args = (h, *(p[k] for k in order))
        if provider in ("triton", "torch"):  # inference as the module runs it: parameters folded once
            folded = functional.fold(*args[1:], h.dtype)

            def step():
                with torch.no_grad():
                    return functional.forward_folded(h, folded, impl=provider)

            return step

        def step():
            with torch.no_grad():
                return fn(*args)

        return step
    leaves = [h.detach().clone().requires_grad_()] + [p[k].detach().clone().requires_grad_() for k in order]
    dout, dgate = inputs["dout"], inputs["dgate"]

    def step():
        for t in leaves:
            t.grad = None
        out, gate = fn(*leaves)
        torch.autograd.backward([out, gate], [dout, dgate.to(gate.dtype)])
        return leaves[0].grad

    step.leaves = leaves  # so peak_memory_mib can drop the previous call's gradients first
    return step


# ---- timing ---------------------------------------------------------------------------------------------


class Timer:
    """Round-robin timing of several candidates; CUDA events with a cold L2 on CUDA, perf_counter on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device == "cuda" else None

    def run(self, candidates: dict[str, Callable], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
        samples: dict[str, list[float]] = {k: [] for k in candidates}
        for i in range(warmup + repeats):
            for name, fn in candidates.items():
                seconds = self._once(fn)
                if i >= warmup:
                    samples[name].append(seconds)
        return samples

    def _once(self, fn: Callable) -> float:
        if self.device == "cuda":
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def peak_memory_mib(step: Callable, device: str) -> float | str:
    """Peak CUDA memory of one call above what was allocated before it (the previous grads dropped)."""
    for t in getattr(step, "leaves", []):
        t.grad = None
    return cuda_peak_mib(step, device)


def copy_bandwidth(device: str, nbytes: int = 2**30, repeats: int = 20) -> float:
    """Device copy bandwidth in bytes/s (bytes read + bytes written), median over repeats."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    timer = Timer(device)
    samples = timer.run({"copy": lambda: dst.copy_(src)}, repeats=repeats)["copy"]
    return 2 * src.numel() * src.element_size() / sorted(samples)[len(samples) // 2]


def roofline_bytes(mode: str, rows: int, d: int, itemsize: int) -> int:
    """Compulsory DRAM traffic: forward reads h and writes out; backward reads h and dout, writes dh."""
    fwd = 2 * rows * d * itemsize
    return fwd if mode == "fwd" else fwd + 3 * rows * d * itemsize


# ---- the benchmark --------------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> list[dict]:
    device = args.device
    dtype = DTYPES[args.dtype]
    providers = [p for p in args.providers if p in available_providers(device)]
    skipped = sorted(set(args.providers) - set(providers))
    if skipped:
        print(f"skipping providers not available on {device}: {', '.join(skipped)}")
    bandwidth = copy_bandwidth(device) if args.bandwidth and device == "cuda" else None
    if bandwidth:
        print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write)")
    fns = {p: _FNS.setdefault(p, provider_fn(p)) for p in providers}  # one torch.compile object per run
    timer = Timer(device)
    results = []
    for mode in args.modes:
        for rows in args.rows:
            inputs = make_inputs(rows, args.d, args.r, dtype, device)
            steps = {p: make_step(p, mode, inputs, fns[p]) for p in providers}
            for p in list(steps):  # a provider that fails (say, no compiler for inductor) is dropped, not fatal
                try:
                    steps[p]()
                except Exception as err:  # noqa: BLE001 - report and go on with the others
                    print(f"provider {p} failed at {mode} rows={rows}: {err!r:.300}; dropped")
                    del steps[p]
                    providers.remove(p)
            samples = timer.run(steps, repeats=args.repeats, warmup=args.warmup)
            for p in providers:
                median, p20, p80 = quantiles(samples[p])
                row = {
                    "op": "gated_loreft", "provider": p, "mode": mode, "rows": rows, "d": args.d, "r": args.r,
                    "dtype": args.dtype, "median": median * 1e3, "p20": p20 * 1e3, "p80": p80 * 1e3, "unit": "ms",
                    "peak_mib": peak_memory_mib(steps[p], device) if mode == "fwd+bwd" else "",
                    "device": device_name(device), "date": today(),
                }
                if bandwidth:
                    need = roofline_bytes(mode, rows, args.d, dtype.itemsize) / bandwidth
                    row["roofline"] = need / median
                results.append(row)
            del inputs, steps
    print_table(results)
    return results


def print_table(rows: list[dict]) -> None:
    by_case: dict[tuple, dict] = {}
    for row in rows:
        by_case.setdefault((row["mode"], row["rows"]), {})[row["provider"]] = row
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    head = f"{'mode':8s} {'rows':>6s} " + " ".join(f"{p + ' ms':>13s}" for p in providers)
    roof = [p for p in ("triton", "torch") if p in providers] if any("roofline" in r for r in rows) else []
    ratio_to = "torch" if "torch" in providers else None
    if "triton" in providers and ratio_to:
        head += f" {'torch/triton':>13s}"
    head += "".join(f" {p + ' %roof':>13s}" for p in roof)
    if any(r.get("peak_mib") not in ("", None) for r in rows):
        head += " " + " ".join(f"{p + ' MiB':>13s}" for p in providers)
    print(head)
    for (mode, n), case in by_case.items():
        line = f"{mode:8s} {n:6d} " + " ".join(f"{case[p]['median']:13.4f}" for p in providers if p in case)
        if "triton" in case and ratio_to in case:
            line += f" {case[ratio_to]['median'] / case['triton']['median']:13.2f}"
        line += "".join(f" {100 * case[p].get('roofline', float('nan')):12.1f}%" for p in roof if p in case)
        if any(case[p].get("peak_mib") not in ("", None) for p in case):
            line += " " + " ".join(f"{case[p]['peak_mib']:13.1f}" for p in providers if p in case)
        print(line)


# ---- correctness check (float64 reference) --------------------------------------------------------------


def _safe_threshold(gate: torch.Tensor) -> float:
    """Midpoint of the widest gap between neighbouring gates in the middle half: no row sits near it, so
    the TF32 gate of 16-bit inputs (about 1e-4 off) selects the same rows as the float64 reference."""
    g = gate.flatten().sort().values
    lo, hi = len(g) // 4, max(len(g) // 4 + 1, 3 * len(g) // 4)
    i = lo + int((g[lo + 1: hi + 1] - g[lo:hi]).argmax())
    return float((g[i] + g[i + 1]) / 2)


def _contribution_scales(tensors, logit, rows, threshold, dout, dgate) -> list[torch.Tensor]:
    """Per gradient (h, R, W, b, then w_g, c or the logit): the sum over rows of the absolute per-row
    contributions, in float64. fp32 rounding in a sum over rows is relative to these, not to a result
    that cancelled (the gate-bias gradient can be 1e-4 of its terms)."""
    h, R, W, b = (t.detach().double() for t in tensors[:4])
    s = torch.sigmoid(logit)
    keep = torch.ones_like(s, dtype=torch.bool) if rows is None else rows.clone()
    if threshold is not None:
        keep &= s >= threshold
    k = keep.double()
    y, g = dout.double(), dgate.double()
    p, q = h @ (W - R).T + b, y @ R.T
    da = (((q * p).sum(-1) * k).abs() + g.abs()) * s * (1 - s)
    dp, sp = (q * (s * k)[:, None]).abs(), (p * (s * k)[:, None]).abs()
    ha, ya = h.abs(), y.abs()
    linear = len(tensors) == 6
    wg = tensors[4].detach().double().abs().reshape(-1) if linear else None
    scales = [ya + dp @ (W - R).abs() + (da[:, None] * wg if linear else 0), sp.T @ ya + dp.T @ ha, dp.T @ ha,
              dp.sum(0)]
    return scales + ([da @ ha, da.sum()] if linear else [da])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CHECK_CASES = [  # rows, d, r, rows-mask, threshold, deterministic, gate (few: each new case compiles kernels)
    (1, 4096, 4, False, False, False, "linear"),  # <= 16 rows: the split-d forward
    (16, 3584, 7, True, True, False, "logit"),
    (257, 4096, 4, True, False, True, "linear"),
    (4096, 4096, 4, False, True, False, "linear"),
    (100, 123, 7, True, False, False, "logit"),
    (64, 3584, 64, False, False, True, "linear"),
    (300, 5120, 1, True, True, False, "linear"),
]
QUICK_CHECK_CASES = [
    (1, 96, 4, False, False, False, "linear"),
    (45, 123, 7, True, True, True, "linear"),
    (30, 80, 1, True, False, False, "logit"),
]


def check(device: str, dtypes: list[str], quick: bool) -> list[dict]:
    """Kernels vs float64 on fresh random inputs: outputs, gate and every gradient; rows outside the mask
    bit-identical; deterministic mode bitwise reproducible. Tolerance: 1e-5 (fp32), 2e-2 (bf16/fp16),
    relative to the larger of each gradient and its summed absolute per-row contributions (see
    _contribution_scales), or 3x the error of the same reference run in fp32 if that is larger."""
    results = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for n, d, r, use_rows, use_thr, det, gate_kind in (QUICK_CHECK_CASES if quick else CHECK_CASES):
            inp = make_inputs(n, d, r, dtype, device, seed=n * 7 + d)
            p = inp["params"]
            h = inp["h"]
            tensors = [h, p["rotation"], p["weight"], p["bias"]]
            if gate_kind == "linear":
                tensors += [p["gate_weight"], p["gate_bias"]]
            else:
                tensors += [torch.randn(n, device=device) * 2]
            rows = (torch.rand(n, device=device) < 0.6) if use_rows else None
            logit64 = (h.double() @ p["gate_weight"].double() + p["gate_bias"].double()) if gate_kind == "linear" \
                else tensors[4].double()
            threshold = _safe_threshold(torch.sigmoid(logit64)) if use_thr and n > 3 else None

            def run_kernel(deterministic=det):
                leaves = [t.detach().clone().requires_grad_() for t in tensors]
                fn = functional.gated_loreft if gate_kind == "linear" else functional.gated_loreft_logit
                out, gate = fn(*leaves, rows, gate_threshold=threshold, impl="triton", deterministic=deterministic)
                torch.autograd.backward([out, gate], [inp["dout"], inp["dgate"]])
                return out, gate, [t.grad for t in leaves]

            def run_ref(ct):
                leaves = [t.detach().to(ct).requires_grad_() for t in tensors]
                lg = leaves[0] @ leaves[4] + leaves[5] if gate_kind == "linear" else leaves[4]
                out, gate = reference.gated_loreft_logit(*leaves[:4], lg, rows, threshold)
                torch.autograd.backward([out, gate], [inp["dout"].to(ct), inp["dgate"].to(ct)])
                return out, gate, [t.grad for t in leaves]

            label = f"{dtype_name:5s} n={n} d={d} r={r} {gate_kind}"
            try:
                out, gate, grads = run_kernel()
            except Exception as err:  # noqa: BLE001 - one GPU run should show every failing case
                print(f"{label}: kernel raised {err!r:.500}  FAIL")
                results.append({"dtype": dtype_name, "case": label, "ok": False})
                continue
            r_out, r_gate, r_grads = run_ref(torch.float64)
            _, _, f_grads = run_ref(torch.float32)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            names = ["h", "R", "W", "b"] + (["w_g", "c"] if gate_kind == "linear" else ["logit"])
            errs = {"out": _rel(out, r_out), "gate": _rel(gate, r_gate)}
            ok = errs["out"] < tol and errs["gate"] < tol
            scales = _contribution_scales(tensors, logit64, rows, threshold, inp["dout"], inp["dgate"])
            for name, g, w, f, sc in zip(names, grads, r_grads, f_grads, scales):
                errs["d" + name] = _rel(g, w)
                allowed = max(tol * max(1.0, sc.norm().item() / w.norm().clamp_min(1e-300).item()), 3 * _rel(f, w))
                ok &= errs["d" + name] < allowed
            keep = torch.ones(n, dtype=torch.bool, device=device) if rows is None else rows.clone()
            if threshold is not None:
                keep &= r_gate >= threshold
            ok &= bool(torch.equal(out[~keep], h[~keep]))
            if det:
                _, _, again = run_kernel()
                ok &= all(torch.equal(a, b) for a, b in zip(grads, again))
            results.append({"dtype": dtype_name, "case": f"n={n} d={d} r={r} {gate_kind}"
                            + (" rows" if use_rows else "") + (" thr" if use_thr else "") + (" det" if det else ""),
                            "worst": max(errs.values()), "worst_of": max(errs, key=errs.get), "ok": ok})
            print(f"{dtype_name:5s} {results[-1]['case']:38s} worst rel err {results[-1]['worst']:.2e} "
                  f"({results[-1]['worst_of']})  {'ok' if ok else 'FAIL'}")
    return results


def check_compile(device: str) -> bool:
    """The custom op under torch.compile(fullgraph=True): no graph break, same loss and gradients as eager."""
    inp = make_inputs(48, 256, 4, torch.float32, device, seed=1)
    p = inp["params"]
    tensors = [inp["h"], p["rotation"], p["weight"], p["bias"], p["gate_weight"], p["gate_bias"]]
    rows = torch.rand(48, device=device) < 0.5

    dout, dgate = inp["dout"].double(), inp["dgate"].double()

    def loss_fn(*t):
        # The loss is summed in float64: inductor reorders an fp32 sum of 12k terms by ~1e-5 relative (seen on
        # an H200, with the op's outputs bitwise equal and its gradients within 1e-7), which is not the op's error.
        out, gate = functional.gated_loreft(*t, rows, impl="triton")
        return (out.double() * dout).sum() + (gate.double() * dgate).sum()

    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(loss_fn, backend=backend, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    ok = all(torch.allclose(a, e, rtol=1e-5, atol=1e-6) for a, e in zip(*results))
    print(f"torch.compile(fullgraph=True, backend={backend}) matches eager: {'ok' if ok else 'FAIL'}")
    return ok


def sweep(device: str, rows: int, d: int, r: int, dtype: torch.dtype, repeats: int) -> None:
    """Time a few Triton block configurations (set through CONFIG_OVERRIDES) at one size."""
    inputs = make_inputs(rows, d, r, dtype, device)
    configs = {
        "fwd": [(16, 128, 4), (32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8), (16, 64, 2)],
        "fwd+bwd": [(16, 64, 4), (32, 64, 4), (32, 128, 8), (64, 64, 8), (16, 128, 4)],
    }
    timer = Timer(device)
    for mode, options in configs.items():
        key = "fwd" if mode == "fwd" else "bwd"
        for bm, bd, warps in options:
            K.CONFIG_OVERRIDES.clear()
            K.CONFIG_OVERRIDES.update({f"{key}_block_m": bm, f"{key}_block_d": bd, f"{key}_warps": warps})
            step = make_step("triton", mode, inputs)
            median, p20, p80 = quantiles(timer.run({"t": step}, repeats=repeats)["t"])
            print(f"sweep {mode:8s} rows={rows} {key} BLOCK_M={bm:3d} BLOCK_D={bd:3d} warps={warps}: "
                  f"{median * 1e3:.4f} ms [{p20 * 1e3:.4f}, {p80 * 1e3:.4f}]")
    K.CONFIG_OVERRIDES.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+")
    parser.add_argument("--d", type=int)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS + EXTRA_PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bandwidth", action="store_true", help="measure copy bandwidth, report %% of roofline")
    parser.add_argument("--no-csv", action="store_true", help="do not append to bench/results/results.csv")
    parser.add_argument("--csv", type=Path, default=None, help="the results CSV (default bench/results/results.csv)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: two OpenMP threads on a loaded 2-core box thrash)")
    parser.add_argument("--check", action="store_true", help="correctness vs float64 instead of timing")
    parser.add_argument("--sweep", action="store_true", help="time Triton block sizes instead")
    args = parser.parse_args(argv)
    quick = args.quick or args.device == "cpu"
    args.rows = args.rows or ([1, 16, 256] if quick else [1, 16, 256, 4096, 16384])
    args.d = args.d or (256 if quick else 4096)
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    args.repeats = args.repeats or (5 if quick else 30)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; grun_fast import: {IMPORT_MODE}")
    if args.check:
        if args.device == "cpu":
            import os

            os.environ["TRITON_INTERPRET"] = "1"  # the kernels run in the interpreter on CPU tensors
        results = check(args.device, ["fp32", "bf16"], quick=quick)
        try:
            compiled_ok = check_compile(args.device)
        except Exception as err:  # noqa: BLE001 - report it with the other results
            print(f"torch.compile check raised {err!r:.500}")
            compiled_ok = False
        results.append({"ok": compiled_ok})
        bad = [r for r in results if not r["ok"]]
        print(f"check: {len(results) - len(bad)}/{len(results)} ok")
        return 1 if bad else 0
    if args.sweep:
        if args.device != "cuda":
            print("sweep needs CUDA")
            return 1
        sweep(args.device, max(args.rows), args.d, args.r, DTYPES[args.dtype], args.repeats)
        return 0
    results = bench(args)
    if not args.no_csv:
        print(f"appended {len(results)} rows to {append_rows(results, path=args.csv or results_path())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
