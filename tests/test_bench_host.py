"""bench/bench_host.py: host time with the Triton launches stubbed (a smoke run; the figures live in results)."""
from __future__ import annotations

import torch

from bench import bench_host


def test_host_bench_takes_the_kernel_path_with_launches_stubbed():
    threads = torch.get_num_threads()
    try:
        rows = bench_host.run([1, 20], d=64, r=2, dtype_name="fp32", n_calls=2, samples=1)
    finally:
        torch.set_num_threads(threads)
    calls = {(r["mode"], r["rows"]) for r in rows}
    assert ("training-op", 1) in calls and ("inference-op", 20) in calls and ("training-custom-op", 20) in calls
    kernels = {r["rows"]: r["kernels"] for r in rows}
    assert kernels[1] == "bwd+split_apply+split_partial"  # few rows: the split-d forward
    assert kernels[20] == "bwd+fwd"
    assert all(r["unit"] == "us" and r["median"] > 0 for r in rows)
