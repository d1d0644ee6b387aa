"""patch / unpatch on every supported architecture: exactness, edit positions, generate, stacking."""
import pytest
import torch
import transformers

import grun_fast
from grun_fast import GRUNConfig, GRUNError, reference
from grun_fast.architectures import ARCHITECTURES, locate
from tests.conftest import TINY_CONFIGS, tiny_model


def capture_layer_output(model, index):
    """Register a hook (after any patch hook) recording the output hidden states of decoder layer `index`."""
    store = {}

    def hook(module, args, output):
        store["h"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handle = locate(model)[1][index].register_forward_hook(hook)
    return store, handle


def open_gate(model, name="default"):
    for module in grun_fast.adapter_modules(model, name).values():
        with torch.no_grad():
            module.gate.bias.fill_(30.0)  # sigmoid(30) == 1 in fp32


def shut_gate(model, name="default"):
    for module in grun_fast.adapter_modules(model, name).values():
        with torch.no_grad():
            module.gate.bias.fill_(-1e4)


def test_every_required_architecture_is_in_the_table():
    for model_type in ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox"]:
        assert model_type in ARCHITECTURES
    assert set(TINY_CONFIGS) == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_patch_exactness_on_every_architecture(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        base = model(ids).logits
        store, handle = capture_layer_output(model, 1)
        model(ids)
        base_hidden = store["h"]

    grun_fast.patch(model, GRUNConfig(layers=[1, -1], rank=3))
    shut_gate(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
        grun_fast.set_gate_threshold(model, 1.0)
        for module in grun_fast.adapter_modules(model).values():
            module.gate.bias.fill_(0.0)
        assert torch.equal(model(ids).logits, base)
        grun_fast.set_gate_threshold(model, None)

    open_gate(model)
    positions = torch.tensor([4, 8])
    with torch.no_grad(), grun_fast.edit_at(model, positions=positions):
        edited_logits = model(ids).logits
    edited = store["h"]
    module = grun_fast.adapter_modules(model)[1]
    R = module.orthonormal_rotation()
    for row, pos in enumerate(positions.tolist()):
        expected, gate = reference.gated_loreft(
            base_hidden[row, pos], R, module.weight, module.bias, module.gate.weight.reshape(-1), module.gate.bias
        )
        torch.testing.assert_close(edited[row, pos], expected, rtol=1e-5, atol=1e-5)
        others = [t for t in range(ids.shape[1]) if t != pos]
        assert torch.equal(edited[row, others], base_hidden[row, others])
    assert module.last_gate.shape == (2,)
    assert not torch.equal(edited_logits, base)

    grun_fast.unpatch(model)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    assert not hasattr(model, "grun_adapters") and grun_fast.adapter_names(model) == []


def test_last_prompt_edits_prefill_only_and_respects_padding(llama):
    grun_fast.patch(llama, GRUNConfig(layers=[1]))
    open_gate(llama)
    module = grun_fast.adapter_modules(llama)[1]
    calls = []
    original = module.forward
    module.forward = lambda h, *a, **k: (calls.append(tuple(h.shape)), original(h, *a, **k))[1]
    ids = torch.randint(1, 97, (3, 6))
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    store, handle = capture_layer_output(llama, 1)
    with torch.no_grad():
        llama(ids, attention_mask=left)
    assert calls == [(3, 48)]  # one row per sequence, in the prefill only
    with torch.no_grad():
        out = llama.generate(ids, attention_mask=left, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 10)
    assert calls[1:] == [(3, 48)]  # generate: prefill edited, decode steps untouched
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        grun_fast.unpatch(llama)
        llama(ids, attention_mask=right)
        base = store["h"]
        grun_fast.patch(llama, GRUNConfig(layers=[1]))
        open_gate(llama)
        llama(ids, attention_mask=right)
    changed = (store["h"] != base).any(-1)
    assert changed.tolist() == [[t == last for t in range(6)] for last in (2, 5, 0)]
    handle.remove()


def test_all_mode_edits_every_token_and_decode_steps(llama):
    grun_fast.patch(llama, GRUNConfig(layers=[0], positions="all"))
    module = grun_fast.adapter_modules(llama)[0]
    shapes = []
    original = module.forward
    module.forward = lambda h, *a, **k: (shapes.append(tuple(h.shape)), original(h, *a, **k))[1]
    ids = torch.randint(1, 97, (2, 5))
    with torch.no_grad():
        llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert shapes == [(2, 5, 48), (2, 1, 48), (2, 1, 48)]
    assert module.last_gate.shape == (2, 1)


def test_mask_mode_edits_only_inside_edit_at(llama):
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        base = llama(ids).logits
    grun_fast.patch(llama, GRUNConfig(layers=[1], positions="mask"))
    open_gate(llama)
    with torch.no_grad():
        with pytest.raises(GRUNError, match="positions='mask'.*edit_at"):  # it used to do nothing, silently
            llama(ids)
        mask = torch.zeros(2, 6, dtype=torch.bool)
        mask[0, 2] = mask[1, 4] = mask[1, 5] = True
        with grun_fast.edit_at(llama, mask=mask):
            logits = llama(ids).logits
    assert grun_fast.adapter_modules(llama)[1].last_gate.shape == (3,)
    assert torch.equal(logits[0, :2], base[0, :2]) and not torch.equal(logits[0, 2], base[0, 2])
    assert torch.equal(logits[1, :4], base[1, :4]) and not torch.equal(logits[1, 4], base[1, 4])


def test_edit_at_cached_prefix_edits_forwards_that_continue_a_cache(llama):
    grun_fast.patch(llama, GRUNConfig(layers=[1]))
    open_gate(llama)
    ids = torch.randint(1, 97, (2, 7))
    edit = torch.tensor([3, 3])
    with torch.no_grad():
        with grun_fast.edit_at(llama, positions=edit):
            full = llama(ids).logits                                  # edited at token 3
        with grun_fast.edit_at(llama, mask=torch.zeros(2, 7, dtype=torch.bool)):
            base = llama(ids).logits                                  # not edited
        with grun_fast.edit_at(llama, mask=torch.zeros(2, 3, dtype=torch.bool)):   # tokens 0..2, not edited
            out = llama(ids[:, :3], use_cache=True)
        prefix = getattr(out, "cache", None) or out.past_key_values
        assert torch.allclose(out.logits, base[:, :3], atol=1e-5)
        for cached, expected in ((True, full), (False, base)):
            cache = transformers.DynamicCache()
            for i, layer in enumerate(prefix.layers):
                cache.update(layer.keys.clone(), layer.values.clone(), i)
            with grun_fast.edit_at(llama, positions=torch.zeros(2, dtype=torch.long), cached_prefix=cached):
                tail = llama(ids[:, 3:], cache=cache, use_cache=True).logits
            assert torch.allclose(tail, expected[:, 3:], atol=1e-5), cached   # default: a cached forward is never edited
    assert not torch.allclose(full[:, 3:], base[:, 3:], atol=1e-3)


def test_batched_left_padded_generate_matches_one_by_one(llama):
    torch.manual_seed(3)
    grun_fast.patch(llama, GRUNConfig(layers=[1, 2]))
    open_gate(llama)
    for module in grun_fast.adapter_modules(llama).values():
        with torch.no_grad():
            module.bias.mul_(5)
    prompts = [torch.randint(1, 97, (n,)) for n in (3, 7, 5)]
    singles = []
    with torch.no_grad():
        for p in prompts:
            out = llama.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, pad_token_id=0)
            singles.append(out[0, len(p):])
        width = max(len(p) for p in prompts)
        ids = torch.zeros(3, width, dtype=torch.long)
        mask = torch.zeros(3, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        batched = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i in range(3):
        assert torch.equal(batched[i, width:], singles[i])
    grun_fast.unpatch(llama)
    with torch.no_grad():
        unpatched = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(unpatched, batched)  # the adapter did change the generations


def test_set_gate_threshold_runs_and_saves_the_threshold(llama, tmp_path):
    """A threshold above every gate returns the frozen model bit for bit, None the soft edit again; the saved
    config carries it; a bad value or name changes nothing."""
    ids = torch.randint(1, 97, (2, 7))
    with torch.no_grad():
        base = llama(ids).logits
    grun_fast.patch(llama, GRUNConfig(layers=[1, 2], positions="all"))
    with torch.no_grad():
        for module in grun_fast.adapter_modules(llama).values():
            module.gate.bias.fill_(2.0)           # every gate near 0.88, none reaches 0.99
            module.weight.normal_()
        soft = llama(ids).logits
        assert not torch.equal(soft, base)
        grun_fast.set_gate_threshold(llama, 0.99)
        assert torch.equal(llama(ids).logits, base)
        grun_fast.save_adapter(llama, tmp_path / "a")
        grun_fast.set_gate_threshold(llama, None)
        assert torch.equal(llama(ids).logits, soft)
    assert grun_fast.read_adapter(tmp_path / "a")[0]["config"].gate_threshold == 0.99
    for bad, match in ((1.5, "gate_threshold must be None or a number in"), ("0.5", "gate_threshold")):
        with pytest.raises(GRUNError, match=match):
            grun_fast.set_gate_threshold(llama, bad)
    with pytest.raises(GRUNError, match="no adapter named 'other'"):
        grun_fast.set_gate_threshold(llama, 0.5, "other")
    assert grun_fast.adapter_config(llama).gate_threshold is None
    assert all(m.gate_threshold is None for m in grun_fast.adapter_modules(llama).values())


def test_stacked_adapters_apply_in_order_and_remove_by_name(llama):
    ids = torch.randint(1, 97, (2, 7))
    positions = torch.tensor([6, 6])
    grun_fast.patch(llama, GRUNConfig(layers=[1]), name="second")
    open_gate(llama, "second")
    with torch.no_grad(), grun_fast.edit_at(llama, positions=positions):
        second_alone = llama(ids).logits
    state = {k: v.clone() for k, v in llama.grun_adapters["second"].state_dict().items()}
    grun_fast.unpatch(llama)

    grun_fast.patch(llama, GRUNConfig(layers=[1, 2]), name="first")
    grun_fast.patch(llama, GRUNConfig(layers=[1]), name="second")
    llama.grun_adapters["second"].load_state_dict(state)
    open_gate(llama, "first")
    assert grun_fast.adapter_names(llama) == ["first", "second"]
    with torch.no_grad(), grun_fast.edit_at(llama, positions=positions):
        both = llama(ids).logits
    assert not torch.equal(both, second_alone)
    grun_fast.unpatch(llama, "first")
    with torch.no_grad(), grun_fast.edit_at(llama, positions=positions):
        assert torch.equal(llama(ids).logits, second_alone)


def test_adapter_parameters_are_registered_with_the_model(llama):
    grun_fast.patch(llama, GRUNConfig(layers=[0, 2], rank=2))
    names = [n for n, _ in llama.named_parameters() if n.startswith("grun_adapters.")]
    assert len(names) == 2 * 5
    assert len(list(grun_fast.adapter_parameters(llama))) == 10


@pytest.mark.parametrize("config,match", [
    (dict(layers=[3]), "out of range"),
    (dict(layers=[-4]), "out of range"),
    (dict(layers=[1, -2]), "twice"),
    (dict(layers=[1], rank=49), "exceeds"),
])
def test_bad_patch_leaves_model_untouched(llama, config, match):
    ids = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        before = llama(ids).logits
    with pytest.raises(GRUNError, match=match):
        grun_fast.patch(llama, GRUNConfig(**config))
    assert not hasattr(llama, "grun_adapters")
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, before)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=[]), "at least one"), (dict(layers=[1], rank=0), "rank"), (dict(layers=["a"]), "integers"),
    (dict(layers=[1], gate="conv"), "unknown gate"), (dict(layers=[1], positions="first"), "unknown positions"),
    (dict(layers=[1], gate_threshold=2.0), "gate_threshold"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(GRUNError, match=match):
        GRUNConfig(**kwargs)


def test_unsupported_model_lists_supported():
    model = torch.nn.Linear(3, 3)
    model.config = type("C", (), {"model_type": "t5", "hidden_size": 3})()
    with pytest.raises(GRUNError, match="unsupported model_type 't5'.*llama"):
        grun_fast.patch(model, GRUNConfig(layers=[0]))


def test_duplicate_name_and_unknown_unpatch(llama):
    grun_fast.patch(llama, GRUNConfig(layers=[0]))
    with pytest.raises(GRUNError, match="already patched"):
        grun_fast.patch(llama, GRUNConfig(layers=[1]))
    with pytest.raises(GRUNError, match="no adapter named 'x'"):
        grun_fast.unpatch(llama, "x")
    with pytest.raises(GRUNError, match="exactly one"):
        with grun_fast.edit_at(llama):
            pass
