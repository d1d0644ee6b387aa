"""Adapters on disk: exact round trip, atomic writes, clear errors on bad files, reference importer."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import grun_fast
from grun_fast import GRUNConfig, GRUNError, reference
from grun_fast.adapters import CONFIG_FILE, WEIGHTS_FILE
from tests.conftest import tiny_model

IDS = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))
POS = torch.tensor([5, 7])


def logits(model):
    with torch.no_grad():
        if grun_fast.adapter_names(model):
            with grun_fast.edit_at(model, positions=POS):
                return model(IDS).logits
        return model(IDS).logits


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama")
    grun_fast.patch(model, GRUNConfig(layers=[0, -1], rank=3, gate="mlp", gate_hidden=(8, 4)))
    for module in grun_fast.adapter_modules(model).values():
        with torch.no_grad():
            module.gate[-1].bias.fill_(5.0)
    path = grun_fast.save_adapter(model, tmp_path / "adapter")
    return model, path


def test_round_trip_reproduces_logits_exactly(saved):
    model, path = saved
    expected = logits(model)
    meta = json.loads((path / CONFIG_FILE).read_text())
    assert meta["config"]["layers"] == [0, 2] and meta["hidden_size"] == 48 and meta["model_type"] == "llama"
    assert meta["num_layers"] == 3 and meta["library_version"] == grun_fast.__version__
    fresh = tiny_model("llama")
    grun_fast.patch(fresh, path)
    assert torch.equal(logits(fresh), expected)
    assert sorted(os.listdir(path)) == [CONFIG_FILE, WEIGHTS_FILE]  # no temporaries left behind


def test_save_overwrites_atomically(saved, tmp_path):
    model, path = saved
    grun_fast.save_adapter(model, path)
    assert sorted(os.listdir(path)) == [CONFIG_FILE, WEIGHTS_FILE]


def assert_untouched(model_factory, path, match):
    model = model_factory()
    before = logits(model)
    with pytest.raises(GRUNError, match=match):
        grun_fast.patch(model, path)
    assert grun_fast.adapter_names(model) == [] and not hasattr(model, "grun_adapters")
    assert torch.equal(logits(model), before)


def test_hidden_size_layer_count_and_model_type_mismatch(saved):
    _, path = saved
    import transformers

    def other(**kw):
        def make():
            cfg = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=3)
            cfg.update(kw)
            return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**cfg)).eval()
        return make

    assert_untouched(other(hidden_size=64), path, "hidden size 48")
    assert_untouched(other(num_hidden_layers=4), path, "3 layers")
    assert_untouched(lambda: tiny_model("qwen2"), path, "model_type 'llama'")


def test_missing_truncated_and_corrupted_files(saved, tmp_path):
    _, path = saved
    factory = lambda: tiny_model("llama")
    assert_untouched(factory, tmp_path / "nowhere", "does not exist")
    weights = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    assert_untouched(factory, path, "truncated or corrupted")
    (path / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    assert_untouched(factory, path, "truncated or corrupted")
    (path / WEIGHTS_FILE).write_bytes(weights)
    config = (path / CONFIG_FILE).read_text()
    (path / CONFIG_FILE).write_text("{not json")
    assert_untouched(factory, path, "not valid JSON")
    (path / CONFIG_FILE).write_text(config.replace('"gate": "mlp"', '"gate": "conv"'))
    assert_untouched(factory, path, "unknown gate")
    (path / CONFIG_FILE).write_text(config)
    (path / WEIGHTS_FILE).unlink()
    assert_untouched(factory, path, "no adapter_model.safetensors")


def test_wrong_tensor_shape_and_nan(saved):
    _, path = saved
    tensors = load_file(str(path / WEIGHTS_FILE))
    bad = dict(tensors, **{"layers.0.bias": torch.zeros(5)})
    save_file(bad, str(path / WEIGHTS_FILE))
    assert_untouched(lambda: tiny_model("llama"), path, "layers.0.bias")
    tensors["layers.0.weight"][0, 0] = float("nan")
    save_file(tensors, str(path / WEIGHTS_FILE))
    assert_untouched(lambda: tiny_model("llama"), path, "NaN")


def write_reference_checkpoint(folder, d, layers, rank=4, generator=None):
    """Files shaped like the GRUN reference code's: one pickled tensor dict per layer."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"intervention_types": ["GatedLoReFT"]}))
    tensors = {}
    for layer in layers:
        q, _ = torch.linalg.qr(torch.randn(d, rank, generator=generator))
        state = {
            "rotate_layer": q.contiguous(),
            "weight": torch.randn(rank, d, generator=generator) * 0.3,
            "bias": torch.randn(rank, generator=generator),
            "gate_func.weight": torch.randn(1, d, generator=generator) * 0.3,
            "gate_func.bias": torch.tensor([2.0]),
        }
        torch.save(state, folder / f"intkey_comp.layer.{layer}.block_output.unit.pos.nunit.1#0.bin")
        tensors[layer] = state
    return tensors


def test_reference_checkpoint_importer_matches_reference_formula(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        hidden = {}
        handle = model.model.layers[1].register_forward_hook(lambda m, a, o: hidden.setdefault("base", o.clone()))
        model(IDS)
        handle.remove()
    tensors = write_reference_checkpoint(tmp_path / "ref", 48, [1, 2], generator=torch.Generator().manual_seed(1))
    grun_fast.patch(model, tmp_path / "ref")
    assert grun_fast.adapter_config(model).layers == [1, 2]
    store = {}
    handle = model.model.layers[1].register_forward_hook(lambda m, a, o: store.setdefault("h", o.clone()))
    with torch.no_grad(), grun_fast.edit_at(model, positions=POS):
        model(IDS)
    handle.remove()
    t = tensors[1]
    for row, pos in enumerate(POS.tolist()):
        expected, _ = reference.gated_loreft(
            hidden["base"][row, pos].double(), t["rotate_layer"].T.double(), t["weight"].double(),
            t["bias"].double(), t["gate_func.weight"].reshape(-1).double(), t["gate_func.bias"].double(),
        )
        torch.testing.assert_close(store["h"][row, pos].double(), expected, rtol=1e-5, atol=1e-5)


class NotATensor:
    pass


def test_pickle_refused_by_weights_only(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"rotate_layer": NotATensor()}, folder / "intkey_layer.1.bin")
    assert_untouched(lambda: tiny_model("llama"), folder, "refusing to load")


def test_unwritable_output_folder(saved, tmp_path):
    model, _ = saved
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GRUNError, match="cannot write"):
        grun_fast.save_adapter(model, blocker / "adapter")
