"""What every benchmark shares: interleaved timing, quantiles, device names, and the one CSV format.

Timings on a noisy CPU only mean something side by side: `time_interleaved` runs the candidates
round-robin so that drift hits them all alike, and reports each candidate's samples.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["op", "provider", "mode", "x", "median", "p20", "p80", "unit", "device", "date", "config", "batch"]


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80)."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    cuts = statistics.quantiles(ordered, n=10, method="inclusive")
    return statistics.median(ordered), cuts[1], cuts[7]


def time_interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: str | torch.device = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, measured round-robin `repeats` times after `warmup` rounds."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(warmup + repeats):
        for name, fn in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_ >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def append_rows(file_name: str, rows: list[dict], directory: Path = RESULTS) -> Path:
    """Append rows (dicts over COLUMNS; missing ones left empty) to results/<file_name>."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file_name
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def today() -> str:
    return _dt.date.today().isoformat()
