"""`grun-fast unlearn`: the command end to end on a tiny saved model."""
import json
import os
from pathlib import Path

import pytest

from grun_fast.cli import main
from grun_fast.data import make_authors, split_by_author
from grun_fast.testing import untrained_tiny

ROOT = Path(__file__).resolve().parents[1]
TOFU_DIR = Path(os.environ.get("GRUN_TOFU_DIR", ROOT.parent / "shared" / "data" / "tofu"))


def write_cli_inputs(folder: Path) -> list[dict]:
    """A tiny saved model (``folder/model``) and ``forget.jsonl`` / ``retain.jsonl`` beside it; returns the
    rows (its tokenizer was trained on them)."""
    rows = make_authors(4, 6, seed=2)
    forget, retain = split_by_author(rows, 1, seed=0)
    model, tok = untrained_tiny(rows, hidden_size=32, num_layers=4)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    for name, data in (("forget", forget), ("retain", retain)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    write_cli_inputs(tmp)
    return tmp


def common(tmp, out, *extra):
    return ["unlearn", "--model", str(tmp / "model"), "--forget", str(tmp / "forget.jsonl"),
            "--retain", str(tmp / "retain.jsonl"), "--out", str(out), "--max-steps", "2", "--batch-size", "4",
            "--layers", "2,3", "--no-progress", *extra]


def test_unlearn_command_writes_an_adapter(setup, capsys):
    out = setup / "a1"
    assert main(common(setup, out, "--method", "npo", "--adapter-name", "first")) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "unlearn_config.json"} <= set(os.listdir(out))
    cfg = json.loads((out / "unlearn_config.json").read_text())
    assert cfg["method"] == "npo" and cfg["layers"] == [2, 3] and cfg["max_steps"] == 2
    assert "done: 2 steps" in capsys.readouterr().out
    # an existing adapter is not overwritten by accident
    assert main(common(setup, out)) == 2
    assert "already holds an adapter" in capsys.readouterr().err
    # a second request on top of the first
    out2 = setup / "a2"
    assert main(common(setup, out2, "--apply", f"{out}:first", "--adapter-name", "second", "--layers", "1")) == 0
    assert json.loads((out2 / "adapter_config.json").read_text())["config"]["layers"] == [1]


@pytest.mark.parametrize("flag, gated", [([], False), (["--suffix-gate"], True)])
def test_unlearn_command_suffix_gate(setup, flag, gated):
    """Suffix rows train the edit only unless --suffix-gate; the run records which."""
    out = setup / f"suffix-gate-{gated}"
    assert main(common(setup, out, "--answer-suffixes", "1", *flag)) == 0
    cfg = json.loads((out / "unlearn_config.json").read_text())
    assert cfg["answer_suffixes"] == 1 and cfg["suffix_gate"] is gated


def test_unlearn_command_retain_kl(setup):
    out = setup / "retain-kl"
    assert main(common(setup, out, "--retain-kl", "0.5")) == 0
    assert json.loads((out / "unlearn_config.json").read_text())["retain_kl"] == 0.5


@pytest.mark.parametrize("extra, message", [
    (["--layers", "7"], "out of range"),
    (["--method", "rmu", "--rmu-layer", "0"], "rmu_layer 0 lies below"),
    (["--apply", "/nonexistent/adapter"], "no adapter folder"),
    (["--method", "rmu", "--retain-kl", "1"], "retain_kl acts on"),
])
def test_unlearn_command_bad_input(setup, capsys, extra, message):
    out = setup / "bad"
    assert main(common(setup, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unlearn_command_missing_model_and_data(setup, capsys, tmp_path):
    args = common(setup, tmp_path / "o")
    args[args.index("--model") + 1] = str(tmp_path / "nomodel")
    assert main(args) == 2 and "could not load the model" in capsys.readouterr().err
    args = common(setup, tmp_path / "o")
    args[args.index("--forget") + 1] = str(tmp_path / "missing.jsonl")
    assert main(args) == 2 and "missing.jsonl" in capsys.readouterr().err
    args = common(setup, tmp_path / "o")
    del args[args.index("--retain"):args.index("--retain") + 2]
    assert main(args) == 2 and "--retain is required" in capsys.readouterr().err


@pytest.mark.skipif(not (TOFU_DIR / "forget01.json").is_file(), reason="TOFU folder absent")
def test_unlearn_command_tofu_split_defaults_retain(setup, tmp_path, capsys):
    args = ["unlearn", "--model", str(setup / "model"), "--data", str(TOFU_DIR), "--forget", "forget01",
            "--out", str(tmp_path / "t"), "--max-steps", "1", "--batch-size", "4", "--layers", "3",
            "--max-length", "64", "--no-progress"]
    assert main(args) == 0
    assert "unlearning 40 rows (forget01) keeping 3960 (retain99)" in capsys.readouterr().err


def test_unlearn_command_takes_several_retain_sources(setup, tmp_path, capsys):
    """--retain repeats: general text joins the retain rows (the tiny TOFU forget05 study: world-facts rows
    outside the evaluation kept the gate shut on general questions, model utility 0.69 -> 0.82)."""
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{2 * i}."}) + "\n"
                               for i in range(7)))
    retain_rows = sum(1 for _ in (setup / "retain.jsonl").open())
    assert main(common(setup, tmp_path / "o", "--retain", str(general))) == 0
    err = capsys.readouterr().err
    assert f"keeping {retain_rows + 7} ({setup / 'retain.jsonl'} + {general})" in err
    assert main(common(setup, tmp_path / "o2", "--retain", str(tmp_path / "missing.jsonl"))) == 2
    assert "missing.jsonl" in capsys.readouterr().err and not (tmp_path / "o2").exists()
