"""Adapters and prompt formats: the adapter records its format, eval uses it and reports the gate under every
variant; an adapter trained with format augmentation fires under every variant (slow)."""
import json
import os
from pathlib import Path

import pytest

import grun_fast
from grun_fast import GRUNError
from grun_fast.cli import main
from grun_fast.data import format_variants, make_benchmark
from grun_fast.evaluation.command import resolve_eval_template
from grun_fast.evaluation.formats import format_gates, format_gates_markdown
from grun_fast.testing import train_tiny_base, untrained_tiny
from grun_fast.unlearn import unlearn

ROOT = Path(__file__).resolve().parents[1]
TOFU_DIR = Path(os.environ.get("GRUN_TOFU_DIR", ROOT.parent / "shared" / "data" / "tofu"))
needs_tofu = pytest.mark.skipif(not (TOFU_DIR / "forget01.json").is_file(), reason="TOFU folder absent")


def test_eval_template_comes_from_the_adapter_unless_given():
    assert resolve_eval_template(None, []) == "auto"
    assert resolve_eval_template(None, [None]) == "auto"
    assert resolve_eval_template(None, ["Q: {question}\nA:", None]) == "Q: {question}\nA:"
    assert resolve_eval_template("plain", ["chat"]) == "plain"
    assert resolve_eval_template("Q: {question}\\nA:", []) == "Q: {question}\nA:"
    with pytest.raises(GRUNError, match="different prompt formats"):
        resolve_eval_template(None, ["plain", "chat"])
    with pytest.raises(GRUNError, match="exactly one"):
        resolve_eval_template("Q: A:", [])


def test_adapter_records_its_format_and_format_gates_cover_every_variant(tmp_path):
    bench = make_benchmark(3, 6, 1, seed=0)
    model, tok = untrained_tiny(bench["full"], hidden_size=32, num_layers=4)
    custom = "Q: {question}\nA:"
    unlearn(model, tok, bench["forget"], bench["retain"], layers=[2, 3], max_steps=2, batch_size=4, progress=False,
            template=custom, out=tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["prompt_format"] == custom
    unlearn(model, tok, bench["forget"], bench["retain"], layers=[2, 3], max_steps=2, batch_size=4, progress=False,
            out=tmp_path / "b", adapter_name="second")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["prompt_format"] == "plain"
    splits = {"forget": bench["forget"], "retain": bench["retain"][:5]}
    result = format_gates(model, tok, splits, custom, adapter_name="default")
    assert result["format"] == custom and list(result["variants"]) == list(format_variants(custom, tok))
    for v in result["variants"].values():
        assert set(v["gates"]) == {"forget", "forget (paraphrased question)", "retain"}
        assert all(0 <= g <= 1 for g in v["gates"].values())
    # each variant really runs its own prompts: the gates differ between variants
    assert len({round(v["gates"]["forget"], 6) for v in result["variants"].values()}) > 1
    table = format_gates_markdown(result)
    assert "bare question" in table and "forget (paraphrased question)" in table
    grun_fast.unpatch(model)
    with pytest.raises(GRUNError, match="needs a model with a GRUN adapter"):
        format_gates(model, tok, splits, custom)


@needs_tofu
def test_unlearn_and_eval_commands_carry_the_prompt_format(tmp_path, capsys):
    from tests.test_unlearn_command import write_cli_inputs

    write_cli_inputs(tmp_path)
    adapter = tmp_path / "adapter"
    base = ["unlearn", "--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.jsonl"),
            "--retain", str(tmp_path / "retain.jsonl"), "--max-steps", "2", "--batch-size", "4",
            "--layers", "2,3", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "bad"), "--template", "Q: {q}"]) == 2
    assert "the only field allowed is {question}" in capsys.readouterr().err
    assert main(base + ["--out", str(adapter), "--template", "Q: {question}\\nA:"]) == 0
    assert json.loads((adapter / "adapter_config.json").read_text())["prompt_format"] == "Q: {question}\nA:"
    ev = ["eval", "--model", str(tmp_path / "model"), "--adapter", str(adapter), "--data", str(TOFU_DIR),
          "--split", "forget01", "--max-rows", "3", "--no-utility", "--max-new-tokens", "2", "--quiet",
          "--no-baseline"]
    assert main(ev + ["--out", str(tmp_path / "e1")]) == 0
    run = json.loads((tmp_path / "e1" / "eval.json").read_text())
    assert run["metrics"]["settings"]["template"] == "Q: {question}\nA:"
    gates = run["metrics"]["format_gates"]
    assert gates["format"] == "Q: {question}\nA:"
    assert list(gates["variants"]) == ["as trained", "cue + space", "cue + newline", "bare question"]
    assert "Mean gate per prompt format" in (tmp_path / "e1" / "summary.md").read_text()
    assert main(ev + ["--out", str(tmp_path / "e2"), "--template", "plain", "--no-format-gates"]) == 0
    run = json.loads((tmp_path / "e2" / "eval.json").read_text())
    assert run["metrics"]["settings"]["template"] == "plain" and "format_gates" not in run["metrics"]


@pytest.mark.slow
def test_augmented_adapter_fires_under_every_format_variant():
    """A tiny model fine-tuned on 'Question: q\\nAnswer: a'; a gated-GD adapter trained with format augmentation
    (the default) must open on forget questions and stay shut on retain questions in every variant."""
    bench = make_benchmark(4, 10, 1, seed=0)     # the demo's settings, smaller: 10 forget rows, 30 retain rows
    model, tok = train_tiny_base(bench["forget"] + bench["retain"], hidden_size=128, num_layers=4, epochs=60)
    unlearn(model, tok, bench["forget"], bench["retain"], max_steps=150, gate="mlp", progress=False)
    result = format_gates(model, tok, {"forget": bench["forget"], "retain": bench["retain"]})
    assert list(result["variants"]) == ["as trained", "cue + space", "cue + newline", "bare question"]
    for label, v in result["variants"].items():
        assert v["gates"]["forget"] >= 0.8, (label, v["gates"])
        assert v["gates"]["retain"] <= 0.1, (label, v["gates"])
