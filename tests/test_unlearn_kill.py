"""A real crash: `grun-fast unlearn` killed with SIGKILL after a checkpoint, then `--resume`, gives the adapter of
the run that was never interrupted."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.test_unlearn_command import write_cli_inputs

STEPS = 120


def command(folder, out, *extra):
    return [sys.executable, "-m", "grun_fast.cli", "unlearn", "--model", str(folder / "model"),
            "--forget", str(folder / "forget.jsonl"), "--retain", str(folder / "retain.jsonl"), "--out", str(out),
            "--max-steps", str(STEPS), "--batch-size", "4", "--layers", "2,3", "--no-progress", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    write_cli_inputs(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path, tmp_path / "whole"), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(tmp_path, out, "--save-steps", "5"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = out / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = [p for p in checkpoints.glob("checkpoint-*")] if checkpoints.is_dir() else []
        if len(done) >= 2:  # at least one complete checkpoint; the kill may land in the middle of the next
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; raise STEPS"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists()

    resumed_run = subprocess.run(command(tmp_path, out, "--save-steps", "5", "--resume"), env=env,
                                 capture_output=True, text=True)
    left = sorted(p.name for p in checkpoints.iterdir())
    assert resumed_run.returncode == 0, f"checkpoints {left}: {resumed_run.stderr[-3000:]}"
    whole = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    resumed = load_file(str(out / "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6, msg=key)


def test_resume_skips_a_checkpoint_cut_short(tmp_path):
    """The Trainer writes trainer_state.json last: a folder without it (or with it cut short) was being written
    when the run died. resume=True takes the newest complete one; naming the broken one is a GRUNError."""
    from grun_fast import GRUNError
    from grun_fast.unlearn.trainer import _resolve_resume

    ckpt = tmp_path / "checkpoints"
    for step, state in ((5, "{}"), (10, None), (15, '{"global_st')):
        folder = ckpt / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (folder / name).write_text("x")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    with pytest.warns(UserWarning) as caught:
        assert _resolve_resume(True, ckpt) == str(ckpt / "checkpoint-5")
    assert [str(w.message).split("/")[-1] for w in caught] == [
        "checkpoint-15: its trainer_state.json is cut short (the run stopped while writing it)",
        "checkpoint-10: it has no trainer_state.json (the run stopped while writing it)"]
    with pytest.raises(GRUNError, match="checkpoint-10: it has no trainer_state.json"):
        _resolve_resume(ckpt / "checkpoint-10", ckpt)
