"""The GRUN trainer on a random tiny Llama: what trains, what stays frozen, checkpoints, resume, bad input."""
import copy
import json
import math
import os

import pytest
import torch

import grun_fast
from grun_fast import GRUNError
from grun_fast.data import format_variants, make_authors, split_by_author, tokenize_rows, with_answer_suffixes
from grun_fast.testing import untrained_tiny
from tests.test_unlearn_runtime import keep_trainers
from grun_fast.unlearn import TrainingDiverged, UnlearnConfig, default_layers, unlearn
from grun_fast.unlearn import hf_trainer, trainer as trainer_module

FAST = dict(batch_size=4, progress=False, logging_steps=1, rank=4)   # the shapes and tolerances written for rank 4


@pytest.fixture(scope="module")
def data():
    rows = make_authors(4, 6, seed=1)
    return split_by_author(rows, forget_authors=1, seed=0)


@pytest.fixture()
def tiny(data):
    forget, retain = data
    return untrained_tiny(forget + retain, hidden_size=32, num_layers=4, seed=0)


def adapter_state(model, name="default"):
    return {f"{i}.{k}": v.detach().clone() for i, m in grun_fast.adapter_modules(model, name).items()
            for k, v in m.state_dict().items()}


def logits_with_edit(model, tok, rows):
    batch = tokenize_rows(tok, rows)
    with torch.no_grad(), grun_fast.edit_at(model, positions=batch["edit_pos"]):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_default_layers_follow_reference_depths():
    assert default_layers(32) == [20, 25, 31]
    assert default_layers(4) == [2, 3]
    assert default_layers(1) == [0]


def test_config_validation():
    assert UnlearnConfig(method="gd").lambda_r == 2.0 and UnlearnConfig(method="npo").forget_scale == 10.0
    for bad in (dict(method="sgd"), dict(lr=0), dict(batch_size=0), dict(epochs=1.5), dict(template="x"),
                dict(gate="conv"), dict(adapter_name=""), dict(layers=["a"]), dict(max_steps=0)):
        with pytest.raises(GRUNError):
            UnlearnConfig(**bad)


def test_training_moves_only_the_adapter_and_keeps_R_orthonormal(tiny, data, tmp_path):
    model, tok = tiny
    forget, retain = data
    base = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    torch.manual_seed(0)
    result = unlearn(model, tok, forget, retain, method="gd", layers=[1, 3], max_steps=6, out=tmp_path / "a",
                     weight_decay=0.01, **FAST)
    assert result.global_step == 6 and result.model is model
    modules = grun_fast.adapter_modules(model)
    assert sorted(modules) == [1, 3]
    fresh = grun_fast.GRUNConfig(layers=[1, 3])
    torch.manual_seed(0)  # the same initial adapter the run started from
    init = grun_fast.patch(untrained_tiny(forget + retain, 32, 4, seed=0)[0], fresh)
    for index, module in modules.items():
        R = module.orthonormal_rotation()
        assert torch.allclose(R @ R.T, torch.eye(R.shape[0]), atol=1e-5)
        assert module.rotation.norm() > 0.5                   # R did not collapse (GRUN.md section 8)
        start = grun_fast.adapter_modules(init)[index]
        assert not torch.allclose(module.rotation, start.rotation)   # R trained
        assert not torch.allclose(module.weight, start.weight)
    state = {k: v for k, v in model.state_dict().items() if "grun" not in k}
    assert state.keys() == base.keys() and all(torch.equal(state[k], base[k]) for k in base)
    n_base = len(flags)
    assert [p.requires_grad for p in list(model.parameters())[:n_base]] == flags
    # the folder holds a loadable adapter plus the run's record
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == ["adapter_config.json", "adapter_model.safetensors", "training_log.json", "unlearn_config.json"]
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert {"forget_loss", "retain_loss", "gate_loss", "gate_forget", "gate_retain"} <= set(log[0])
    other = untrained_tiny(forget + retain, 32, 4, seed=0)[0]
    grun_fast.patch(other, tmp_path / "a")
    assert torch.allclose(logits_with_edit(other, tok, forget), logits_with_edit(model, tok, forget), atol=1e-5)


def test_optimizer_never_decays_rotation(tiny, data):
    model, tok = tiny
    forget, retain = data
    seen = {}
    original = trainer_module.GRUNTrainer.create_optimizer

    def spy(self, model=None):
        opt = original(self, model)
        seen["groups"] = [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
        seen["rotation"] = {id(m.rotation) for m in grun_fast.adapter_modules(self.grun_model).values()}
        seen["first"] = {id(p) for p in opt.param_groups[0]["params"]}
        return opt
    trainer_module.GRUNTrainer.create_optimizer = spy
    try:
        unlearn(model, tok, forget, retain, layers=[2], max_steps=1, weight_decay=0.1, gate="linear", **FAST)
    finally:
        trainer_module.GRUNTrainer.create_optimizer = original
    assert seen["groups"] == [(1, 0.0), (4, 0.1)] and seen["first"] == seen["rotation"]


@pytest.mark.parametrize("method", ["npo", "idk", "rmu"])
def test_other_methods_train(tiny, data, method):
    model, tok = tiny
    forget, retain = data
    result = unlearn(model, tok, forget, retain, method=method, layers=[2, 3], max_steps=3, **FAST)
    losses = [h for h in result.log_history if "forget_loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(h["loss"])) for h in losses)


def test_log_carries_the_forget_answers_mean_nll(tiny, data):
    """forget_nll is the forget rows' mean answer-token NLL: for gd, whose forget term is minus exactly that, the
    two logged values are each other's negatives at every step; rmu, which scores no answers, logs none."""
    model, tok = tiny
    forget, retain = data
    log = unlearn(model, tok, forget, retain, method="gd", layers=[2, 3], max_steps=3, **FAST).log_history
    steps = [h for h in log if "forget_loss" in h]
    assert len(steps) == 3 and all(h["forget_nll"] > 0 for h in steps)
    assert all(h["forget_nll"] == pytest.approx(-h["forget_loss"], abs=2e-5) for h in steps)   # both rounded to 5
    log = unlearn(model, tok, forget, retain, method="rmu", layers=[2, 3], max_steps=1, adapter_name="r", **FAST).log_history
    assert not any("forget_nll" in h for h in log)


def test_npo_reference_is_the_unedited_model_computed_once(tiny, data, monkeypatch):
    model, tok = tiny
    forget, retain = data
    calls = []
    real = trainer_module.reference_nll

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out
    monkeypatch.setattr(trainer_module, "reference_nll", counting)
    expected = []
    for rows in (forget, retain):
        batch = tokenize_rows(tok, rows)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected.append(hf_trainer.answer_nll(logits, batch["labels"])[0])
    unlearn(model, tok, forget, retain, method="npo", layers=[2], max_steps=4, answer_suffixes=0, **FAST)
    # NPO's S_ref per forget row and the retain term's reference per retain row, each for every prompt-format
    # variant (augmentation); the trained format's come first
    n_formats = len(format_variants("auto", tok))
    assert len(calls) == 2
    for got, rows, want in zip(calls, (forget, retain), expected):
        assert got.shape == (n_formats * len(rows),)
        assert torch.allclose(got[:len(rows)], want, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_adapter(data, monkeypatch):
    forget, retain = data
    states = []
    seen = []
    real = trainer_module.GRUNTrainer.compute_loss

    def spy(self, *args, **kwargs):
        seen.append(bool(self.grun_model.is_activation_checkpointing))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(trainer_module.GRUNTrainer, "compute_loss", spy)
    for checkpointing in (False, True):
        model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
        unlearn(model, tok, forget, retain, layers=[1, 2], max_steps=3, gradient_checkpointing=checkpointing,
                **FAST)
        states.append(adapter_state(model))
        assert not model.is_activation_checkpointing
    assert seen == [False] * 3 + [True] * 3
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], atol=1e-5), k


def test_lower_layer_cache_gives_the_same_adapter_and_is_reused(data, monkeypatch):
    forget, retain = data
    caches = []
    real_init = trainer_module.GRUNTrainer.__init__

    def keep(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        caches.append(self.lower_cache)
    monkeypatch.setattr(trainer_module.GRUNTrainer, "__init__", keep)
    states = []
    for mb in (0, 64):
        model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
        unlearn(model, tok, forget, retain, method="npo", layers=[2, 3], max_steps=8, cache_lower_mb=mb,
                cache_prefix=False, **FAST)
        states.append(adapter_state(model))
    assert caches[0] is None
    cache = caches[1]
    assert cache.skip == 2 and cache.enabled
    n_formats = len(format_variants("auto", tok))   # each row is cached once per prompt-format variant
    assert cache.hits > 0 and cache.misses == len(cache.store) <= n_formats * (len(forget) + len(retain))
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], atol=1e-5), k


@pytest.mark.parametrize("method", ["gd", "npo", "idk"])
def test_prefix_cache_gives_the_same_adapter_and_is_reused(data, monkeypatch, method):
    forget, retain = data
    trainers = keep_trainers(monkeypatch)
    states, logs = [], []
    for prefix in (False, True):
        model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
        result = unlearn(model, tok, forget, retain, method=method, layers=[1, 3], max_steps=8,
                         positions="last_prompt", cache_prefix=prefix, **FAST)   # the cache needs last_prompt
        states.append(adapter_state(model))
        logs.append([h["loss"] for h in result.log_history if "forget_loss" in h])
    assert trainers[0].prefix_cache is None
    cache = trainers[1].prefix_cache
    assert cache.enabled and cache.checked and cache.skip == 1
    n_formats = len(format_variants("auto", tok))   # each row is cached once per prompt-format variant
    assert cache.hits > 0 and cache.misses == len(cache.store) <= n_formats * (len(forget) + len(retain))
    assert logs[0] == pytest.approx(logs[1], rel=1e-4)
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], atol=1e-5), k


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(data, tmp_path, monkeypatch):
    forget, retain = data
    model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
    unlearn(model, tok, forget, retain, layers=[1, 3], max_steps=6, **FAST)
    whole = adapter_state(model)

    model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
    real = hf_trainer.total_loss
    calls = []

    def failing(*args):   # total_loss runs once per step: step 5 diverges
        calls.append(1)
        value = real(*args)
        return value * float("nan") if len(calls) == 5 else value
    monkeypatch.setattr(hf_trainer, "total_loss", failing)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 5 .*checkpoint-4"):
        unlearn(model, tok, forget, retain, layers=[1, 3], max_steps=6, save_steps=2, out=out, **FAST)
    assert grun_fast.adapter_names(model) == []            # the failed adapter is removed again
    assert not (out / "adapter_config.json").exists()      # no final adapter written
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-2", "checkpoint-4"]
    monkeypatch.setattr(hf_trainer, "total_loss", real)
    result = unlearn(model, tok, forget, retain, layers=[1, 3], max_steps=6, save_steps=2, out=out, resume=True,
                     **FAST)
    assert result.global_step == 6
    resumed = adapter_state(model)
    for k in whole:
        assert torch.allclose(whole[k], resumed[k], atol=1e-6), k
    with pytest.raises(GRUNError, match="different settings"):
        unlearn(untrained_tiny(forget + retain, 32, 4)[0], tok, forget, retain, layers=[1, 3], max_steps=6,
                lr=1e-3, out=out, resume=out / "checkpoints" / "checkpoint-4", **FAST)


def test_resume_compares_a_field_the_checkpoint_predates_with_the_value_it_was_trained_with(data, tmp_path):
    """A checkpoint written before suffix_gate existed trained the gate on its suffix rows: resuming it without
    suffix_gate=True is refused; without suffix rows the flag changes nothing and is not compared."""
    forget, retain = data
    for suffixes in (1, 0):
        model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
        out = tmp_path / f"run{suffixes}"
        kwargs = dict(layers=[1, 3], max_steps=4, save_steps=2, answer_suffixes=suffixes, **FAST)
        unlearn(model, tok, forget, retain, suffix_gate=True, out=out, **kwargs)
        ckpt = out / "checkpoints" / "checkpoint-2"
        saved = json.loads((ckpt / "unlearn_config.json").read_text())
        del saved["suffix_gate"]
        (ckpt / "unlearn_config.json").write_text(json.dumps(saved))
        fresh = untrained_tiny(forget + retain, 32, 4, seed=0)[0]
        if suffixes:
            with pytest.raises(GRUNError, match=r"different settings \(suffix_gate\)"):
                unlearn(fresh, tok, forget, retain, suffix_gate=False, out=out, resume=ckpt, **kwargs)
        result = unlearn(fresh, tok, forget, retain, suffix_gate=bool(suffixes), out=out, resume=ckpt, **kwargs)
        assert result.global_step == 4


def test_sequential_requests_stack_save_and_load(data, tmp_path):
    forget, retain = data
    rows2 = make_authors(4, 6, seed=1)
    second_author = sorted({r["author"] for r in retain})[0]
    forget2 = [r for r in retain if r["author"] == second_author]
    retain2 = [r for r in retain if r["author"] != second_author]
    model, tok = untrained_tiny(rows2, 32, 4, seed=0)
    unlearn(model, tok, forget, retain, layers=[2, 3], max_steps=3, out=tmp_path / "first",
            adapter_name="first", **FAST)
    first_before = adapter_state(model, "first")
    unlearn(model, tok, forget2, retain2, layers=[1, 3], max_steps=3, out=tmp_path / "second",
            adapter_name="second", **FAST)
    assert grun_fast.adapter_names(model) == ["first", "second"]
    first_after = adapter_state(model, "first")
    assert all(torch.equal(first_before[k], first_after[k]) for k in first_before)  # frozen during request 2
    with pytest.raises(GRUNError, match="already has an adapter named 'second'"):
        unlearn(model, tok, forget2, retain2, layers=[1], max_steps=1, adapter_name="second", **FAST)
    fresh = untrained_tiny(rows2, 32, 4, seed=0)[0]
    grun_fast.patch(fresh, tmp_path / "first", name="first")
    grun_fast.patch(fresh, tmp_path / "second", name="second")
    rows = forget + forget2 + retain2[:3]
    assert torch.allclose(logits_with_edit(fresh, tok, rows), logits_with_edit(model, tok, rows), atol=1e-5)


# ------------------------------------------------------------------------------ bad input
def assert_untouched(model, out):
    assert grun_fast.adapter_names(model) == []
    assert not out.exists()


@pytest.mark.parametrize("case, match", [
    ("empty_forget", "forget set: no rows"),
    ("missing_answer", "forget set: row 1 has no non-empty string 'answer'"),
    ("overlap", "every forget row .* is also in the retain set"),
    ("layer_range", "layer index 9 is out of range"),
    ("rmu_layer", "rmu_layer 0 lies below"),
    ("batch_world", "not divisible"),
    ("save_no_out", "save_steps needs an output folder"),
    ("resume_missing", "no complete checkpoint"),
])
def test_bad_input_fails_before_any_work(tiny, data, tmp_path, monkeypatch, case, match):
    model, tok = tiny
    forget, retain = data
    out = tmp_path / "out"
    kwargs = dict(layers=[2], max_steps=2, out=out, **FAST)
    if case == "empty_forget":
        forget = []
    elif case == "missing_answer":
        forget = [forget[0], {"question": "Who?"}]
    elif case == "overlap":
        retain = retain + forget
    elif case == "layer_range":
        kwargs["layers"] = [9]
    elif case == "rmu_layer":
        kwargs.update(method="rmu", layers=[2], rmu_layer=0)
    elif case == "batch_world":
        monkeypatch.setenv("WORLD_SIZE", "3")
    elif case == "save_no_out":
        kwargs.update(out=None, save_steps=1)
    elif case == "resume_missing":
        kwargs["resume"] = True
    with pytest.raises(GRUNError, match=match):
        unlearn(model, tok, forget, retain, **kwargs)
    assert_untouched(model, out)


def test_unsupported_model_and_unwritable_output(tiny, data, tmp_path, monkeypatch):
    model, tok = tiny
    forget, retain = data
    model.config.model_type = "bert"
    with pytest.raises(GRUNError, match="unsupported model_type 'bert'"):
        unlearn(model, tok, forget, retain, layers=[2], max_steps=1, **FAST)
    model.config.model_type = "llama"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GRUNError, match="is not a folder"):
        unlearn(model, tok, forget, retain, layers=[2], max_steps=1, out=blocker / "sub", **FAST)
    monkeypatch.setattr(trainer_module.os, "access", lambda path, mode: False)
    with pytest.raises(GRUNError, match="not writable"):
        unlearn(model, tok, forget, retain, layers=[2], max_steps=1, out=tmp_path / "ro", **FAST)
    assert_untouched(model, tmp_path / "ro")
    assert blocker.read_text() == "x"


def test_nan_loss_names_the_step(tiny, data, tmp_path, monkeypatch):
    model, tok = tiny
    forget, retain = data
    monkeypatch.setattr(hf_trainer, "gate_bce", lambda f, r: torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged, match="step 1 .*No checkpoint was written"):
        unlearn(model, tok, forget, retain, layers=[2], max_steps=3, out=tmp_path / "o", **FAST)
    assert_untouched(model, tmp_path / "o" / "adapter_config.json")
    assert grun_fast.adapter_names(model) == []


@pytest.mark.parametrize("positions", ["all", "mask"])
def test_other_edit_modes_train(tiny, data, positions):
    model, tok = tiny
    forget, retain = data
    result = unlearn(model, tok, forget, retain, layers=[2], positions=positions, max_steps=2, **FAST)
    assert [h for h in result.log_history if "gate_forget" in h]
    config = grun_fast.adapter_config(model)
    assert config.positions == positions
    fresh = copy.deepcopy(model)  # the adapter as initialised: the trainer seeds right before patching
    grun_fast.unpatch(fresh)
    torch.manual_seed(result.config.seed)
    grun_fast.patch(fresh, config)
    trained, initial = grun_fast.adapter_modules(model)[2], grun_fast.adapter_modules(fresh)[2]
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(trained.parameters(), initial.parameters()))
    assert 0 < moved <= 3 * result.config.lr * result.global_step  # Adam steps of about lr from the init
    ids = torch.tensor([tok("Question: who?")["input_ids"]])
    with torch.no_grad():
        if positions == "all":  # every token edited, decode steps included: one gate per token
            model(ids)
            assert trained.last_gate.shape == ids.shape
        else:  # nothing says where to edit: an error, not a silent no-op
            with pytest.raises(GRUNError, match="positions='mask'"):
                model(ids)


def test_bfloat16_model_and_document_rows(data):
    from grun_fast.data import chunk_document
    forget, retain = data
    model, tok = untrained_tiny(forget + retain, 32, 4)
    model.to(torch.bfloat16)
    text = " ".join(r["answer"] for r in forget)
    docs = chunk_document(text, chunk_words=12, prefix_words=4) + chunk_document(text, 12, prefix_words=None)
    result = unlearn(model, tok, docs, retain, layers=[1, 3], max_steps=2, **FAST)
    assert result.global_step == 2
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "grun" not in n)
    R = grun_fast.adapter_modules(model)[1].orthonormal_rotation().float()
    assert torch.allclose(R @ R.T, torch.eye(4), atol=1e-4)


def test_answer_suffixes_are_trained_on_as_forget_rows(data, monkeypatch):
    """With answer_suffixes the run's forget set holds the suffix rows too: epochs count passes over it."""
    forget, retain = data
    seen = []
    real = trainer_module.encode_rows

    def spy(tok, rows, *a, **k):
        seen.append([r["answer"] for r in rows])
        return real(tok, rows, *a, **k)
    monkeypatch.setattr(trainer_module, "encode_rows", spy)
    model, tok = untrained_tiny(forget + retain, 32, 4)
    result = unlearn(model, tok, forget, retain, layers=[3], epochs=1, answer_suffixes=2,
                     augment_formats=False, **FAST)
    expected = with_answer_suffixes(forget, 2, seed=0)
    assert len(expected) > len(forget) and seen[0] == [r["answer"] for r in expected]
    assert result.global_step == math.ceil(len(expected) / FAST["batch_size"])


@pytest.mark.parametrize("positions", ["last_prompt", "all"])
@pytest.mark.parametrize("suffix_gate", [True, False])
def test_suffix_gate_false_keeps_suffix_rows_out_of_the_gate_loss(data, monkeypatch, positions, suffix_gate):
    """One epoch meets every forget example once: the forget gate values that reach the gate loss are those of
    the whole rows only with suffix_gate=False (one per row, or one per edited token with positions='all')."""
    forget, retain = data
    encoded, counts = [], []
    real_encode, real_bce = trainer_module.encode_rows, hf_trainer.gate_bce

    def spy_encode(tok, rows, *a, **k):
        encoded.append(real_encode(tok, rows, *a, **k))
        return encoded[-1]

    def spy_bce(f, r):
        counts.append(f[0].numel())
        return real_bce(f, r)
    monkeypatch.setattr(trainer_module, "encode_rows", spy_encode)
    monkeypatch.setattr(hf_trainer, "gate_bce", spy_bce)
    model, tok = untrained_tiny(forget + retain, 32, 4)
    unlearn(model, tok, forget, retain, layers=[3], epochs=1, answer_suffixes=2, suffix_gate=suffix_gate,
            positions=positions, augment_formats=False, **{**FAST, "batch_size": 1})
    gated = encoded[0] if suffix_gate else encoded[0][:len(forget)]
    assert len(encoded[0]) > len(forget)
    per_row = [1 if positions == "last_prompt" else len(e["input_ids"]) - e["prompt_len"] + 1 for e in gated]
    assert sum(counts) == sum(per_row)


def test_retain_kl_compares_the_edited_with_the_frozen_model_on_the_retain_rows(data, monkeypatch):
    """retain_kl > 0: the frozen side of the KL is the model without this adapter on the step's retain rows; the
    term changes what is trained and is logged; the gates reaching the gate loss are still the edited forward's
    (the frozen forward runs first). retain_kl = 0: no KL is computed."""
    forget, retain = data
    seen = {0.0: [], 2.0: []}
    calls, gates = [], {0.0: [], 2.0: []}
    real_kl, real_step, real_bce = hf_trainer.retain_kl_loss, hf_trainer.batch_answer_nll, hf_trainer.gate_bce
    weight = [0.0]

    def spy_step(model, ids, mask, labels, edit_pos, **kw):
        calls.append((model, ids, mask, labels, edit_pos, kw.get("log_probs_from")))
        return real_step(model, ids, mask, labels, edit_pos, **kw)

    def spy_kl(log_probs, reference, n):
        seen[weight[0]].append((calls[-2], reference.clone()))
        return real_kl(log_probs, reference, n)

    def spy_bce(f, r):
        gates[weight[0]].append([g.detach().clone() for g in f + r])
        return real_bce(f, r)
    monkeypatch.setattr(hf_trainer, "batch_answer_nll", spy_step)
    monkeypatch.setattr(hf_trainer, "retain_kl_loss", spy_kl)
    monkeypatch.setattr(hf_trainer, "gate_bce", spy_bce)
    states, logs = {}, {}
    for w in (0.0, 2.0):
        weight[0] = w
        model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
        result = unlearn(model, tok, forget, retain, layers=[1, 3], max_steps=3, retain_kl=w, **FAST)
        states[w], logs[w] = adapter_state(model), result.log_history
        if w:
            model_w = model
    assert not seen[0.0] and len(seen[2.0]) == 3
    assert all("retain_kl" in h for h in logs[2.0] if "loss" in h)
    assert not any("retain_kl" in h for h in logs[0.0])
    assert any(not torch.allclose(states[0.0][k], states[2.0][k]) for k in states[0.0])
    for a, b in zip(gates[0.0][0], gates[2.0][0]):   # step 1: same initial adapter, same gates
        assert torch.equal(a, b)
    (model, ids, mask, labels, edit, from_row), reference = seen[2.0][-1]
    assert model is model_w and from_row == 0
    with torch.no_grad(), grun_fast.disable_adapters(model):
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    picked = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100
    assert torch.allclose(reference.double(), logits[picked].log_softmax(-1), atol=1e-5)


def test_gate_threshold_trains_and_deploys_as_set(data, tmp_path, monkeypatch):
    """gate_threshold holds in training too: at 1.0 no token is ever edited (a sigmoid gate stays below 1), so
    the forget and retain losses cannot move the edit (R, W, b stay at their initial values) while the gate
    loss still trains the gate; the saved adapter carries the threshold."""
    forget, retain = data
    initial, real_bce = {}, hf_trainer.gate_bce
    current = []

    def spy_bce(f, r):   # first call: before the first optimiser step, the adapter as initialised
        initial.setdefault(len(current), adapter_state(current[-1]))
        return real_bce(f, r)
    monkeypatch.setattr(hf_trainer, "gate_bce", spy_bce)
    states = {}
    for t in (None, 1.0):
        model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
        current.append(model)
        unlearn(model, tok, forget, retain, layers=[1, 3], max_steps=3, gate_threshold=t, out=tmp_path / str(t),
                **FAST)
        states[t] = adapter_state(model)
        assert all(m.gate_threshold == t for m in grun_fast.adapter_modules(model).values())
        saved = json.loads((tmp_path / str(t) / "adapter_config.json").read_text())["config"]
        assert saved["gate_threshold"] == t
    soft, hard = initial[1], initial[2]
    edit = [k for k in soft if k.split(".", 1)[1] in ("rotation", "weight", "bias")]
    gate = [k for k in soft if k not in edit]
    assert len(edit) == 6 and gate
    assert all(torch.equal(states[1.0][k], hard[k]) for k in edit)
    assert any(not torch.equal(states[1.0][k], hard[k]) for k in gate)
    assert any(not torch.equal(states[None][k], soft[k]) for k in edit)


def test_defaults_are_the_study_point_and_rank_fits_the_model(data, tmp_path):
    """The defaults are the forget study's forget05 point (SimNPO beta 1, retain weight 4, rank 64, 3 answer
    suffixes); rank None becomes 64 or half the hidden size where smaller, and the saved config records it."""
    from grun_fast.unlearn.config import DEFAULT_RANK

    c = UnlearnConfig()
    assert (c.method, c.beta, c.lambda_r, c.rank, c.answer_suffixes, c.positions) == ("simnpo", None, 4.0, None, 3, "all")
    # beta by the forget rows: 2 up to 40, 1 from 200 on, log-linear between (100 rows: 2 - log(2.5)/log(5))
    assert [c.for_data(n).beta for n in (1, 40, 200, 4000)] == [2.0, 2.0, 1.0, 1.0]
    assert c.for_data(100).beta == pytest.approx(2 - math.log(2.5) / math.log(5), abs=1e-12)
    assert UnlearnConfig(beta=3.0).for_data(40).beta == 3.0 and UnlearnConfig(method="npo").for_data(40).beta == 0.1
    assert (c.for_model(2048).rank, c.for_model(32).rank, c.for_model(1).rank, DEFAULT_RANK) == (64, 16, 1, 64)
    assert UnlearnConfig(rank=8).for_model(2048).rank == 8
    assert [UnlearnConfig(method=m).answer_suffixes for m in ("npo", "gd", "idk", "rmu")] == [3, 0, 0, 0]
    with pytest.raises(GRUNError, match="rank is unset"):
        c.grun_config(4)
    forget, retain = data
    model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
    unlearn(model, tok, forget, retain, layers=[3], max_steps=1, out=tmp_path, progress=False)
    assert grun_fast.adapter_config(model).rank == 16
    saved = json.loads((tmp_path / "unlearn_config.json").read_text())
    assert (saved["rank"], saved["beta"]) == (16, 2.0)   # the resolved values: 16 forget rows


def test_deploy_threshold_trains_soft_and_deploys_hard(data, tmp_path):
    """deploy_threshold: the same training as the soft gate (identical adapter tensors), then the returned and
    saved adapter runs with the threshold."""
    forget, retain = data
    states = {}
    for t in (None, 0.7):
        model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
        unlearn(model, tok, forget, retain, layers=[1, 3], max_steps=3, deploy_threshold=t, out=tmp_path / str(t),
                **FAST)
        states[t] = adapter_state(model)
        assert all(m.gate_threshold == t for m in grun_fast.adapter_modules(model).values())
        assert grun_fast.read_adapter(tmp_path / str(t))[0]["config"].gate_threshold == t
        assert json.loads((tmp_path / str(t) / "unlearn_config.json").read_text())["deploy_threshold"] == t
    assert states[None].keys() == states[0.7].keys()
    assert all(torch.equal(states[None][k], states[0.7][k]) for k in states[None])


def test_steps_default_floor_and_explicit_epochs():
    """epochs=None: 60 passes but at least MIN_DEFAULT_STEPS; explicit epochs and max_steps are taken as given."""
    from grun_fast.unlearn.config import DEFAULT_EPOCHS, MIN_DEFAULT_STEPS

    config = UnlearnConfig()
    assert config.epochs is None and DEFAULT_EPOCHS == 60
    assert config.steps(20) == MIN_DEFAULT_STEPS                      # 60 x 20 / 16 = 75 steps: floored
    assert config.steps(800) == 3000                                  # forget05 with 3 suffixes: the study's
    assert UnlearnConfig(epochs=1).steps(20) == 2
    assert UnlearnConfig(epochs=DEFAULT_EPOCHS).steps(20) == 75
    assert UnlearnConfig(max_steps=7, epochs=3).steps(1000) == 7
