"""pytest-benchmark suite of the gated LoReFT kernels (see bench/bench_kernels.py for the table/CSV script).

    pytest bench/test_bench_kernels.py --benchmark-group-by=group

On CUDA: rows in {1, 16, 256, 4096, 16384}, d 4096, r 4, bf16, providers triton / torch / reference / compile.
On CPU: rows in {1, 16, 256}, d 256, fp32, one thread, without triton (a smoke run, ratios only).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as B  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROWS = [1, 16, 256, 4096, 16384] if CUDA else [1, 16, 256]
D, R = (4096, 4) if CUDA else (256, 4)
DTYPE = torch.bfloat16 if CUDA else torch.float32
_FNS: dict[str, object] = {}  # one torch.compile object per provider, shared across sizes


@pytest.fixture(autouse=True, scope="module")
def _threads():
    before = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("mode", B.MODES)
@pytest.mark.parametrize("provider", B.PROVIDERS)
def test_gated_loreft(benchmark, provider, mode, rows):
    if provider not in B.available_providers(DEVICE):
        pytest.skip(f"{provider} needs CUDA")
    fn = _FNS.setdefault(provider, B.provider_fn(provider))
    step = B.make_step(provider, mode, B.make_inputs(rows, D, R, DTYPE, DEVICE), fn)

    def run():
        step()
        if CUDA:
            torch.cuda.synchronize()

    run()  # compile / autotune outside the measurement
    benchmark.group = f"{mode} rows={rows} d={D} r={R} {str(DTYPE).removeprefix('torch.')}"
    benchmark.extra_info.update(provider=provider, mode=mode, rows=rows, d=D, r=R, device=DEVICE)
    benchmark.pedantic(run, rounds=20 if CUDA else 10, warmup_rounds=2, iterations=1)
