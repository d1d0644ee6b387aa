"""The benchmark suite: its CSV, its report (table and plots), its command line, and one quick run (slow)."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common, report  # noqa: E402

DEV = "cpu: Test CPU, 2 cores, 1 threads"


def _synthetic_rows() -> list[dict]:
    """A small results set covering every group, two runs of one key (the later must win)."""
    rows = []
    for provider, ms in (("torch", 1.0), ("reference", 3.0)):
        rows.append(dict(op="gated_loreft", provider=provider, mode="fwd", rows=256, d=4096, r=4, dtype="fp32",
                         median=ms, p20=ms * 0.9, p80=ms * 1.1, unit="ms", device=DEV, date="2026-01-01T00:00:00Z"))
    common_mod = dict(op="module", mode="fwd", rows=1, d=4096, r=4, dtype="fp32", unit="s", device=DEV,
                      date="2026-01-01T00:00:00Z")
    rows += [dict(common_mod, provider="grun_fast", median=1e-4, p20=1e-4, p80=1e-4),
             dict(common_mod, provider="torch_orthogonal", median=0.05, p20=0.05, p80=0.05),
             dict(common_mod, op="module_ratio", provider="torch_orthogonal/grun_fast", median=500.0, p20=400.0,
                  p80=600.0, unit="ratio")]
    serve = dict(d=512, dtype="float32", device=DEV, config="llama-d512 layers=[4, 6, 7]", batch=1)
    for mode, (base, patched) in (("last_prompt", (1.00, 1.01)), ("all", (1.00, 1.20))):
        rows += [dict(serve, op="generate", provider="unpatched", mode=mode, median=base, p20=base, p80=base, unit="s"),
                 dict(serve, op="generate", provider=mode, mode=mode, median=patched, p20=patched, p80=patched, unit="s"),
                 dict(serve, op="generate_tokens_per_s", provider=mode, mode=mode, median=64 / patched, unit="tok/s"),
                 dict(serve, op="generate_overhead", provider=mode, mode=mode, median=0.5, unit="fraction",
                      date="2026-01-01T00:00:00Z")]
        # the later measurement of the same key: this one must be reported
        rows.append(dict(serve, op="generate_overhead", provider=mode, mode=mode, median=patched / base - 1,
                         p20=patched / base - 1.005, p80=patched / base - 0.995, unit="fraction",
                         date="2026-01-02T00:00:00Z"))
    train = dict(mode="gd", d=512, r=4, dtype="fp32", device=DEV, config="llama-d512 L8 layers=[4, 6, 7]",
                 batch="2+2x48")
    for kind, s in (("grun", 0.4), ("lora", 0.8), ("full", 2.0)):
        rows.append(dict(train, op="train_step", provider=kind, median=s, p20=s, p80=s, unit="s"))
        rows.append(dict(train, op="train_step_peak_memory", provider=kind, median=100 * s, unit="MiB"))
    rows += [dict(train, op="train_step_ratio", provider="grun/lora", median=0.5, unit="ratio"),
             dict(train, op="train_step_ratio", provider="grun/full", median=0.2, unit="ratio")]
    ref = dict(device=DEV, date="2026-01-03T00:00:00Z", config="llama d=512 fp32 layers=[4, 6, 7]", batch="8+8x96")
    rows += [dict(ref, op="gd_step", provider="grun_fast", mode="answer_head", median=2.0, unit="s"),
             dict(ref, op="gd_step", provider="pyreft", mode="reference", median=5.0, unit="s"),
             dict(ref, op="gd_step_ratio", provider="grun_fast/pyreft", mode="answer_head", median=0.4, unit="ratio")]
    return rows


def test_append_rows_keeps_extra_keys_in_note_and_rewrites_old_headers(tmp_path):
    old = tmp_path / "results.csv"
    old.write_text("op,provider,x,median\nold_op,p,7,1.5\n")
    common.append_rows([{"op": "new", "provider": "q", "median": 0.25, "peak_mib": 3.0, "note": "n1"}], tmp_path)
    with old.open(newline="") as handle:
        got = list(csv.DictReader(handle))
    assert list(got[0]) == common.COLUMNS
    assert got[0]["op"] == "old_op" and got[0]["note"] == "x=7"
    assert got[1]["median"] == "0.25" and got[1]["note"] == "n1; peak_mib=3"


def test_fold_training_csv_maps_columns_once(tmp_path):
    src = tmp_path / "training.csv"
    src.write_text("op,provider,mode,x,median,p20,p80,unit,n,device,date,model,batch,layers,rank,versions\n"
                   "gd_step_ratio,grun_fast/pyreft,joint,1536,0.9,0.8,1.0,ratio,5,cpu: X,2026-01-01T00:00:00Z,"
                   "llama d=512 fp32,8+8x96,4 6 7,4,torch 2\n")
    assert common.fold_training_csv(tmp_path, source=src) == 1
    assert common.fold_training_csv(tmp_path, source=src) == 0  # already there
    (row,) = common.read_rows(common.results_path(tmp_path))
    assert row["config"] == "llama d=512 fp32 layers=[4, 6, 7]" and row["r"] == "4" and row["batch"] == "8+8x96"
    assert "tokens=1536" in row["note"] and row["device"] == "cpu: X"


def test_report_builds_from_a_synthetic_csv(tmp_path):
    common.append_rows(_synthetic_rows(), tmp_path)
    text = report.build(tmp_path)
    assert (tmp_path / "RESULTS.md").read_text() == text
    for name in ("op.png", "serving.png", "training.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # ratios computed side by side, latest row per key, the device on every table row
    assert "| 3 |" in text                                       # naive / fastest = 3.0 / 1.0
    assert "**500x** (target >= 100x: met)" in text
    assert "**+1.0 %** [p20 +0.5, p80 +1.5] (target <= 3 %: met)" in text             # 2026-01-02 row, not the older 50 %
    assert "**+20.0 %** [p20 +19.5, p80 +20.5] (target <= 10 %: NOT met)" in text
    assert "50.00" not in text
    assert "**0.4x** (target <= 0.5x: met)" in text
    assert "| 0.5 | 0.2 | - | - | 40 / - / 80 / 200 |" in text  # grun/lora, grun/full, (no grun_fast), peak MiB
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| device", "| ---"))]
    assert table_rows and all(DEV in line for line in table_rows)


def test_report_without_results_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no results"):
        report.build(tmp_path)


def test_cli_help():
    done = subprocess.run([sys.executable, "-m", "grun_fast.cli", "bench", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--out" in done.stdout


def test_command_needs_the_repository(monkeypatch, tmp_path):
    from grun_fast import bench_command
    from grun_fast.errors import GRUNError

    monkeypatch.setattr(bench_command, "REPO", tmp_path)
    with pytest.raises(GRUNError, match="bench/ folder"):
        bench_command.repository()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_suite_writes_csv_plots_and_table(tmp_path):
    # --no-reference: the reference script always appends to the repository's training.csv
    done = subprocess.run([sys.executable, "-m", "grun_fast.cli", "bench", "--quick", "--no-reference",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = common.read_rows(tmp_path / "results.csv")
    ops = {r["op"] for r in rows}
    assert {"gated_loreft", "module", "module_ratio", "generate", "generate_overhead", "train_step"} <= ops
    assert all(r["device"] for r in rows)
    for name in ("RESULTS.md", "op.png", "serving.png", "training.png"):
        assert (tmp_path / name).is_file()
    assert "## Headline" in done.stdout


def test_eval_benchmark_runs_and_reports(tmp_path, monkeypatch, capsys):
    """bench_eval end to end on a tiny setting: both batch sizes agree (it asserts that itself), rows for the
    whole evaluation and both parts land in the CSV, and the report shows them."""
    from bench import bench_eval

    monkeypatch.setenv(common.OUT_ENV, str(tmp_path))
    monkeypatch.setattr(bench_eval, "load_rows", lambda split: (_eval_rows(6), "test:6"))
    bench_eval.main(["--repeats", "1", "--epochs", "1", "--hidden", "32", "--layers", "2", "--max-new-tokens", "4",
                     "--batch-size", "4", "--threads", "1"])
    rows = [r for r in common.read_rows(tmp_path / common.CSV_NAME) if r["op"] == "eval_split"]
    got = {(r["mode"], r["provider"]) for r in rows}
    for mode in ("evaluate", "scoring", "generation"):
        assert {(mode, "batched"), (mode, "one_by_one"), (mode, "speedup")} <= got
    median = {(r["mode"], r["provider"]): float(r["median"]) for r in rows}
    for mode in ("evaluate", "scoring", "generation"):   # the speedup row is one by one over batched
        want = median[(mode, "one_by_one")] / median[(mode, "batched")]
        assert median[(mode, "speedup")] == pytest.approx(want, rel=1e-3)
    text = report.markdown(rows, "test")
    assert "Evaluation of a 6-question split" in text and "| generation | 4 |" in text


def _eval_rows(n: int) -> list[dict]:
    return [{"question": f"Where was author {i} born?", "answer": f"Author {i} was born in town {i}.",
             "paraphrased_answer": f"Town {i} is where author {i} was born.",
             "perturbed_answer": [f"Author {i} was born in town {i + k}." for k in (1, 2, 3)],
             "paraphrased_question": f"What is the birthplace of author {i}?"} for i in range(n)]
