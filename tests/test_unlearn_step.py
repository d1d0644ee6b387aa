"""The training step's forward (grun_fast.unlearn.step): the LM head at answer tokens only and the cached
prompt prefix give the loss and the adapter gradients of the plain full-logits forward."""
import pytest
import torch

import grun_fast
from grun_fast.answer_head import supports_answer_head
from grun_fast.unlearn.step import PrefixCache, batch_answer_nll
from tests.conftest import TINY_CONFIGS, tiny_model

FALLBACK = {"gemma2"}


def make_batch(vocab: int, seed: int = 0, rows: int = 5, width: int = 19):
    """Right-padded rows of different lengths; labels on the answer (after prompt_len) only."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, width), generator=g)
    lengths = torch.tensor([width, width - 3, 11, width - 1, 7])[:rows]
    prompt = torch.tensor([5, 9, 4, 1, 6])[:rows]             # prompt_len 1: an empty prefix
    steps = torch.arange(width)
    mask = (steps[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    labels = torch.where((steps[None] >= prompt[:, None]) & mask.bool(), ids, torch.full_like(ids, -100))
    return ids, mask, labels, prompt - 1


def patched(model_type: str, layers, attn: str = "eager", seed: int = 0):
    model = tiny_model(model_type, seed=seed)
    model.config._attn_implementation = attn
    model.requires_grad_(False)
    grun_fast.patch(model, grun_fast.GRUNConfig(layers=layers, rank=2))
    torch.manual_seed(seed + 1)
    with torch.no_grad():   # a visible edit and a gate away from 0.5
        for p in grun_fast.adapter_parameters(model):
            p.add_(0.3 * torch.randn_like(p))
    return model


def loss_and_grads(model, fn):
    """A loss mixing per-row NLL and every layer's gates (weights fixed), its value and adapter gradients."""
    params = list(grun_fast.adapter_parameters(model))
    for p in params:
        p.grad = None
    nll = fn()
    gates = torch.stack([m.last_gate for m in grun_fast.adapter_modules(model).values()])
    w = torch.linspace(-1.0, 2.0, nll.shape[0])
    loss = (nll * w).sum() + 3.0 * (gates * w).sum()
    loss.backward()
    return loss.detach(), nll.detach(), [p.grad.clone() for p in params]


def assert_same(a, b):
    (la, na, ga), (lb, nb, gb) = a, b
    assert torch.allclose(na, nb, rtol=1e-5, atol=1e-4), (na, nb)
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-4)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), (x - y).abs().max()


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_answer_head_and_cached_prefix_match_full_logits(model_type):
    model = patched(model_type, [1, 2])
    ids, mask, labels, edit = make_batch(model.config.vocab_size)
    keys = list(range(ids.shape[0]))
    full = loss_and_grads(model, lambda: batch_answer_nll(model, ids, mask, labels, edit, answer_head=False)[0])
    head = loss_and_grads(model, lambda: batch_answer_nll(model, ids, mask, labels, edit)[0])
    assert_same(full, head)
    assert supports_answer_head(model)
    cache = PrefixCache(model, skip=1, max_bytes=2**30)
    for _ in range(2):    # first call fills the cache (and self-checks), the second reuses it
        prefix = loss_and_grads(model, lambda: batch_answer_nll(model, ids, mask, labels, edit, keys=keys,
                                                                prefix_cache=cache)[0])
        assert_same(full, prefix)
    # gemma2 alternates sliding-window layers (a cache of another kind): it falls back to the plain step
    assert cache.enabled == (model_type not in FALLBACK), model_type
    if cache.enabled:
        assert cache.hits == len(keys) and cache.misses == len(keys)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layers", [[0, 2], [1, 2]])
def test_cached_prefix_attention_implementations_and_depths(attn, layers):
    model = patched("llama", layers, attn)
    ids, mask, labels, edit = make_batch(model.config.vocab_size, seed=3)
    keys = [("k", i) for i in range(ids.shape[0])]
    full = loss_and_grads(model, lambda: batch_answer_nll(model, ids, mask, labels, edit, answer_head=False)[0])
    cache = PrefixCache(model, skip=min(layers), max_bytes=2**30)
    prefix = loss_and_grads(model, lambda: cache.answer_nll(ids, mask, labels, edit, keys))
    assert cache.enabled
    assert_same(full, prefix)
    # without the LM-head shortcut too, and over budget (nothing stored: recomputed, still exact)
    tight = PrefixCache(model, skip=min(layers), max_bytes=0)
    again = loss_and_grads(model, lambda: tight.answer_nll(ids, mask, labels, edit, keys, answer_head=False))
    assert_same(full, again)
    assert not tight.store and tight.enabled


def test_cached_prefix_declines_batches_it_cannot_serve():
    model = patched("llama", [1, 2])
    ids, mask, labels, edit = make_batch(model.config.vocab_size)
    cache = PrefixCache(model, skip=1, max_bytes=2**30)
    inside = labels.clone()
    inside[0, 2] = ids[0, 2]                  # a label inside the prompt prefix
    assert cache.answer_nll(ids, mask, inside, edit, list(range(5))) is None
    left = torch.flip(mask, [1])              # left padding
    assert cache.answer_nll(ids, left, labels, edit, list(range(5))) is None
    assert not cache.store


def test_softcapped_logits_are_reproduced():
    model = patched("gemma2", [1, 2])
    assert model.config.final_logit_softcapping
    model.config.final_logit_softcapping = 0.5    # strong capping: a missed cap would show
    ids, mask, labels, edit = make_batch(model.config.vocab_size, seed=5)
    full = loss_and_grads(model, lambda: batch_answer_nll(model, ids, mask, labels, edit, answer_head=False)[0])
    head = loss_and_grads(model, lambda: batch_answer_nll(model, ids, mask, labels, edit)[0])
    assert_same(full, head)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_answer_log_probs_match_the_model_logits(model_type):
    """log_probs_from: the whole next-token distributions at the answer tokens of the rows asked for, as the
    model's own logits give them (float64 log-softmax reference), from either path, with the same gradients."""
    model = patched(model_type, [1, 2])
    if model_type == "gemma2":
        model.config.final_logit_softcapping = 0.5
    ids, mask, labels, edit = make_batch(model.config.vocab_size, seed=2)
    with torch.no_grad(), grun_fast.edit_at(model, positions=edit):
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    picked = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)[2:] != -100
    want = logits[2:][picked].log_softmax(-1)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for head in (False, True):
        scores = batch_answer_nll(model, ids, mask, labels, edit, answer_head=head, log_probs_from=2)
        assert scores.log_probs.dtype == torch.float32 and scores.log_probs.shape == want.shape
        assert torch.allclose(scores.log_probs.double(), want, atol=1e-5), (scores.log_probs - want).abs().max()
        params = list(grun_fast.adapter_parameters(model))
        grads.append(torch.autograd.grad((scores.log_probs * weights).sum(), params))
        assert batch_answer_nll(model, ids, mask, labels, edit, answer_head=head).log_probs is None
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_nll_matches_cross_entropy(monkeypatch, cap, with_bias):
    from grun_fast import answer_head

    monkeypatch.setattr(answer_head, "VOCAB_CHUNK", 7)      # uneven chunks over a vocabulary of 40
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 6, generator=g, dtype=torch.float64).float().requires_grad_(True)
    weight = torch.randn(40, 6, generator=g)
    bias = torch.randn(40, generator=g) if with_bias else None
    target = torch.randint(0, 40, (9,), generator=g)
    target[0], target[1] = 0, 39                          # first and last vocabulary entries
    w = torch.randn(9, generator=g)
    nll = answer_head.HeadNLL.apply(hidden, weight, bias, target, cap)
    (nll * w).sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    logits = torch.nn.functional.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    if cap:
        logits = torch.tanh(logits / cap) * cap
    ref = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    (ref * w.double()).sum().backward()
    assert torch.allclose(nll.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got, hidden.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():    # the scoring form: chunks dropped as read, same numbers
        scored = answer_head.HeadNLL.apply(hidden, weight, bias, target, cap, False)
    assert torch.equal(scored, nll.detach())
    with pytest.raises(RuntimeError, match="keep=False"):
        answer_head.HeadNLL.apply(hidden, weight, bias, target, cap, False).sum().backward()
