"""The trainer under real use: eval-mode base (no dropout), warmup steps, the model's device after a failure,
and the logged objective recomputed from the logits with plain torch (not grun_fast's loss functions)."""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import grun_fast
from grun_fast.data import make_authors, split_by_author
from grun_fast.data.prompts import PLAIN_TEMPLATE
from grun_fast.testing import make_tiny_tokenizer, untrained_tiny
from grun_fast.unlearn import TrainingDiverged, unlearn
from grun_fast.unlearn import hf_trainer, trainer as trainer_module

FAST = dict(batch_size=4, progress=False, logging_steps=1, rank=4)   # the shapes and tolerances written for rank 4


@pytest.fixture(scope="module")
def data():
    rows = make_authors(4, 6, seed=1)
    return split_by_author(rows, forget_authors=1, seed=0)


def tiny_gpt2_with_dropout(rows, p=0.1):
    texts = [PLAIN_TEMPLATE.format(question=r["question"]) + r["answer"] for r in rows]
    tok = make_tiny_tokenizer(texts, 400)
    config = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=4, n_head=4, n_positions=128,
                                     resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config), tok


def keep_trainers(monkeypatch):
    trainers = []
    real_init = trainer_module.GRUNTrainer.__init__

    def keep(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        trainers.append(self)
    monkeypatch.setattr(trainer_module.GRUNTrainer, "__init__", keep)
    return trainers


def dropout_calls(model):
    """Counts of dropout forwards in train and in eval mode (nn.Dropout modules and eager attention's dropout)."""
    calls = {True: 0, False: 0}

    def count(module, args):
        calls[module.training] += 1
    handles = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    return calls, handles


@pytest.mark.parametrize("start_in_train_mode", [False, True])
def test_frozen_base_runs_in_eval_mode_and_prefix_cache_stays_on(data, monkeypatch, start_in_train_mode):
    forget, retain = data
    model, tok = tiny_gpt2_with_dropout(forget + retain)
    model.train(start_in_train_mode)
    before = {name: m.training for name, m in model.named_modules()}
    trainers = keep_trainers(monkeypatch)
    calls, handles = dropout_calls(model)
    try:
        unlearn(model, tok, forget, retain, method="npo", layers=[1, 3], max_steps=4, positions="last_prompt",
                **FAST)
    finally:
        for h in handles:
            h.remove()
    assert calls[True] == 0                          # no dropout ran in train mode
    assert calls[False] >= 4 * 13                    # 13 dropout modules (embd + 3 per block), >= 1 forward/step
    cache = trainers[0].prefix_cache
    assert cache.checked and cache.enabled and cache.hits > 0
    assert {name: m.training for name, m in model.named_modules() if "grun" not in name} == before


def test_gradient_checkpointing_keeps_layers_checkpointing_but_dropout_off(data, monkeypatch):
    forget, retain = data
    model, tok = tiny_gpt2_with_dropout(forget + retain)
    seen = []
    real = trainer_module.GRUNTrainer.compute_loss

    def spy(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        blocks = self.grun_model.transformer.h
        seen.append(([b.training for b in blocks], [m.training for m in self.grun_model.modules()
                                                     if isinstance(m, torch.nn.Dropout)]))
        return loss
    monkeypatch.setattr(trainer_module.GRUNTrainer, "compute_loss", spy)
    calls, handles = dropout_calls(model)
    try:
        unlearn(model, tok, forget, retain, layers=[1, 3], max_steps=2, gradient_checkpointing=True, **FAST)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 2
    for blocks, dropouts in seen:
        assert blocks == [True] * 4 and dropouts == [False] * 13
    assert calls[True] == 0 and calls[False] > 0


def test_warmup_ratio_becomes_whole_warmup_steps(data, monkeypatch):
    forget, retain = data
    model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
    trainers = keep_trainers(monkeypatch)
    result = unlearn(model, tok, forget, retain, layers=[2], max_steps=4, warmup_ratio=0.5, lr=1e-3, **FAST)
    assert trainers[0].args.warmup_steps == 2 and isinstance(trainers[0].args.warmup_steps, int)
    # the rate each of the 4 steps used: linear warmup over steps 0 and 1, peak at step 2, then linear decay
    lrs = [h["learning_rate"] for h in result.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4], abs=1e-9)


def test_failed_run_moves_the_model_back_and_leaves_it_untouched(data, monkeypatch):
    forget, retain = data
    model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    moves = []
    real_to = model.to

    def spy_to(*args, **kwargs):
        moves.append(torch.device(args[0]) if args else kwargs.get("device"))
        return real_to(*args, **kwargs)
    monkeypatch.setattr(model, "to", spy_to)

    def nan_loss(*args):   # the step's loss (total_loss runs once per step)
        moves.append("nan")
        return torch.tensor(float("nan"))
    monkeypatch.setattr(hf_trainer, "total_loss", nan_loss)
    with pytest.raises(TrainingDiverged):
        unlearn(model, tok, forget, retain, layers=[2], max_steps=2, **FAST)
    # to the training device (unlearn, then the HF Trainer), and after the failure back to where it was (cpu
    # here: the only device of this machine)
    assert moves[0] == torch.device("cpu") and moves.index("nan") >= 1
    assert moves[moves.index("nan"):] == ["nan", torch.device("cpu")]
    assert grun_fast.adapter_names(model) == [] and not model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_restore_placement_puts_each_tensor_back():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    placement = trainer_module._placement(model)
    assert len(placement) == 2 + 3 + 2       # weight, bias; running mean/var, count; bn weight, bias
    moved = []
    real_to = model.to
    model.to = lambda device: (moved.append(device), real_to(device))[1]
    trainer_module._restore_placement(model, placement)
    assert moved == [torch.device("cpu")]


def test_all_positions_supervise_forget_gates_from_the_prompt_end(data, monkeypatch):
    """positions="all": the gate term is BCE of forget rows' gates from the last prompt token on (-> 1) and of
    retain rows' gates at every real token (-> 0); the earlier forget prompt tokens are not supervised."""
    forget, retain = data
    model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
    pairs = []
    real = trainer_module.GRUNTrainer.compute_loss

    def spy(self, model_, inputs, *args, **kwargs):
        nf = int(inputs["n_forget"])
        before = self._sums.get("gate_loss", 0.0)     # the trainer adds each step's gate term to its log sums
        loss = real(self, model_, inputs, *args, **kwargs)
        mask, pos = inputs["attention_mask"].bool(), inputs["edit_pos"]
        cols = torch.arange(mask.shape[1])[None]
        span = mask[:nf] & (cols >= pos[:nf, None])
        assert (mask[:nf] & ~span).any()             # there are unsupervised forget prompt tokens
        gates = [m.last_gate.detach() for m in grun_fast.adapter_modules(self.grun_model).values()]
        g = torch.cat([x[:nf][span] for x in gates] + [x[nf:][mask[nf:]] for x in gates]).float()
        n_forget = int(span.sum()) * len(gates)
        target = torch.cat([torch.ones(n_forget), torch.zeros(len(g) - n_forget)])
        pairs.append((self._sums["gate_loss"] - before, float(F.binary_cross_entropy(g, target))))
        return loss
    monkeypatch.setattr(trainer_module.GRUNTrainer, "compute_loss", spy)
    unlearn(model, tok, forget, retain, method="gd", layers=[1, 3], positions="all", max_steps=2, **FAST)
    assert len(pairs) == 2
    for got, want in pairs:
        assert got == pytest.approx(want, rel=1e-5)


def _row_nll(logits, labels):
    """Per-row summed NLL and token count with plain torch."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction="none")
    return nll.view(lb.shape).sum(-1), (lb != -100).sum(-1)


@pytest.mark.parametrize("method", ["gd", "idk", "npo", "simnpo"])
def test_trainer_loss_matches_the_objective_from_logits(data, monkeypatch, method):
    forget, retain = data
    model, tok = untrained_tiny(forget + retain, 32, 4, seed=0)
    pairs = []
    real = trainer_module.GRUNTrainer.compute_loss

    def spy(self, model_, inputs, *args, **kwargs):
        cfg, nf = self.grun_config, int(inputs["n_forget"])
        with torch.no_grad(), grun_fast.edit_at(self.grun_model, positions=inputs["edit_pos"]):
            logits = self.grun_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        gates = [m.last_gate for m in grun_fast.adapter_modules(self.grun_model).values()]
        s, n = _row_nll(logits, inputs["labels"])
        with torch.no_grad(), grun_fast.disable_adapters(self.grun_model):   # the frozen model's retain NLLs
            base_logits = self.grun_model(input_ids=inputs["input_ids"][nf:],
                                          attention_mask=inputs["attention_mask"][nf:]).logits
        s_base = _row_nll(base_logits, inputs["labels"][nf:])[0]
        retain_term = (s[nf:] - s_base).clamp(min=0).sum() / n[nf:].sum()   # only the excess is penalised
        if method == "gd":
            forget_term = -s[:nf].sum() / n[:nf].sum()
        elif method == "idk":
            forget_term = s[:nf].sum() / n[:nf].sum()
        elif method == "simnpo":   # per row: beta x mean token NLL
            forget_term = -(2 / cfg.beta) * F.logsigmoid(cfg.beta * s[:nf] / n[:nf]).mean()
        else:
            ref = self.reference[inputs["forget_index"]]
            forget_term = -(2 / cfg.beta) * F.logsigmoid(cfg.beta * (s[:nf] - ref)).mean()
        g = torch.cat([x[:nf].reshape(-1) for x in gates] + [x[nf:].reshape(-1) for x in gates]).float()
        target = torch.cat([torch.ones(nf * len(gates)), torch.zeros((len(g) - nf * len(gates)))])
        gate_term = F.binary_cross_entropy(g, target)
        expected = cfg.forget_scale * forget_term + cfg.lambda_r * retain_term + cfg.lambda_g * gate_term
        loss = real(self, model_, inputs, *args, **kwargs)
        pairs.append((float(loss.detach()), float(expected)))
        return loss
    monkeypatch.setattr(trainer_module.GRUNTrainer, "compute_loss", spy)
    unlearn(model, tok, forget, retain, method=method, layers=[1, 3], max_steps=3, positions="last_prompt",
            answer_suffixes=0, **FAST)   # suffix rows stay out of the gate term (suffix_gate False)
    assert len(pairs) == 3
    for got, want in pairs:
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    # the defaults that enter the sum (gd: forget x1, retain x2; npo: forget x10)
    scale = {"gd": (1.0, 2.0), "idk": (1.0, 1.0), "npo": (10.0, 4.0), "simnpo": (10.0, 4.0)}[method]
    cfg = grun_fast.unlearn.UnlearnConfig(method=method)
    assert (cfg.forget_scale, cfg.lambda_r, cfg.lambda_g) == (*scale, 10.0)
    assert cfg.for_data(len(forget)).beta == {"npo": 0.1, "simnpo": 2.0}.get(method, 0.1)   # simnpo: <= 40 rows
    assert not math.isnan(pairs[-1][0])
