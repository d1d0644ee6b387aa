"""What every benchmark shares: timing, quantiles, device names, and the one results CSV.

Timings on a noisy CPU only mean something side by side: `time_interleaved` runs the candidates
round-robin so that drift hits them all alike, and reports each candidate's samples. Every benchmark
appends to one file, `bench/results/results.csv` (or `$GRUN_BENCH_OUT/results.csv`), with the columns
of COLUMNS; keys a benchmark has beyond those go into `note` as `key=value` pairs, so nothing is lost.

Imports only torch and the standard library: bench/gpu_check.sh runs on a machine where grun_fast is not
installed.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
CSV_NAME = "results.csv"
COLUMNS = ["op", "provider", "mode", "rows", "d", "r", "dtype", "median", "p20", "p80", "unit", "device", "date",
           "config", "batch", "note"]
OUT_ENV = "GRUN_BENCH_OUT"


# ---- device and time --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str | torch.device = "cpu") -> str:
    """The name every row carries: the GPU's name, or the CPU model with its cores and torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def now() -> str:
    """UTC timestamp of a measurement (rows are kept in the order measured; the latest per key wins)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


today = now  # old name, kept for scripts that call it


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "load unknown"


# ---- timing -----------------------------------------------------------------------------------------------


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80), linearly interpolated."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    cuts = statistics.quantiles(ordered, n=10, method="inclusive")
    return statistics.median(ordered), cuts[1], cuts[7]


def time_interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: str | torch.device = "cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, measured round-robin `repeats` times after `warmup` rounds.
    The order rotates every round, so no candidate always runs right after the same other one. `clock`:
    wall time by default; `time.process_time` (this process's CPU time) for single-threaded CPU work on a
    machine that other jobs share, where wall time mostly measures the others."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = clock()
            candidates[name]()
            synchronize(device)
            if round_ >= warmup:
                samples[name].append(clock() - start)
    return samples


def cuda_peak_mib(fn: Callable[[], object], device: str | torch.device) -> float | str:
    """Peak CUDA memory of one call above what was allocated before it ('' off CUDA)."""
    if torch.device(device).type != "cuda":
        return ""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ---- the results CSV --------------------------------------------------------------------------------------


def results_dir(directory: str | Path | None = None) -> Path:
    return Path(directory or os.environ.get(OUT_ENV) or RESULTS)


def results_path(directory: str | Path | None = None) -> Path:
    return results_dir(directory) / CSV_NAME


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def normalise(row: dict) -> dict:
    """A row over COLUMNS: known keys as they are, the others appended to `note` as key=value."""
    out = {k: _cell(row.get(k, "")) for k in COLUMNS}
    extras = [f"{k}={_cell(v)}" for k, v in row.items() if k not in COLUMNS and _cell(v) != ""]
    if extras:
        out["note"] = "; ".join(([out["note"]] if out["note"] else []) + extras)
    return out


def append_rows(rows: Iterable[dict], directory: str | Path | None = None, path: str | Path | None = None) -> Path:
    """Append rows to the results CSV (`path`, else `directory`/results.csv, else $GRUN_BENCH_OUT or
    bench/results). A file with another header is rewritten once with COLUMNS (its rows normalised)."""
    path = Path(path) if path else results_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [normalise(r) for r in rows]
    if path.exists():
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), None)
        if header != COLUMNS:
            old = read_rows(path)
            write_rows(path, old)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a results CSV, normalised to COLUMNS ([] when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [normalise({k: v for k, v in row.items() if k is not None}) for row in csv.DictReader(handle)]


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Write a whole results CSV atomically (temp file, then os.replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(normalise(r) for r in rows)
    os.replace(tmp, path)


# ---- rows of bench_training_vs_reference.py (it keeps its own CSV) ---------------------------------------

TRAINING_CSV = RESULTS / "training.csv"


def map_training_row(row: dict) -> dict:
    """A row of bench/results/training.csv in the common columns: model -> config, layers -> config,
    rank -> r, x (tokens per step), n and versions -> note."""
    config = row.get("model", "")
    if row.get("layers"):
        config += f" layers=[{', '.join(row['layers'].split())}]"
    return {
        "op": row.get("op", ""), "provider": row.get("provider", ""), "mode": row.get("mode", ""),
        "r": row.get("rank", ""), "dtype": "fp32" if "fp32" in config else "",
        "median": row.get("median", ""), "p20": row.get("p20", ""), "p80": row.get("p80", ""),
        "unit": row.get("unit", ""), "device": row.get("device", ""), "date": row.get("date", ""),
        "config": config, "batch": row.get("batch", ""),
        "note": f"tokens={row.get('x', '')}; n={row.get('n', '')}; {row.get('versions', '')}; from training.csv",
    }


def fold_training_csv(directory: str | Path | None = None, source: str | Path = TRAINING_CSV,
                      since: str = "", min_n: int = 0) -> int:
    """Append the rows of training.csv (dated `since` or later, of at least `min_n` samples) not yet in the
    results CSV; returns how many."""
    source = Path(source)
    if not source.exists():
        return 0

    def samples(row: dict) -> int:
        try:
            return int(row.get("n") or 0)
        except ValueError:
            return 0

    with source.open(newline="") as handle:
        mapped = [map_training_row(r) for r in csv.DictReader(handle)
                  if r.get("date", "") >= since and samples(r) >= min_n]
    key = ("op", "provider", "mode", "unit", "device", "date", "median")
    have = {tuple(r[k] for k in key) for r in read_rows(results_path(directory))}
    fresh = [r for r in (normalise(m) for m in mapped) if tuple(r[k] for k in key) not in have]
    if fresh:
        append_rows(fresh, directory)
    return len(fresh)
