"""Host (Python-side) time of one gated LoReFT call with every Triton launch replaced by a no-op stub.

What is left is what the CPU does around the kernels on every call: input validation, folding the
parameters, allocating outputs and workspaces, the custom-op dispatcher and autograd, the dispatch rule.
Issue targets (decode sizes): <= 20 us per inference call, <= 60 us per training call (forward+backward).

    python bench/bench_host.py                     # rows 1 and 16, d 4096, r 4, bf16; appends to results.csv
    python bench/bench_host.py --rows 1 --calls 500 --no-csv
    python bench/bench_host.py --device cuda       # on a GPU: real launches, no stub (see `measure`)

Calls measured (tensors on CPU, `impl="triton"` under TRITON_INTERPRET=1 so the kernel path is taken, the
launches stubbed, so no interpreter runs):
- `inference-op`: `functional.forward_folded(h, folded)` under no_grad (parameters folded once, as served);
- `inference-module`: `GatedLoReFT(h)` in eval mode under no_grad (fold cache lookup + the op), linear gate;
- `training-op`: `functional.gated_loreft(...)` on leaves that require grad, then `autograd.backward` with
  explicit output gradients (validation, the fold, both kernels' launchers, the gradient buffers, the
  autograd engine for this one node; in a real step the engine's fixed cost is shared by the model);
- `training-custom-op`: the same through the custom ops (what torch.compile traces), run eagerly: the
  cost of the dispatcher that eager training skips;
- `calibration-empty` (one `torch.empty` of h's size) and `calibration-autograd-node` (an autograd.Function
  with the same inputs that does nothing, forward + backward): this CPU's price of the unavoidable parts,
  to scale the figures to another host.
Each sample is the mean of --calls calls; median and [p20, p80] over --samples samples, in microseconds.

This is CPU host time on the machine it runs on. On a GPU the same Python runs, plus what the stub hides:
the CUDA caching allocator instead of the CPU one, and Triton's launcher (argument binding, specialisation
key, driver call) for each launch. Those need a GPU to measure (bench/gpu_check.sh).
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_REPO = str(_Path(__file__).resolve().parents[1])
if _REPO not in _sys.path:  # `python bench/bench_host.py` works too, not only `python -m bench.bench_host`
    _sys.path.insert(0, _REPO)

import argparse
import contextlib
import inspect
import os
import sys
import time
from typing import Callable, Iterator

import torch

from bench.common import append_rows, device_name, load_average, now, quantiles, results_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_US = {"inference-op": 20.0, "inference-module": 20.0, "training-op": 60.0, "training-custom-op": 60.0}
NOTE = ("Triton launches replaced by a no-op stub: CPU host time of validation, folding, allocation and "
        "dispatch; GPU host time (CUDA allocator, Triton launcher) still needs a GPU")
GPU_NOTE = ("real launches, calls queued back to back, one synchronize per sample: per call = max(host time, GPU "
            "time); thread CPU time includes the synchronize's spin")


class _NoLaunch:
    """Stands for a compiled kernel: `kernel[grid](*args, **kwargs)` does nothing."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


@contextlib.contextmanager
def stubbed_launches() -> Iterator[list[str]]:
    """Every Triton launch of grun_fast.kernels becomes a no-op; yields the names of the kernels asked for."""
    from grun_fast.kernels import gated_loreft as K

    asked: list[str] = []
    real = K._kernel
    stub = _NoLaunch()

    def fake(name: str, interpret: bool):
        asked.append(name)
        return stub

    old_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors may take impl="triton"
    K._kernel = fake
    try:
        yield asked
    finally:
        K._kernel = real
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env


def make_calls(rows: int, d: int, r: int, dtype: torch.dtype, device: str = "cpu"
               ) -> dict[str, Callable[[], object]]:
    """The three calls of the module docstring, on random inputs."""
    from grun_fast import functional
    from grun_fast.module import GatedLoReFT

    torch.manual_seed(0)
    module = GatedLoReFT(d, r, gate="linear", device=device).eval()
    h = torch.randn(1, rows, d, device=device).to(dtype)
    with torch.no_grad():
        folded = module.folded(dtype, h.device)
        rot = module.orthonormal_rotation().detach()
    params = [rot, module.weight.detach(), module.bias.detach(), module.gate.weight.detach().reshape(-1),
              module.gate.bias.detach()]
    leaves = [h.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
    dout = torch.randn(1, rows, d, device=device).to(dtype)
    dgate = torch.randn(1, rows, device=device)

    def inference_op():
        with torch.no_grad():
            return functional.forward_folded(h, folded, impl="triton")

    def inference_module():
        with torch.no_grad():
            return module(h, impl="triton")

    def training_op():
        for t in leaves:
            t.grad = None
        out, gate = functional.gated_loreft(*leaves, impl="triton")
        torch.autograd.backward([out, gate], [dout, dgate])
        return leaves[0].grad

    calls = {"inference-op": inference_op, "inference-module": inference_module, "training-op": training_op}
    entry = functional._kernels().gated_loreft_triton
    if "use_custom_op" in inspect.signature(entry).parameters:  # absent before the eager autograd.Function
        def training_custom_op():
            for t in leaves:
                t.grad = None
            out, gate = entry(*leaves, None, None, False, use_custom_op=True)
            torch.autograd.backward([out, gate], [dout, dgate])
            return leaves[0].grad

        calls["training-custom-op"] = training_custom_op

    # calibration: what this CPU charges for one allocation and for one autograd node doing nothing
    def calibration_empty():
        return torch.empty((rows, d), dtype=dtype, device=device)

    def calibration_autograd_node():
        for t in leaves:
            t.grad = None
        out, gate = _Nothing.apply(*leaves)
        torch.autograd.backward([out, gate], [dout, dgate])
        return leaves[0].grad

    calls["calibration-empty"] = calibration_empty
    calls["calibration-autograd-node"] = calibration_autograd_node
    return calls


class _Nothing(torch.autograd.Function):
    """An autograd node with the op's inputs and outputs that computes nothing (the engine's own cost)."""

    @staticmethod
    def forward(ctx, h, *params):
        ctx.shapes = [p.shape for p in params]
        return torch.empty_like(h), h.new_empty(h.shape[:-1], dtype=torch.float32)

    @staticmethod
    def backward(ctx, dout, dgate):
        return (torch.empty_like(dout), *(dout.new_empty(s, dtype=torch.float32) for s in ctx.shapes))


CLOCKS = {"thread CPU time": time.thread_time, "wall clock": time.perf_counter}


def measure(calls: dict[str, Callable[[], object]], n_calls: int, samples: int, warmup: int = 50,
            device: str = "cpu") -> dict[str, dict[str, list[float]]]:
    """Seconds per call by clock (CLOCKS): `samples` means of `n_calls` calls each, the candidates interleaved
    per sample. Thread CPU time leaves out the time other processes hold the core (a shared machine). On
    CUDA the calls are queued back to back with one synchronize per sample (inside the timing): a call then
    costs max(host time, GPU time), the host time whenever the host is the slower side."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    out: dict[str, dict[str, list[float]]] = {k: {c: [] for c in CLOCKS} for k in calls}
    names = list(calls)
    for i in range(samples):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            fn = calls[name]
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(n_calls):
                fn()
            sync()
            out[name]["thread CPU time"].append((time.thread_time() - cpu) / n_calls)
            out[name]["wall clock"].append((time.perf_counter() - wall) / n_calls)
    return out


def run(rows_list: list[int], d: int, r: int, dtype_name: str, n_calls: int, samples: int,
        device: str = "cpu") -> list[dict]:
    """CPU: the launches stubbed (host time only). CUDA: the real kernels, no stub (GPU_NOTE)."""
    dtype = DTYPES[dtype_name]
    results = []
    with (stubbed_launches() if device == "cpu" else contextlib.nullcontext(None)) as asked:
        for rows in rows_list:
            calls = make_calls(rows, d, r, dtype, device)
            kernels = []
            if asked is not None:
                asked.clear()
                for fn in calls.values():
                    fn()
                kernels = sorted(set(asked))
                if not kernels:
                    raise RuntimeError("no kernel was launched: the calls did not take the Triton path")
            times = measure(calls, n_calls, samples, device=device)
            for name, by_clock in times.items():
                for clock, secs in by_clock.items():
                    median, p20, p80 = quantiles([s * 1e6 for s in secs])
                    results.append({
                        "op": "host_time", "provider": "triton-stubbed" if device == "cpu" else "triton", "mode": name, "rows": rows, "d": d,
                        "r": r, "dtype": dtype_name, "median": median, "p20": p20, "p80": p80, "unit": "us",
                        "device": device_name(device), "date": now(), "config": clock,
                        "note": NOTE if device == "cpu" else GPU_NOTE,
                        "target_us": TARGET_US.get(name, ""), "kernels": "+".join(kernels), "calls": n_calls,
                        "samples": samples, "load": load_average(), "torch": torch.__version__,
                    })
    return results


def print_table(results: list[dict]) -> None:
    print(f"{'call':26s} {'rows':>5s} {'clock':16s} {'median us':>10s} {'p20':>8s} {'p80':>8s} {'target':>7s}")
    for row in results:
        target = row["target_us"]
        verdict = f"{target:6.0f}  {'met' if row['median'] <= target else 'NOT met'} (CPU host time)" if target else ""
        print(f"{row['mode']:26s} {row['rows']:5d} {row['config']:16s} {row['median']:10.1f} {row['p20']:8.1f} "
              f"{row['p80']:8.1f} {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--calls", type=int, default=200, help="calls averaged per sample")
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: real launches, calls queued back to back (per call = max(host, GPU))")
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--csv", type=_Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"device: {device_name('cpu')}; torch {torch.__version__}; {load_average()}")
    if args.device == "cuda":
        from bench.bench_kernels import ensure_importable  # the GPU machine may not have grun_fast installed

        ensure_importable()
    results = run(args.rows, args.d, args.r, args.dtype, args.calls, args.samples, args.device)
    print_table(results)
    if not args.no_csv:
        print(f"appended {len(results)} rows to {append_rows(results, path=args.csv or results_path())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
