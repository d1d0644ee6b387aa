"""Evaluation: each TOFU metric against numbers worked out by hand, batched scoring/generation against
one-row-at-a-time and against a manual forward, bad input, and the eval/compare commands end to end."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import grun_fast
from grun_fast.errors import GRUNError
from grun_fast.evaluation import metrics
from grun_fast.evaluation.multiple_choice import evaluate_multiple_choice, load_mc_file, mc_prompt, letter_token_ids
from grun_fast.evaluation.generation import generate
from grun_fast.evaluation.scoring import answer_nll
from grun_fast.evaluation.splits import align_perturbed, tofu_eval_splits, validate_split
from grun_fast.evaluation.tofu import evaluate, forget_truth_ratios
from grun_fast.testing import make_tiny_tokenizer, tiny_llama
from tests.conftest import TINY_CONFIGS, tiny_model

REPO = Path(__file__).resolve().parents[1]
TOFU_DIR = Path(os.environ.get("GRUN_TOFU_DIR", REPO.parent / "shared" / "data" / "tofu"))
needs_tofu = pytest.mark.skipif(not (TOFU_DIR / "forget01_perturbed.json").is_file(), reason="TOFU folder absent")
LN = math.log


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the thread hand-offs cost more
    than the work (these tests ran 4x slower with 2 threads on the 2-core CI machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- metrics, by hand ---------------------------------------------------------------------------

def test_answer_probability_by_hand():
    # exp(-ln 2) = 1/2, exp(-ln 4) = 1/4 -> mean 3/8
    assert metrics.answer_probability([LN(2), LN(4)]) == pytest.approx(0.375)


def test_normalized_probability_by_hand():
    # row 1: p = 1/2, options 1/4 + 1/4 -> 1/2; row 2: p = 1, option 1/2 -> 2/3; mean 7/12
    value = metrics.normalized_probability([LN(2), 0.0], [[LN(4), LN(4)], [LN(2)]])
    assert value == pytest.approx(7 / 12)
    # far below float range in probability space: still exact in log space
    assert metrics.normalized_probability([1000.0], [[1000.0, 1000.0, 1000.0]]) == pytest.approx(0.25)


def test_truth_ratio_by_hand():
    # row 1: mean perturbed Lbar = (ln 4 + ln 16) / 2 = 3 ln 2, paraphrase ln 2 -> t = exp(2 ln 2) = 4
    # row 2: perturbed ln 2, paraphrase ln 4 -> t = 1/2
    t = metrics.truth_ratios([LN(2), LN(4)], [[LN(4), LN(16)], [LN(2)]])
    np.testing.assert_allclose(t, [4.0, 0.5])
    # forget: mean min(t, 1/t) = (1/4 + 1/2) / 2; others: mean max(0, 1 - 1/t) = (3/4 + 0) / 2
    assert metrics.truth_ratio_score(t, forget=True) == pytest.approx(0.375)
    assert metrics.truth_ratio_score(t, forget=False) == pytest.approx(0.375)
    assert metrics.truth_ratio_score([4.0], forget=False) == pytest.approx(0.75)
    assert metrics.truth_ratio_score([0.5], forget=False) == 0.0
    assert metrics.truth_ratio_score([0.5], forget=True) == pytest.approx(0.5)


def test_forget_quality_ks_by_hand():
    # Fully separated samples of 4 and 4: D = 1, exact two-sided p = 2 / C(8, 4) = 2 / 70
    assert metrics.forget_quality([1, 2, 3, 4], [5, 6, 7, 8]) == pytest.approx(2 / 70)
    # Identical samples: D = 0, p = 1
    assert metrics.forget_quality([0.3, 0.7, 1.2], [0.3, 0.7, 1.2]) == pytest.approx(1.0)
    # {1, 2} vs {1.5, 2.5}: D = 1/2, the smallest value D takes for n = m = 2 without ties, so p = 1
    assert metrics.forget_quality([1, 2], [1.5, 2.5]) == pytest.approx(1.0)


def test_harmonic_mean_and_model_utility_by_hand():
    assert metrics.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    nine = {s: {"probability": 0.5, "rouge_l": 0.5, "truth_ratio": 0.5} for s in metrics.UTILITY_SPLITS}
    nine["world_facts"]["truth_ratio"] = 0.25
    # 9 / (8 * 2 + 4) = 0.45
    assert metrics.model_utility(nine) == pytest.approx(0.45)
    nine["real_authors"]["rouge_l"] = 0.0
    assert metrics.model_utility(nine) == 0.0
    with pytest.raises(ValueError, match="missing"):
        metrics.model_utility({"retain": nine["retain"]})
    with pytest.raises(ValueError, match="non-negative"):
        metrics.harmonic_mean([0.5, -0.1])


def test_rouge_l_recall_by_hand():
    # LCS of "the cat sat on the mat" and "a cat on a mat" is "cat on mat": 3 of 6 reference words
    assert metrics.rouge_l_recall("a cat on a mat", "the cat sat on the mat") == pytest.approx(0.5)
    assert metrics.rouge_l_recall("cat runs", "cats running") == pytest.approx(1.0)  # stemmed
    assert metrics.rouge_l_recall("", "anything here") == 0.0


def test_multiple_choice_accuracy_by_hand():
    assert metrics.multiple_choice_accuracy([[0.1, 0.5, 0.2], [0.9, 0.0, 0.1]], [1, 2]) == 0.5


def test_metrics_reject_bad_numbers():
    with pytest.raises(ValueError, match="non-empty"):
        metrics.answer_probability([])
    with pytest.raises(ValueError, match="NaN"):
        metrics.truth_ratios([float("nan")], [[1.0]])
    with pytest.raises(ValueError, match="2 rows for 1"):
        metrics.truth_ratios([1.0], [[1.0], [2.0]])


# --- a tiny model ---------------------------------------------------------------------------------

def _rows(n=6, kind="forget"):
    rows = []
    for i in range(n):
        name = ["Ada Vole", "Bo Quill", "Cy Marsh", "Di Fenn", "Ed Rook", "Flo Heath", "Gus Lark"][i % 7]
        row = {"question": f"Where was {name} born{'?' * (1 + i % 3)}", "answer": f"{name} was born in town {i}."}
        if kind != "knowledge":
            row["paraphrased_answer"] = f"The birthplace of {name} is town {i}."
        row["perturbed_answer"] = [f"{name} was born in city {i + k}." for k in range(1, 2 + i % 3)]
        if kind == "forget":
            row["paraphrased_question"] = f"What is the birthplace of {name}?"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def tiny():
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']} {r.get('paraphrased_answer', '')} "
             + " ".join(r["perturbed_answer"]) for r in _rows(7)]
    tokenizer = make_tiny_tokenizer(texts * 3 + ["A B C D Answer: choices"], vocab_size=350)
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2).double().eval()
    return model, tokenizer


@pytest.fixture
def patched(tiny):
    model, tokenizer = tiny
    torch.manual_seed(3)
    grun_fast.patch(model, grun_fast.GRUNConfig(layers=[0, 1], rank=2))
    with torch.no_grad():  # a gate far from 1/2 and an edit large enough to matter
        for m in grun_fast.adapter_modules(model).values():
            m.gate.weight.normal_(0, 2.0)
            m.weight.mul_(30)
    yield model, tokenizer
    grun_fast.unpatch(model)


def _manual_nll(model, tokenizer, row, edit: bool):
    """One row, no batching: prompt ids + answer ids + EOS, edit at prompt_len - 1, mean NLL by hand."""
    prompt = f"Question: {row['question']}\nAnswer:"
    p = tokenizer(prompt)["input_ids"]
    joined = tokenizer(prompt + " " + row["answer"])["input_ids"]   # the answer joined by one space
    assert joined[:len(p)] == p
    a = joined[len(p):] + [tokenizer.eos_token_id]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        if edit:
            with grun_fast.edit_at(model, mask=torch.arange(ids.shape[1])[None] == len(p) - 1):
                logits = model(input_ids=ids).logits
        else:
            logits = model(input_ids=ids).logits
    logp = torch.log_softmax(logits[0].double(), -1)
    return -np.mean([logp[len(p) - 1 + k, tok].item() for k, tok in enumerate(a)]), len(p)


def test_answer_nll_matches_manual_forward_and_is_batch_invariant(tiny):
    model, tokenizer = tiny
    rows = _rows(6)
    nll, gates = answer_nll(model, tokenizer, rows, batch_size=4)
    assert gates == {}
    expected = [_manual_nll(model, tokenizer, r, edit=False)[0] for r in rows]
    np.testing.assert_allclose(nll, expected, rtol=1e-6)
    one = [answer_nll(model, tokenizer, [r], batch_size=1)[0][0] for r in rows]
    np.testing.assert_allclose(nll, one, rtol=1e-6)


def test_open_unlearning_encoding_scores_its_evaluators_tokens(patched):
    """--encoding open-unlearning: ids = tokenize(prompt + " " + answer) + EOS, labels (and the edit) from
    len(tokenize(prompt + " ")), as open-unlearning's evaluator builds them."""
    model, tokenizer = patched
    rows = _rows(5)
    nll, _ = answer_nll(model, tokenizer, rows, batch_size=3, encoding="open-unlearning")
    expected, merged = [], 0
    for r in rows:
        prompt = f"Question: {r['question']}\nAnswer: "
        p = len(tokenizer(prompt)["input_ids"])
        ids = tokenizer(prompt + r["answer"])["input_ids"] + [tokenizer.eos_token_id]
        merged += ids[:p] != tokenizer(prompt)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad(), grun_fast.edit_at(model, mask=torch.arange(len(ids))[None] == p - 1):
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
        expected.append(-np.mean([logp[k - 1, ids[k]].item() for k in range(p, len(ids))]))
    np.testing.assert_allclose(nll, expected, rtol=1e-6)
    assert merged > 0    # this tokenizer merges the trailing space into the first answer word
    ours, _ = answer_nll(model, tokenizer, rows, batch_size=3)
    assert np.max(np.abs(ours - nll)) > 1e-3


@pytest.mark.parametrize("answer_head", [True, False], ids=["answer_head", "full_logits"])
def test_answer_nll_edits_last_prompt_token_and_reads_its_gate(patched, answer_head, monkeypatch):
    model, tokenizer = patched
    if not answer_head:   # the path of model types whose logits are not plain head(hidden)
        monkeypatch.setattr(grun_fast.evaluation.scoring, "supports_answer_head", lambda m: False)
    rows = _rows(5)
    nll, gates = answer_nll(model, tokenizer, rows, batch_size=3, gates=grun_fast.evaluation.scoring.gate_modules(model))
    expected = [_manual_nll(model, tokenizer, r, edit=True)[0] for r in rows]
    np.testing.assert_allclose(nll, expected, rtol=1e-6)
    # the edit changes the scores (so the check above fails if the edit sat elsewhere or nowhere)
    base = [_manual_nll_base(model, tokenizer, r) for r in rows]
    assert np.max(np.abs(np.asarray(base) - nll)) > 1e-3
    # gate = sigmoid(g(h)) of layer 0's unedited output at the last prompt token
    module = grun_fast.adapter_modules(model)[0]
    for i, r in enumerate(rows):
        p = tokenizer(f"Question: {r['question']}\nAnswer:")["input_ids"]
        h = _base_hidden(model, p)[0, len(p) - 1]
        want = torch.sigmoid(module.gate(h.to(module.gate.weight.dtype))).item()
        assert gates["default"][0][i] == pytest.approx(want, rel=1e-6)
    assert np.std(gates["default"][0]) > 1e-4  # rows differ: each row's own gate was read


def _without_adapters(model):
    """Context in which the patched model runs as the base model (its adapters are switched off)."""
    return grun_fast.disable_adapters(model)


def _manual_nll_base(model, tokenizer, row):
    with _without_adapters(model):
        return _manual_nll(model, tokenizer, row, edit=False)[0]


def _base_hidden(model, prompt):
    with _without_adapters(model), torch.no_grad():
        return model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states[1]


def test_batched_generation_equals_one_by_one(patched):
    model, tokenizer = patched
    rows = _rows(7)
    batched = generate(model, tokenizer, rows, batch_size=4, max_new_tokens=10)
    single = [generate(model, tokenizer, [r], batch_size=1, max_new_tokens=10)[0] for r in rows]
    assert batched == single
    assert len(set(batched)) > 1
    assert generate(model, tokenizer, [], batch_size=4) == []
    # the adapter acts during generation's prefill: unpatched generations differ somewhere
    with _without_adapters(model):
        plain = generate(model, tokenizer, rows, batch_size=4, max_new_tokens=10)
    assert plain != batched


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_continuous_batching_matches_model_generate(patched, batch_size):
    """Rows leave and join the running batch (continuous batching); each row's tokens must still be exactly
    model.generate's greedy tokens for that prompt alone, cut at EOS."""
    model, tokenizer = patched
    rows = _rows(7)
    eos = tokenizer.eos_token_id
    ours = generate(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=12)
    for r, text in zip(rows, ours):
        ids = torch.tensor([tokenizer(f"Question: {r['question']}\nAnswer:")["input_ids"]])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)[0, ids.shape[1]:].tolist()
        if eos in ref:
            ref = ref[:ref.index(eos)]
        assert text == tokenizer.decode(ref, skip_special_tokens=True)


def test_generation_with_eos_leaves_and_refills(patched, monkeypatch):
    """Force an early EOS for some rows, so rows finish at different steps and queued prompts join mid-run."""
    from grun_fast.evaluation import generation

    model, tokenizer = patched
    rows = _rows(9)
    eos = tokenizer.eos_token_id
    head = model.get_output_embeddings()
    calls = {"n": 0}

    def biased(module, args, output):   # rows whose current input sum is odd are pushed to EOS
        calls["n"] += 1
        out = output.clone()
        push = (args[0].sum(dim=(1, 2)) * 1e3).long() % 3 == 0
        out[push, :, eos] += 1e4
        return out
    handle = head.register_forward_hook(biased)
    seen = []
    real_merge = generation._Decoder._merge
    monkeypatch.setattr(generation._Decoder, "_merge",
                        lambda self, old, new: (seen.append((len(old.rows) if old else 0, len(new.rows))),
                                                             real_merge(self, old, new))[1])
    try:
        batched = generate(model, tokenizer, rows, batch_size=4, max_new_tokens=10)
        single = [generate(model, tokenizer, [r], batch_size=1, max_new_tokens=10)[0] for r in rows]
    finally:
        handle.remove()
    assert batched == single
    lengths = {len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in batched}
    assert len(lengths) > 1                  # rows really stopped at different steps
    assert any(a > 0 for a, _ in seen)       # and prompts joined a batch that was still running


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_continuous_batching_every_architecture(model_type):
    """Token-level: the decoder (rows leaving at EOS, queued prompts joining) gives model.generate's greedy
    tokens of each prompt alone, with a GRUN adapter editing the prefill, on every supported architecture
    (gemma2's sliding-window cache takes the fixed-batch fallback)."""
    from tqdm.auto import tqdm

    from grun_fast.evaluation.generation import _Decoder

    model = tiny_model(model_type)
    grun_fast.patch(model, grun_fast.GRUNConfig(layers=[1], rank=2))
    with torch.no_grad():
        for m in grun_fast.adapter_modules(model).values():
            m.gate.bias.fill_(5.0)
            m.weight.mul_(30)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 9, 3, 7, 12, 4, 6)]

    def reference(prompt, eos):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=8, pad_token_id=0, eos_token_id=eos)[0, len(prompt):].tolist()
        ends = [i for i, t in enumerate(out) if t in (eos if isinstance(eos, list) else [eos])]
        return out[:ends[0]] if ends else out

    eos = reference(prompts[0], None)[3]          # the first row stops early, others may not
    expected = [reference(p, eos) for p in prompts]
    got = _Decoder(model, pad_id=0, eos_ids={eos}, max_new_tokens=8).run(prompts, 3, tqdm(disable=True))
    assert got == expected
    assert len({len(t) for t in got}) > 1
    # several end ids (a chat model's end-of-turn besides EOS): each row stops at the first of them
    second = reference(prompts[1], None)[2]
    stops = [eos, second]
    expected = [reference(p, stops) for p in prompts]
    got = _Decoder(model, pad_id=0, eos_ids=set(stops), max_new_tokens=8).run(prompts, 3, tqdm(disable=True))
    assert got == expected and got != [reference(p, eos) for p in prompts]


def test_evaluate_numbers_follow_from_row_scores(patched):
    model, tokenizer = patched
    splits = {"forget": _rows(5), "retain": _rows(4, "retain"), "real_authors": _rows(3, "knowledge"),
              "world_facts": _rows(4, "knowledge")}
    res = evaluate(model, tokenizer, splits, batch_size=3, max_new_tokens=6, progress=False,
                   retain_truth_ratios=[0.9, 1.1, 1.3, 0.7])
    json.dumps(res)  # plain numbers only
    f = res["splits"]["forget"]
    rows = f["rows"]
    assert f["kind"] == "forget" and f["n"] == 5
    assert f["probability"] == pytest.approx(np.mean([math.exp(-r["nll"]) for r in rows]))
    t = [math.exp(np.mean(r["perturbed_nll"]) - r["paraphrased_nll"]) for r in rows]
    np.testing.assert_allclose([r["truth_ratio"] for r in rows], t)
    assert f["truth_ratio"] == pytest.approx(np.mean([min(x, 1 / x) for x in t]))
    assert f["rouge_l"] == pytest.approx(np.mean([metrics.rouge_l_recall(r["generation"], r["answer"]) for r in rows]))
    assert set(f["gate"]["default"]) == {"0", "1"}
    assert f["gate"]["default"]["1"] == pytest.approx(np.mean([r["gate"]["default"]["1"] for r in rows]))
    assert "paraphrased_question" in f and set(f["paraphrased_question"]["gate"]["default"]) == {"0", "1"}
    # the reworded question gives a different gate: it was read from a different forward
    assert f["paraphrased_question"]["gate"]["default"]["0"] != f["gate"]["default"]["0"]
    # knowledge split: normalised probability and the answer standing in for the paraphrase
    k = res["splits"]["real_authors"]
    assert k["kind"] == "knowledge" and "paraphrased_question" not in k
    assert k["probability"] == pytest.approx(metrics.normalized_probability(
        [r["nll"] for r in k["rows"]], [r["perturbed_nll"] for r in k["rows"]]))
    assert all(r["paraphrased_nll"] == r["nll"] for r in k["rows"])
    r = res["splits"]["retain"]
    assert r["truth_ratio"] == pytest.approx(np.mean([max(0, 1 - 1 / x["truth_ratio"]) for x in r["rows"]]))
    assert res["forget_quality"]["forget"] == pytest.approx(
        metrics.forget_quality([x["truth_ratio"] for x in rows], [0.9, 1.1, 1.3, 0.7]))
    assert res["model_utility"] == pytest.approx(metrics.model_utility(res["splits"]))
    # the same scores batched differently
    again = evaluate(model, tokenizer, {"forget": _rows(5)}, batch_size=1, max_new_tokens=6, progress=False)
    np.testing.assert_allclose([x["nll"] for x in again["splits"]["forget"]["rows"]], [x["nll"] for x in rows])
    assert [x["generation"] for x in again["splits"]["forget"]["rows"]] == [x["generation"] for x in rows]
    assert again["forget_quality"] == {} and again["model_utility"] is None


# --- bad input -------------------------------------------------------------------------------------

def test_bad_splits_fail_before_model_work(tiny):
    model, tokenizer = tiny

    class Boom(torch.nn.Module):
        training = False

        def __getattr__(self, name):
            raise AssertionError("the model was used")

    with pytest.raises(GRUNError, match="'forget01' is empty"):
        evaluate(Boom(), tokenizer, {"forget01": []})
    bad = _rows(3)
    del bad[1]["paraphrased_question"]
    with pytest.raises(GRUNError, match="row 1: missing field 'paraphrased_question'"):
        evaluate(Boom(), tokenizer, {"retain": _rows(2, "retain"), "forget01": bad})
    bad = _rows(2, "knowledge")
    bad[0]["perturbed_answer"] = "a single string"
    with pytest.raises(GRUNError, match="perturbed_answer.*list"):
        validate_split("world_facts", bad)
    with pytest.raises(GRUNError, match="plain list needs exactly one forget split"):
        evaluate(Boom(), tokenizer, {"retain": _rows(2, "retain")}, retain_truth_ratios=[1.0])
    with pytest.raises(GRUNError, match="positive"):
        evaluate(Boom(), tokenizer, {"forget": _rows(2)}, retain_truth_ratios=[1.0, -2.0])


def test_misaligned_perturbed_rows():
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    pert = [{"question": "q1", "answer": "a1", "perturbed_answer": ["x"]},
            {"question": "q3", "answer": "a2", "perturbed_answer": ["y"]}]
    with pytest.raises(GRUNError, match="row 1 does not align"):
        align_perturbed("forget01", rows, pert)
    with pytest.raises(GRUNError, match="1 rows but forget01 has 2"):
        align_perturbed("forget01", rows, pert[:1])
    merged = align_perturbed("forget01", rows[:1], pert[:1])
    assert merged == [{"question": "q1", "answer": "a1", "perturbed_answer": ["x"]}]


def test_missing_split_files(tmp_path):
    (tmp_path / "forget01.json").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(GRUNError, match="forget01_perturbed"):
        tofu_eval_splits(tmp_path, "forget01")
    with pytest.raises(GRUNError, match="forget split"):
        tofu_eval_splits(tmp_path, "retain90")


def test_forget_truth_ratios_from_saved_evaluation(tmp_path):
    saved = {"meta": {}, "metrics": {"splits": {"forget01": {"rows": [
        {"question": "a", "truth_ratio": 0.5}, {"question": "b", "truth_ratio": 2.0}]}}}}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(saved))
    assert forget_truth_ratios(path, "forget01") == [0.5, 2.0]
    assert forget_truth_ratios(path, "forget01", ["b"]) == [2.0]
    with pytest.raises(GRUNError, match="lacks 1 of the 2"):
        forget_truth_ratios(path, "forget01", ["b", "c"])
    with pytest.raises(GRUNError, match="no per-row results for split 'forget05'"):
        forget_truth_ratios(path, "forget05")
    with pytest.raises(GRUNError, match="not found"):
        forget_truth_ratios(tmp_path / "nope.json", "forget01")


# --- multiple choice ------------------------------------------------------------------------------

def test_multiple_choice_matches_manual_argmax(tmp_path, patched):
    model, tokenizer = patched
    rows = [{"question": f"Which town for {r['question']}", "choices": ["town 1", "town 2", "city 3", "city 4"],
             "answer": i % 4} for i, r in enumerate(_rows(6))]
    rows[0]["answer"] = "B"
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_mc_file(path)
    assert loaded[0]["answer"] == 1
    res = evaluate_multiple_choice(model, tokenizer, loaded, batch_size=4, progress=False)
    letters = letter_token_ids(tokenizer, 4)
    manual = []
    for r in loaded:
        ids = tokenizer(mc_prompt(r))["input_ids"]
        with torch.no_grad(), grun_fast.edit_at(model, positions=torch.tensor([len(ids) - 1])):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        manual.append(int(torch.argmax(logits[letters])))
    assert res["predictions"] == manual
    assert res["accuracy"] == pytest.approx(np.mean([m == r["answer"] for m, r in zip(manual, loaded)]))
    assert set(res["gate"]["default"]) == {"0", "1"}
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(GRUNError, match="answer"):
        load_mc_file(path)
    path.write_text(json.dumps({"question": "q", "answer": 0}) + "\n")
    with pytest.raises(GRUNError, match="missing field 'choices'"):
        load_mc_file(path)


# --- commands -------------------------------------------------------------------------------------

def _save_tiny(tmp_path, tokenizer, hidden=32, seed=0, name="model"):
    model = tiny_llama(tokenizer, hidden_size=hidden, num_layers=2, num_heads=2, seed=seed)
    model.save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def _eval_args(**kw):
    from grun_fast.evaluation import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    argv = []
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return parser.parse_args(argv)


def test_eval_command_rejects_adapter_for_another_model(tmp_path, tiny, monkeypatch, capsys):
    from grun_fast.evaluation import command

    _, tokenizer = tiny
    _, model_dir = _save_tiny(tmp_path, tokenizer, hidden=32)
    other, _ = _save_tiny(tmp_path, tokenizer, hidden=16, name="other")
    grun_fast.patch(other, grun_fast.GRUNConfig(layers=[1]))
    grun_fast.save_adapter(other, tmp_path / "adapter")
    data = tmp_path / "tofu"
    data.mkdir()
    rows = _rows(3)
    (data / "forget01.json").write_text("".join(json.dumps({k: r[k] for k in ("question", "answer")}) + "\n"
                                                for r in rows))
    (data / "forget01_perturbed.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(command, "load_model", lambda *a, **k: pytest.fail("model loaded before the checks"))
    args = _eval_args(model=model_dir, adapter=[tmp_path / "adapter"], data=data, split="forget01",
                      out=tmp_path / "out", no_utility=True, quiet=True)
    assert command.run(args) == 2
    assert "hidden_size 16" in capsys.readouterr().err
    # a perturbed file out of step with the questions
    (data / "forget01_perturbed.json").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
    args = _eval_args(model=model_dir, data=data, split="forget01", out=tmp_path / "out", no_utility=True)
    assert command.run(args) == 2
    assert "does not align" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_tofu
def test_eval_and_compare_commands_on_tofu(tmp_path, capsys):
    """forget01 + the three utility splits, subsampled, with an adapter, a retain model and a baseline."""
    from grun_fast.evaluation import command, compare

    splits = tofu_eval_splits(TOFU_DIR, "forget01", max_rows=4)
    texts = [r["question"] + " " + r["answer"] for rows in splits.values() for r in rows]
    tokenizer = make_tiny_tokenizer(texts, vocab_size=400)
    model, model_dir = _save_tiny(tmp_path, tokenizer)
    _save_tiny(tmp_path, tokenizer, seed=1, name="retain")
    grun_fast.patch(model, grun_fast.GRUNConfig(layers=[1]))
    grun_fast.save_adapter(model, tmp_path / "adapter")
    common = dict(data=TOFU_DIR, split="forget01", max_rows=4, max_new_tokens=4, batch_size=8, quiet=True)
    from grun_fast.cli import main

    argv = ["eval", "--model", str(tmp_path / "retain"), "--out", str(tmp_path / "retain_run")]
    argv += [a for k, v in common.items() for a in ((f"--{k.replace('_', '-')}",) if v is True
                                                     else (f"--{k.replace('_', '-')}", str(v)))]
    assert main(argv) == 0
    mc = tmp_path / "wmdp_tiny.jsonl"
    mc.write_text("".join(json.dumps({"question": r["question"], "choices": [r["answer"], "no", "yes", "maybe"],
                                      "answer": 0}) + "\n" for r in splits["world_facts"]))
    args = _eval_args(model=model_dir, adapter=[tmp_path / "adapter"], out=tmp_path / "grun", mc=[mc],
                      retain_eval=tmp_path / "retain_run" / "eval.json", **common)
    assert command.run(args) == 0
    ou = _eval_args(model=model_dir, adapter=[tmp_path / "adapter"], out=tmp_path / "ou", encoding="open-unlearning",
                    no_baseline=True, no_format_gates=True, **common)
    assert command.run(ou) == 0
    assert json.loads((tmp_path / "ou" / "eval.json").read_text())["metrics"]["settings"]["encoding"] == "open-unlearning"
    for name in ("eval.json", "summary.md", "eval.png"):
        assert (tmp_path / "grun" / name).stat().st_size > 0
    run = json.loads((tmp_path / "grun" / "eval.json").read_text())
    res = run["metrics"]
    assert set(res["splits"]) == {"forget01", "retain", "real_authors", "world_facts"}
    assert all(s["n"] == 4 for s in res["splits"].values())
    retain_rows = json.loads((tmp_path / "retain_run" / "eval.json").read_text())["metrics"]["splits"]["forget01"]
    want_quality = metrics.forget_quality([r["truth_ratio"] for r in res["splits"]["forget01"]["rows"]],
                                          [r["truth_ratio"] for r in retain_rows["rows"]])
    assert res["forget_quality"]["forget01"] == pytest.approx(want_quality, rel=1e-9)
    assert res["model_utility"] == pytest.approx(metrics.model_utility(res["splits"]), rel=1e-9)
    assert set(res["splits"]["forget01"]["gate"]["default"]) == {"1"}
    assert run["baseline"]["splits"]["forget01"]["gate"] == {}
    summary = (tmp_path / "grun" / "summary.md").read_text()
    assert "| with adapter | forget01 |" in summary and "| with adapter | wmdp_tiny | 4 |" in summary
    assert res["multiple_choice"]["wmdp_tiny"]["n"] == 4 and "multiple_choice" in run["baseline"]
    # the retain model against itself: identical truth ratios, forget quality 1
    retain_run = json.loads((tmp_path / "retain_run" / "eval.json").read_text())
    assert retain_run["metrics"]["forget_quality"] == {}
    capsys.readouterr()
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    cargs = parser.parse_args([str(tmp_path / "retain_run"), str(tmp_path / "grun"), "--baselines",
                               "--out", str(tmp_path / "cmp")])
    assert compare.run(cargs) == 0
    table = capsys.readouterr().out
    assert "| grun |" in table and "| grun (base) |" in table and "| retain_run |" in table
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0
