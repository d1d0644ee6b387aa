"""The TOFU metrics as plain functions of per-answer mean token NLLs (GRUN.md section 5).

Everything here works on numbers already computed by the model, so each formula lives in one place
and can be checked by hand. ``Lbar`` below is the mean token negative log-likelihood of an answer
given its question.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from grun_fast.errors import GRUNError

_ROUGE_SCORER = None


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise GRUNError(f"{name}: expected a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise GRUNError(f"{name}: contains NaN or infinite values")
    return arr


def answer_probability(nll: Sequence[float]) -> float:
    """Forget/retain probability: mean over questions of ``exp(-Lbar(answer))``."""
    return float(np.mean(np.exp(-_as_array(nll, "nll"))))


def normalized_probability(nll: Sequence[float], perturbed_nll: Sequence[Sequence[float]]) -> float:
    """real_authors/world_facts probability: mean of ``p / (p + sum_j p_j)`` with ``p = exp(-Lbar)``.

    Computed in log space (a softmax over the options) so that tiny probabilities do not underflow.
    """
    correct = _as_array(nll, "nll")
    _check_rows(correct, perturbed_nll, "perturbed_nll")
    out = []
    for lbar, options in zip(correct, perturbed_nll):
        logits = -np.concatenate([[lbar], _as_array(options, "perturbed_nll row")])
        logits -= logits.max()
        weights = np.exp(logits)
        out.append(weights[0] / weights.sum())
    return float(np.mean(out))


def truth_ratios(paraphrased_nll: Sequence[float], perturbed_nll: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-question ``t_i = exp(mean_j Lbar(perturbed_ij) - Lbar(paraphrased_i))``.

    ``t > 1`` means the model prefers the true (paraphrased) answer over the wrong ones.
    """
    para = _as_array(paraphrased_nll, "paraphrased_nll")
    _check_rows(para, perturbed_nll, "perturbed_nll")
    pert_mean = np.array([_as_array(row, "perturbed_nll row").mean() for row in perturbed_nll])
    return np.exp(pert_mean - para)


def truth_ratio_score(ratios: Sequence[float], forget: bool) -> float:
    """Split summary of the truth ratios: forget ``mean min(t, 1/t)``, others ``mean max(0, 1 - 1/t)``."""
    t = _as_array(ratios, "truth ratios")
    if np.any(t <= 0):
        raise GRUNError("truth ratios must be positive")
    if forget:
        return float(np.mean(np.minimum(t, 1.0 / t)))
    return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / t)))


def truth_ratio_prob_mean(ratios: Sequence[float]) -> float:
    """open-unlearning's ``prob_mean`` truth ratio: mean over questions of ``p_true / (p_true + p_false)`` with
    ``p_true = exp(-Lbar(paraphrased))`` and ``p_false = exp(-mean_j Lbar(perturbed_j))``, i.e. ``t / (1 + t)``
    for our ``t``. 1: the true answer wins outright, 0.5: no preference, 0: the wrong ones win. (Their
    ``closer_to_1_better`` and ``true_better`` aggregates are ``truth_ratio_score`` with forget=True/False:
    they write the ratio as ``1/t``; their 1e-10 guards are left out.)"""
    t = _as_array(ratios, "truth ratios")
    if np.any(t <= 0):
        raise GRUNError("truth ratios must be positive")
    return float(np.mean(t / (1.0 + t)))


def forget_quality(ratios: Sequence[float], retain_ratios: Sequence[float]) -> float:
    """p-value of the two-sample Kolmogorov-Smirnov test between the forget-split truth ratios of the
    evaluated model and those of a retain model (high = indistinguishable from never having learned)."""
    from scipy.stats import ks_2samp

    a = _as_array(ratios, "truth ratios")
    b = _as_array(retain_ratios, "retain model truth ratios")
    return float(ks_2samp(a, b).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative numbers; any zero makes it 0 (as TOFU's model utility does)."""
    arr = _as_array(values, "values")
    if np.any(arr < 0):
        raise GRUNError(f"harmonic mean needs non-negative numbers, got {arr.tolist()}")
    if np.any(arr == 0):
        return 0.0
    return float(arr.size / np.sum(1.0 / arr))


UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("probability", "rouge_l", "truth_ratio")


def model_utility(split_metrics: dict[str, dict[str, float]]) -> float:
    """Harmonic mean of the 9 numbers {retain, real_authors, world_facts} x {probability, ROUGE-L,
    truth ratio}. ``split_metrics`` maps split name to its summary numbers."""
    missing = [s for s in UTILITY_SPLITS if s not in split_metrics]
    if missing:
        raise GRUNError(f"model utility needs the splits {list(UTILITY_SPLITS)}; missing {missing}")
    values = []
    for split in UTILITY_SPLITS:
        for metric in UTILITY_METRICS:
            if metric not in split_metrics[split]:
                raise GRUNError(f"model utility: split {split!r} has no {metric!r}")
            values.append(split_metrics[split][metric])
    return harmonic_mean(values)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of a generation against the reference answer (rouge-score, Porter stemmer)."""
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_ROUGE_SCORER.score(reference, prediction)["rougeL"].recall)


LEAK_THRESHOLD = 0.5


def leak_summary(recalls: Sequence[float], threshold: float = LEAK_THRESHOLD) -> dict[str, float | int]:
    """How many generations still carry the original answer: ROUGE-L recall >= ``threshold`` (the longest
    common subsequence covers at least that share of the answer's words, wherever it sits in the generation).
    Returns ``{"count", "n", "rate", "threshold"}``."""
    r = _as_array(recalls, "ROUGE-L recalls")
    if not 0.0 < threshold <= 1.0:
        raise GRUNError(f"leak threshold must be in (0, 1], got {threshold}")
    count = int(np.sum(r >= threshold))
    return {"count": count, "n": int(r.size), "rate": count / r.size, "threshold": float(threshold)}


def exact_memorization(correct: Sequence[bool]) -> float:
    """Share of an answer's tokens that the model's teacher-forced argmax predicts exactly (open-unlearning's
    ``exact_memorization``, one answer). ``correct[i]``: argmax at answer token i equals the true token."""
    c = np.asarray(correct, dtype=bool)
    if c.ndim != 1 or c.size == 0:
        raise GRUNError("exact memorization needs at least one answer token")
    return float(c.mean())


def extraction_strength(correct: Sequence[bool]) -> float:
    """open-unlearning's ``extraction_strength`` of one answer of n tokens: ``1 - k/n`` with k the shortest
    true prefix after which the teacher-forced argmax reproduces every remaining token (k = n - length of the
    trailing run of correct predictions; when none is correct, k = n - 1 as in their loop, giving 1/n).
    1: the whole answer comes back from its first token; near 0: only its end. An empty answer scores 0."""
    c = np.asarray(correct, dtype=bool)
    if c.ndim != 1:
        raise GRUNError("extraction strength takes one answer's per-token flags")
    n = c.size
    if n == 0:
        return 0.0
    wrong = np.flatnonzero(~c)
    k = 0 if wrong.size == 0 else min(int(wrong[-1]) + 1, n - 1)
    return 1.0 - k / n


def multiple_choice_accuracy(option_logprobs: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Share of questions whose highest-scoring option is the correct one (ties go to the first)."""
    if len(option_logprobs) != len(answers) or not answers:
        raise GRUNError("need one answer index per question and at least one question")
    hits = [int(int(np.argmax(row)) == int(ans)) for row, ans in zip(option_logprobs, answers)]
    return float(np.mean(hits))


def _check_rows(first: np.ndarray, rows: Sequence[Sequence[float]], name: str) -> None:
    if len(rows) != first.size:
        raise GRUNError(f"{name}: {len(rows)} rows for {first.size} questions")


