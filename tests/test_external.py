"""EditAtPromptEnd: an evaluator's plain teacher-forced forward of prompt+answer scores the adapter as GRUN
applies it (edit at the last prompt token), from labels or explicit prompt lengths."""
import pytest
import torch

import grun_fast
from grun_fast import GRUNConfig, GRUNError
from grun_fast.evaluation.external import EditAtPromptEnd, positions_from_prompt_lengths, prompt_end_positions
from tests.conftest import tiny_model


def patched_strong(positions="last_prompt"):
    model = tiny_model("llama")
    torch.manual_seed(3)
    grun_fast.patch(model, GRUNConfig(layers=[1, 2], positions=positions))
    for module in grun_fast.adapter_modules(model).values():
        with torch.no_grad():
            module.gate.bias.fill_(30.0)
            module.bias.mul_(8)
    return model


def batch(padding="right"):
    """Two prompt+answer rows: prompt lengths 4 and 6, answers 5 and 2 tokens."""
    torch.manual_seed(0)
    rows = [(torch.randint(3, 97, (4,)), torch.randint(3, 97, (5,))),
            (torch.randint(3, 97, (6,)), torch.randint(3, 97, (2,)))]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), -100)
    for i, (p, a) in enumerate(rows):
        seq = torch.cat([p, a])
        start = 0 if padding == "right" else width - len(seq)
        ids[i, start:start + len(seq)] = seq
        mask[i, start:start + len(seq)] = 1
        labels[i, start + len(p):start + len(seq)] = a
    return ids, mask, labels, torch.tensor([len(p) for p, _ in rows])


@pytest.mark.parametrize("padding", ["right", "left"])
def test_wrapper_logits_equal_edit_at_the_prompt_end(padding):
    model = patched_strong()
    ids, mask, labels, lengths = batch(padding)
    start = mask.argmax(-1)
    expected_pos = start + lengths - 1
    with torch.no_grad():
        with grun_fast.edit_at(model, positions=expected_pos):
            expected = model(input_ids=ids, attention_mask=mask).logits
        plain = model(input_ids=ids, attention_mask=mask).logits
        scorer = EditAtPromptEnd(model)
        got = scorer(input_ids=ids, attention_mask=mask, labels=labels)
        by_length = scorer(input_ids=ids, attention_mask=mask, prompt_lengths=lengths).logits
    assert torch.equal(prompt_end_positions(labels, mask), expected_pos)
    assert torch.equal(got.logits, expected)
    assert torch.equal(by_length, expected)
    assert got.loss is not None                       # labels still reach the model
    real = mask.bool()
    assert not torch.allclose(got.logits[real], plain[real], atol=1e-3)    # the plain forward edits elsewhere
    # the plain forward edits the last real token: the prompt and answer logits before it are the base's
    with grun_fast.disable_adapters(model), torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    last = (real.long() * torch.arange(ids.shape[1])).argmax(-1)
    for row in range(2):
        before = real[row] & (torch.arange(ids.shape[1]) < last[row])
        assert torch.allclose(plain[row, before], base[row, before], atol=1e-5)


def test_prompt_lengths_override_labels_and_constructor_default():
    model = patched_strong()
    ids, mask, labels, lengths = batch()
    other = lengths - 1
    with torch.no_grad():
        with grun_fast.edit_at(model, positions=other - 1):
            expected = model(input_ids=ids, attention_mask=mask).logits
        got = EditAtPromptEnd(model)(input_ids=ids, attention_mask=mask, labels=labels, prompt_lengths=other)
        default = EditAtPromptEnd(model, prompt_lengths=other)(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(got.logits, expected)
    assert torch.equal(default.logits, expected)


def test_wrapper_forwards_attributes_and_generate_and_plain_without_labels():
    model = patched_strong()
    scorer = EditAtPromptEnd(model)
    assert scorer.config is model.config
    assert scorer.device == model.device
    assert scorer.generation_config is model.generation_config
    assert sum(p.numel() for p in scorer.parameters()) == sum(p.numel() for p in model.parameters())
    ids, mask, _, _ = batch()
    with torch.no_grad():
        assert torch.equal(scorer(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    prompt = ids[:1, :4]
    out = scorer.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False))


def test_unpatched_model_runs_plainly():
    model = tiny_model("llama")
    ids, mask, labels, _ = batch()
    with torch.no_grad():
        assert torch.equal(EditAtPromptEnd(model)(input_ids=ids, attention_mask=mask, labels=labels).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


def test_prompt_end_positions_by_hand():
    labels = torch.tensor([[-100, -100, 5, 6, -100],      # answer from column 2: prompt ends at 1
                           [-100, -100, -100, -100, 7],   # answer at 4: prompt ends at 3
                           [-100, -100, -100, -100, -100]])  # no answer: last real token (mask)
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert prompt_end_positions(labels, mask).tolist() == [1, 3, 2]
    assert prompt_end_positions(labels).tolist() == [1, 3, 4]
    assert positions_from_prompt_lengths([2, 3, 1], 3, 5, mask).tolist() == [1, 3, 0]


@pytest.mark.parametrize("labels, mask, match", [
    (torch.tensor([[5, 6, -100]]), None, "no prompt token"),
    (torch.tensor([[-100, 5, 6]]), torch.tensor([[0, 1, 1]]), "no prompt token"),
    (torch.tensor([[0.5, 1.0]]), None, "integer tensor"),
    (torch.tensor([[-100, 5]]), torch.tensor([[1, 1, 1]]), "attention_mask has shape"),
])
def test_prompt_end_positions_errors(labels, mask, match):
    with pytest.raises(GRUNError, match=match):
        prompt_end_positions(labels, mask)


@pytest.mark.parametrize("lengths, match", [([0, 2], ">= 1"), ([2, 9], "reach past"), ([1.5, 2.0], "integers"),
                                            ([1, 2, 3], "integers")])
def test_prompt_lengths_errors(lengths, match):
    with pytest.raises(GRUNError, match=match):
        positions_from_prompt_lengths(lengths, 2, 5)
