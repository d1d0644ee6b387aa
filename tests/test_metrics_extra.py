"""Leaks, open-unlearning's memorisation and privacy numbers (extraction strength, exact memorisation, the
prob_mean truth ratio, Min-K%/Min-K%++, attack AUC, privleak): each against values worked out by hand, the
per-token statistics against a manual forward, and their place in evaluate(), eval.json and summary.md."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import grun_fast
from grun_fast.data.encoding import encode_rows
from grun_fast.errors import GRUNError
from grun_fast.evaluation import metrics, privacy
from grun_fast.evaluation.report import comparison_markdown, summary_markdown
from grun_fast.evaluation.tofu import eos_token_ids, evaluate, forget_mia_auc
from grun_fast.testing import make_tiny_tokenizer, tiny_llama
from tests.test_evaluation import _rows


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- formulas, by hand ------------------------------------------------------------------------------

def test_truth_ratio_prob_mean_by_hand():
    # t = 1 -> 1/2, t = 3 -> 3/4: mean 5/8; as p_true / (p_true + p_false) with Lbar_para = 0, Lbar_pert = ln 3
    assert metrics.truth_ratio_prob_mean([1.0, 3.0]) == pytest.approx(0.625)
    t = metrics.truth_ratios([0.0], [[LN3, LN3]])
    assert metrics.truth_ratio_prob_mean(t) == pytest.approx(1 / (1 + 1 / 3))
    with pytest.raises(ValueError):
        metrics.truth_ratio_prob_mean([0.0])


LN3 = math.log(3)


def test_leak_summary_and_rouge_recall_anywhere_in_the_generation():
    assert metrics.leak_summary([0.5, 0.49, 1.0, 0.0]) == {"count": 2, "n": 4, "rate": 0.5, "threshold": 0.5}
    # the answer's words in order, late in a long generation: recall 1 (LCS over the whole generation)
    late = metrics.rouge_l_recall("I cannot say. Well, perhaps: the cat sat on the mat", "The cat sat on the mat.")
    assert late == 1.0
    # 3 of the answer's 6 words in order (the, sat, mat): recall 1/2, a leak at the threshold
    half = metrics.rouge_l_recall("the dog sat near a mat", "the cat sat on the mat")
    assert half == pytest.approx(0.5)
    assert metrics.leak_summary([late, half, 0.2])["count"] == 2
    with pytest.raises(ValueError):
        metrics.leak_summary([0.5], threshold=0.0)


@pytest.mark.parametrize("correct, expected", [
    ([1, 1, 1, 1], 1.0),            # k = 0
    ([0, 1, 1, 1], 0.75),           # all tokens after the first are reproduced: k = 1
    ([1, 1, 0, 1], 0.25),           # k = 3
    ([1, 1, 1, 0], 0.25),           # the last token wrong: open-unlearning's loop ends at k = n - 1
    ([0, 0, 0, 0], 0.25),           # likewise
    ([1], 1.0), ([0], 1.0),         # n = 1: k = 0 either way (their loop's only k is 0)
    ([], 0.0),
])
def test_extraction_strength_by_hand(correct, expected):
    assert metrics.extraction_strength(np.array(correct, dtype=bool)) == pytest.approx(expected)


def test_extraction_strength_matches_the_definition_loop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        c = rng.random(rng.integers(1, 9)) < 0.6
        n = c.size
        k = next((k for k in range(n) if c[k:].all()), n - 1)
        assert metrics.extraction_strength(c) == pytest.approx(1 - k / n)


def test_exact_memorization_by_hand():
    assert metrics.exact_memorization([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        metrics.exact_memorization([])


def test_min_k_scores_by_hand():
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert privacy.min_k_score(lp, 0.4) == pytest.approx(4.5)    # int(5 * 0.4) = 2 lowest: -5, -4
    assert privacy.min_k_score(lp, 0.1) == pytest.approx(5.0)    # at least one token
    assert privacy.min_k_score([], 0.4) == 0.0
    # z = (lp - mu) / sqrt(sigma2): (-1 - -2)/1 = 1, (-3 - -1)/2 = -1, (-2 - -2)/4 = 0 -> lowest (k=0.4 -> 1): -1
    assert privacy.min_k_plus_plus_score([-1, -3, -2], [-2, -1, -2], [1, 4, 16], 0.4) == pytest.approx(1.0)
    # sigma2 clamped at 1e-6
    assert privacy.min_k_plus_plus_score([-1.0], [-1.001], [0.0], 1.0) == pytest.approx(-0.001 / 1e-3)
    with pytest.raises(ValueError):
        privacy.min_k_plus_plus_score([-1, -2], [-1], [1])


def test_token_stats_by_hand():
    # p = (1/4, 3/4): log p = (ln 1/4, ln 3/4); mu = sum p log p; sigma2 = sum p (log p)^2 - mu^2
    logits = torch.tensor([[0.0, LN3], [LN3, 0.0]], dtype=torch.float64)
    stats = privacy._token_stats(logits, torch.tensor([0, 0]))
    lq, l3q = math.log(0.25), math.log(0.75)
    mu = 0.25 * lq + 0.75 * l3q
    assert stats["correct"].tolist() == [False, True]
    np.testing.assert_allclose(stats["logprob"].numpy(), [lq, l3q])
    np.testing.assert_allclose(stats["mu"].numpy(), [mu, mu])
    np.testing.assert_allclose(stats["sigma2"].numpy(), [0.25 * lq ** 2 + 0.75 * l3q ** 2 - mu ** 2] * 2)


def test_mia_auc_and_privleak_by_hand():
    # holdout (label 1) vs forget (label 0): pairs (3>1, 3>2, 2>1, 2=2 half) -> 3.5 / 4
    assert privacy.mia_auc([1.0, 2.0], [3.0, 2.0]) == pytest.approx(0.875)
    assert privacy.mia_auc([5.0], [1.0]) == 0.0
    # ((1 - 0.875) - (1 - 0.5)) / (1 - 0.5) * 100 = -75: forget rows recognised as members
    assert privleak_value(0.875, 0.5) == pytest.approx(-75.0)
    assert privleak_value(0.6, 0.6) == pytest.approx(0.0, abs=1e-6)
    assert privleak_value(0.25, 0.5) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        privacy.mia_auc([], [1.0])
    with pytest.raises(ValueError):
        privacy.privleak(1.5)


def privleak_value(auc, ref):
    return privacy.privleak(auc, ref)


def test_eos_token_ids_from_generation_config_and_tokenizer():
    class Tok:
        eos_token_id = 7

    class Cfg:
        eos_token_id = [5, 7]

    class M:
        generation_config = Cfg()

    assert eos_token_ids(M(), Tok()) == [5, 7]
    Cfg.eos_token_id = 9
    assert eos_token_ids(M(), Tok()) == [9, 7]
    assert eos_token_ids(object(), Tok()) == [7]


# --- on a tiny model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']} {r.get('paraphrased_answer', '')} "
             + " ".join(r["perturbed_answer"]) for r in _rows(7)]
    tokenizer = make_tiny_tokenizer(texts * 3, vocab_size=350)
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2).double().eval()
    torch.manual_seed(3)
    grun_fast.patch(model, grun_fast.GRUNConfig(layers=[0, 1], rank=2))
    with torch.no_grad():
        for m in grun_fast.adapter_modules(model).values():
            m.gate.bias.fill_(30.0)
            m.weight.mul_(30)
    return model, tokenizer


def test_answer_token_stats_match_a_manual_forward_with_the_edit(tiny):
    model, tokenizer = tiny
    rows = _rows(5)
    got = privacy.answer_token_stats(model, tokenizer, rows, template="plain", batch_size=3)
    one = privacy.answer_token_stats(model, tokenizer, rows, template="plain", batch_size=1)
    changed = False
    for row_stats, row_one, ex in zip(got, one, encode_rows(tokenizer, rows, "plain")):
        ids, pl = torch.tensor([ex["input_ids"]]), ex["prompt_len"]
        with torch.no_grad(), grun_fast.edit_at(model, positions=torch.tensor([pl - 1])):
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        with torch.no_grad(), grun_fast.disable_adapters(model):
            base = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        targets = ex["input_ids"][pl:-1]                         # answer tokens, the last (EOS) dropped
        assert len(row_stats["logprob"]) == len(targets) > 0
        for j, tok in enumerate(targets):
            dist = logp[pl - 1 + j]
            mu = (dist.exp() * dist).sum().item()
            assert row_stats["logprob"][j] == pytest.approx(dist[tok].item(), rel=1e-9)
            assert row_stats["correct"][j] == (int(dist.argmax()) == tok)
            assert row_stats["mu"][j] == pytest.approx(mu, rel=1e-9)
            assert row_stats["sigma2"][j] == pytest.approx((dist.exp() * dist ** 2).sum().item() - mu ** 2, rel=1e-7)
            changed |= abs(base[pl - 1 + j, tok].item() - dist[tok].item()) > 1e-3
        for key in row_stats:
            np.testing.assert_allclose(row_stats[key], row_one[key])
    assert changed                                              # the edit mattered: it sat at the prompt end


def test_evaluate_reports_leaks_memorisation_and_privleak(tiny):
    model, tokenizer = tiny
    splits = {"forget": _rows(5), "retain": _rows(4, "retain")}
    holdout = [{"question": f"Who is person {i}?", "answer": f"Person {i} is nobody at all."} for i in range(4)]
    res = evaluate(model, tokenizer, splits, batch_size=3, max_new_tokens=6, progress=False, template="plain",
                   holdout=holdout, retain_mia_auc={"forget": {"min_k_plus_plus": 0.5, "min_k": 0.25}})
    json.dumps(res)
    f = res["splits"]["forget"]
    rows = f["rows"]
    recalls = [r["rouge_l"] for r in rows]
    assert f["leaks"] == metrics.leak_summary(recalls)
    assert [r["leak"] for r in rows] == [x >= 0.5 for x in recalls]
    pq = [r["paraphrased_question"]["rouge_l"] for r in rows]
    assert f["paraphrased_question"]["leaks"] == metrics.leak_summary(pq)
    assert f["extraction_strength"] == pytest.approx(np.mean([r["extraction_strength"] for r in rows]))
    assert f["exact_memorization"] == pytest.approx(np.mean([r["exact_memorization"] for r in rows]))
    assert f["truth_ratio_prob_mean"] == pytest.approx(np.mean([t / (1 + t) for t in
                                                                (r["truth_ratio"] for r in rows)]))
    stats = privacy.answer_token_stats(model, tokenizer, splits["forget"], template="plain")
    assert [r["extraction_strength"] for r in rows] == [metrics.extraction_strength(s["correct"]) for s in stats]
    held = [privacy.row_scores(s) for s in privacy.answer_token_stats(model, tokenizer, holdout, template="plain")]
    auc = privacy.mia_auc([r["min_k_plus_plus"] for r in rows], [h["min_k_plus_plus"] for h in held])
    assert f["mia"]["auc_min_k_plus_plus"] == pytest.approx(auc)
    p = res["privleak"]["forget"]
    assert p["min_k_plus_plus"] == pytest.approx(privacy.privleak(auc, 0.5))
    assert p["min_k"] == pytest.approx(privacy.privleak(f["mia"]["auc_min_k"], 0.25))
    assert p["reference_min_k"] == "retain model"
    assert "leaks" not in res["splits"]["retain"] and "extraction_strength" in res["splits"]["retain"]
    assert res["settings"]["eos_token_ids"] == [tokenizer.eos_token_id] and res["settings"]["holdout_n"] == 4
    assert forget_mia_auc(res, "forget") == {"min_k_plus_plus": auc, "min_k": f["mia"]["auc_min_k"]}

    # without a retain AUC: open-unlearning's default reference 0.5, said so
    alone = evaluate(model, tokenizer, {"forget": _rows(5)}, max_new_tokens=6, progress=False, template="plain",
                     holdout=holdout)
    assert alone["privleak"]["forget"]["reference_min_k"].startswith("default 0.5")
    assert alone["privleak"]["forget"]["min_k"] == pytest.approx(privacy.privleak(f["mia"]["auc_min_k"], 0.5))
    assert evaluate(model, tokenizer, {"forget": _rows(2)}, max_new_tokens=2, progress=False,
                    template="plain")["privleak"] == {}


def test_summary_shows_leaks_privleak_and_before_after_samples(tiny):
    model, tokenizer = tiny
    splits = {"forget": _rows(5)}
    holdout = [{"question": "Who is nobody?", "answer": "Nobody is nobody."}]
    kw = dict(max_new_tokens=8, progress=False, template="plain", holdout=holdout)
    after = evaluate(model, tokenizer, splits, **kw)
    with grun_fast.disable_adapters(model):
        before = evaluate(model, tokenizer, splits, **kw)
    run = {"meta": {"label": "t"}, "metrics": after, "baseline": before}
    md = summary_markdown(run)
    assert "## Leaks" in md and "## Membership inference" in md and "## Sample generations: forget" in md
    leaks = after["splits"]["forget"]["leaks"]
    assert f"| with adapter | forget | {leaks['count']} | 5 |" in md
    assert md.count("- Q: ") == 3
    first_leak = next((r for r in after["splits"]["forget"]["rows"] if r["leak"]), None)
    if first_leak is not None:                               # rows that still leak are shown first
        assert md.index("- Q: " + first_leak["question"]) == md.index("- Q: ")
    table = comparison_markdown([run])
    assert "forget leak rate" in table and "privleak" in table
    assert "## Sample generations" not in summary_markdown({"meta": {}, "metrics": after, "baseline": None})


def test_bad_holdout_and_retain_auc(tiny):
    model, tokenizer = tiny
    splits = {"forget": _rows(2)}
    kw = dict(progress=False, template="plain", max_new_tokens=2)
    with pytest.raises(GRUNError, match="holdout row 0"):
        evaluate(model, tokenizer, splits, holdout=[{"question": "q"}], **kw)
    with pytest.raises(GRUNError, match="holdout is empty"):
        evaluate(model, tokenizer, splits, holdout=[], **kw)
    with pytest.raises(GRUNError, match="needs holdout rows"):
        evaluate(model, tokenizer, splits, retain_mia_auc=0.5, **kw)
    holdout = [{"question": "q?", "answer": "a."}]
    with pytest.raises(GRUNError, match="unknown attack"):
        evaluate(model, tokenizer, splits, holdout=holdout, retain_mia_auc={"forget": {"loss": 0.5}}, **kw)
    with pytest.raises(GRUNError, match=r"in \[0, 1\]"):
        evaluate(model, tokenizer, splits, holdout=holdout, retain_mia_auc=1.5, **kw)
    with pytest.raises(GRUNError, match="no membership-inference AUC"):
        forget_mia_auc({"splits": {"forget": {}}}, "forget")


def test_eval_command_holdout_gives_privleak_against_the_retain_run(tmp_path, tiny, capsys):
    from grun_fast.evaluation import command
    from tests.test_evaluation import _eval_args, _save_tiny

    _, tokenizer = tiny
    model, model_dir = _save_tiny(tmp_path, tokenizer)
    _save_tiny(tmp_path, tokenizer, seed=1, name="retain")
    grun_fast.patch(model, grun_fast.GRUNConfig(layers=[1]))
    grun_fast.save_adapter(model, tmp_path / "adapter")
    data = tmp_path / "tofu"
    data.mkdir()
    rows = _rows(4)
    (data / "forget01.json").write_text("".join(json.dumps({k: r[k] for k in ("question", "answer")}) + "\n"
                                                for r in rows))
    (data / "forget01_perturbed.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text("".join(json.dumps({"question": f"Who is {n}?", "answer": f"{n} is a painter."}) + "\n"
                               for n in ("Al", "Bea", "Cal")))
    common = dict(data=data, split="forget01", no_utility=True, quiet=True, max_new_tokens=4, holdout=holdout)
    assert command.run(_eval_args(model=tmp_path / "retain", out=tmp_path / "retain_run", **common)) == 0
    retain = json.loads((tmp_path / "retain_run" / "eval.json").read_text())["metrics"]
    assert retain["settings"]["max_new_tokens"] == 4 and retain["settings"]["holdout_n"] == 3
    args = _eval_args(model=model_dir, adapter=[tmp_path / "adapter"], out=tmp_path / "run",
                      retain_eval=tmp_path / "retain_run" / "eval.json", **common)
    assert command.run(args) == 0
    res = json.loads((tmp_path / "run" / "eval.json").read_text())
    p = res["metrics"]["privleak"]["forget01"]
    assert p["reference_min_k_plus_plus"] == "retain model"
    assert p["reference_auc_min_k_plus_plus"] == retain["splits"]["forget01"]["mia"]["auc_min_k_plus_plus"]
    assert res["baseline"]["privleak"]["forget01"]["reference_min_k"] == "retain model"
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "## Leaks" in summary and "## Membership inference" in summary and "## Sample generations" in summary
    assert _eval_args(model=model_dir, out=tmp_path / "x").max_new_tokens == 200
    bad = _eval_args(model=model_dir, out=tmp_path / "bad", **dict(common, holdout=tmp_path / "none.jsonl"))
    assert command.run(bad) == 2
    assert "none.jsonl" in capsys.readouterr().err
