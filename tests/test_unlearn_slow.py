"""Slow end-to-end checks of GRUN training: it forgets on a memorising model, and DDP matches one process."""
import copy
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import grun_fast
from grun_fast.data import load_tofu, make_benchmark, tokenize_rows
from grun_fast.evaluation.metrics import rouge_l_recall
from grun_fast.evaluation.generation import generate
from grun_fast.testing import train_tiny_base, untrained_tiny
from grun_fast.unlearn import UnlearnConfig, unlearn
from tests.test_unlearn_command import write_cli_inputs

ROOT = Path(__file__).resolve().parents[1]
TOFU_DIR = Path(os.environ.get("GRUN_TOFU_DIR", ROOT.parent / "shared" / "data" / "tofu"))
pytestmark = pytest.mark.slow


def rouge(model, tok, rows):
    answers = generate(model, tok, rows, max_new_tokens=64, batch_size=32)
    return float(np.mean([rouge_l_recall(a, r["answer"]) for a, r in zip(answers, rows)]))


@torch.no_grad()
def mean_gate(model, tok, rows):
    batch = tokenize_rows(tok, rows)
    with grun_fast.edit_at(model, positions=batch["edit_pos"]):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return float(torch.cat([m.last_gate for m in grun_fast.adapter_modules(model).values()]).mean())


def check_forgets(model, tok, forget, retain, method, min_drop: float = 0.5, **kwargs):
    before = rouge(model, tok, forget), rouge(model, tok, retain)
    assert before[0] > 0.9 and before[1] > 0.9, f"the base did not memorise its rows: {before}"
    # GRUN.md section 8's setting: a rank-4 edit at the last prompt token (the gate read there below), whole rows
    unlearn(model, tok, forget, retain, method=method, progress=False,
            **{"positions": "last_prompt", "rank": 4, "answer_suffixes": 0, **kwargs})
    after = rouge(model, tok, forget), rouge(model, tok, retain)
    gates = mean_gate(model, tok, forget), mean_gate(model, tok, retain)
    print(f"{method}: ROUGE-L forget {before[0]:.3f} -> {after[0]:.3f}, retain {before[1]:.3f} -> {after[1]:.3f}; "
          f"gate forget {gates[0]:.3f}, retain {gates[1]:.3f}")
    assert before[0] - after[0] >= min_drop
    assert before[1] - after[1] <= 0.1
    assert gates[0] >= 0.9 and gates[1] <= 0.1


@pytest.fixture(scope="module")
def tofu_base():
    if not (TOFU_DIR / "forget01.json").is_file():
        pytest.skip("TOFU folder absent")
    # GRUN.md section 8: 20 rows of a forget01 author + 80 retain rows, memorised by a tiny Llama
    forget = load_tofu("forget01", TOFU_DIR)[:20]
    retain = load_tofu("retain99", TOFU_DIR)[:80]
    model, tok = train_tiny_base(forget + retain, seed=0, max_length=160)
    return forget, retain, model, tok


# Each method's defaults (NPO: forget_scale 10, DEFAULT_FORGET_SCALE, chosen on this setting), GRUN.md's edit.
@pytest.mark.parametrize("method", ["gd", "npo"])
def test_grun_forgets_tofu_rows_on_a_memorising_model(tofu_base, method):
    forget, retain, model, tok = tofu_base
    check_forgets(copy.deepcopy(model), tok, forget, retain, method, layers=[2, 3], max_steps=120,
                  max_length=160)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_give_the_one_process_adapter(tmp_path):
    rows = write_cli_inputs(tmp_path)
    args = ["unlearn", "--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.jsonl"),
            "--retain", str(tmp_path / "retain.jsonl"), "--max-steps", "4", "--batch-size", "8",
            "--layers", "1,3", "--method", "npo", "--rank", "4", "--no-progress"]   # rank: as start below
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m",
                          "grun_fast.cli", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "grun_fast.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    start = {}
    torch.manual_seed(0)
    init = grun_fast.patch(untrained_tiny(rows, 32, 4)[0], grun_fast.GRUNConfig(layers=[1, 3], gate=UnlearnConfig().gate))
    for i, m in grun_fast.adapter_modules(init).items():
        start.update({f"layers.{i}.{k}": v for k, v in m.state_dict().items()})
    assert a.keys() == b.keys() == start.keys()
    assert max((a[k] - start[k]).abs().max() for k in a) > 1e-3          # training moved the adapter
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def synthetic_base():
    # ~100 of the project's synthetic QA rows (one forgotten author of 20 questions, four retained), memorised
    # by a 6-layer tiny Llama: the demo's setting.
    bench = make_benchmark(5, 20, forget_authors=1, seed=0)
    forget, retain = bench["forget"], bench["retain"]
    model, tok = train_tiny_base(forget + retain, num_layers=6, seed=0)
    return forget, retain, model, tok


# The drop this edit reaches on synthetic rows depends on the base's training numerics: 0.56 (gd) / 0.71 (npo) here
# on 2026-12-04 (every CI since 2026-12-03 reported both passing), 0.39 / 0.46 on the base trained in 2026-12-02's
# fresh environment (the same code); gates >= 0.99 on forget rows and <= 0.06 on retain rows in both. Until
# 2026-12-04 this test was a non-strict xfail, which could not fail; it now asserts what held in both: the gate
# separates the rows, the retained answers stay, and the forgotten ones lose >= 0.3 ROUGE-L. The >= 0.5 drop is
# asserted on TOFU rows above and by the CI demo's --check on rows of this kind.
@pytest.mark.parametrize("method", ["gd", "npo"])
def test_grun_forgets_synthetic_rows_on_a_memorising_model(synthetic_base, method):
    forget, retain, model, tok = synthetic_base
    check_forgets(copy.deepcopy(model), tok, forget, retain, method, min_drop=0.3, gate="mlp", max_steps=150)
