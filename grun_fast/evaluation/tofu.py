"""``evaluate``: the TOFU protocol (GRUN.md section 5) on any model, with or without GRUN adapters.

Per split, every teacher-forced score it needs (answer, paraphrased answer, each perturbed answer and, on a
forget split, the answer after the paraphrased question) goes through one batched, length-sorted pass;
greedy generations go through another. The formulas themselves live in ``metrics``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from grun_fast.errors import GRUNError
from grun_fast.evaluation import metrics
from grun_fast.evaluation.generation import generate
from grun_fast.evaluation.scoring import answer_nll, gate_modules
from grun_fast.evaluation.splits import FORGET, KNOWLEDGE, split_kind, validate_split


def _retain_ratios_by_split(retain_truth_ratios: Any, forget_names: list[str]) -> dict[str, list[float]]:
    if retain_truth_ratios is None:
        return {}
    if isinstance(retain_truth_ratios, Mapping):
        unknown = [k for k in retain_truth_ratios if k not in forget_names]
        if unknown:
            raise GRUNError(f"retain_truth_ratios names splits {unknown} that are not forget splits being "
                            f"evaluated ({forget_names or 'none'})")
        out = dict(retain_truth_ratios)
    else:
        if len(forget_names) != 1:
            raise GRUNError(f"retain_truth_ratios as a plain list needs exactly one forget split, got "
                            f"{forget_names or 'none'}; pass a dict {{split: ratios}}")
        out = {forget_names[0]: retain_truth_ratios}
    for name, ratios in out.items():
        arr = np.asarray(ratios, dtype=float)
        if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise GRUNError(f"retain truth ratios for {name!r} must be a non-empty list of positive numbers")
        out[name] = arr.tolist()
    return out


def _mean_gates(gates: Mapping[str, Mapping[int, np.ndarray]]) -> dict[str, dict[str, float]]:
    return {name: {str(layer): float(np.mean(v)) for layer, v in layers.items()} for name, layers in gates.items()}


def _row_gates(gates: Mapping[str, Mapping[int, np.ndarray]], i: int) -> dict[str, dict[str, float]]:
    return {name: {str(layer): float(v[i]) for layer, v in layers.items()} for name, layers in gates.items()}


def _evaluate_split(model: Any, tokenizer: Any, name: str, rows: list[dict], modules: dict, *, batch_size: int,
                    template: str, max_new_tokens: int, max_length: int, progress: bool) -> dict[str, Any]:
    kind = split_kind(name)
    n = len(rows)
    para_key = "answer" if kind == KNOWLEDGE else "paraphrased_answer"
    # One flat list of (question, answer) jobs; slices of it are read back below.
    jobs = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    para_start = len(jobs)
    if para_key != "answer":
        jobs += [{"question": r["question"], "answer": r[para_key]} for r in rows]
    pert_start = len(jobs)
    counts = [len(r["perturbed_answer"]) for r in rows]
    jobs += [{"question": r["question"], "answer": a} for r in rows for a in r["perturbed_answer"]]
    pq_start = len(jobs)
    if kind == FORGET:
        jobs += [{"question": r["paraphrased_question"], "answer": r["answer"]} for r in rows]

    nll, gates = answer_nll(model, tokenizer, jobs, template=template, batch_size=batch_size,
                            max_length=max_length, gates=modules, desc=f"{name}: scoring" if progress else None)
    answer = nll[:n]
    para = nll[para_start:para_start + n] if para_key != "answer" else answer
    bounds = np.cumsum([pert_start] + counts)
    perturbed = [nll[bounds[i]:bounds[i + 1]].tolist() for i in range(n)]
    answer_gates = {a: {layer: v[:n] for layer, v in layers.items()} for a, layers in gates.items()}

    questions = [{"question": r["question"]} for r in rows]
    if kind == FORGET:
        questions += [{"question": r["paraphrased_question"]} for r in rows]
    texts = generate(model, tokenizer, questions, template=template, batch_size=batch_size,
                     max_new_tokens=max_new_tokens, desc=f"{name}: generating" if progress else None)
    rouge = [metrics.rouge_l_recall(texts[i], rows[i]["answer"]) for i in range(n)]

    ratios = metrics.truth_ratios(para, perturbed)
    if kind == KNOWLEDGE:
        probability = metrics.normalized_probability(answer, perturbed)
    else:
        probability = metrics.answer_probability(answer)
    result: dict[str, Any] = {
        "kind": kind,
        "n": n,
        "probability": probability,
        "rouge_l": float(np.mean(rouge)),
        "truth_ratio": metrics.truth_ratio_score(ratios, forget=kind == FORGET),
        "gate": _mean_gates(answer_gates),
    }
    row_out = []
    for i, r in enumerate(rows):
        item = {"question": r["question"], "answer": r["answer"], "generation": texts[i], "rouge_l": rouge[i],
                "nll": float(answer[i]), "paraphrased_nll": float(para[i]), "perturbed_nll": perturbed[i],
                "truth_ratio": float(ratios[i]), "gate": _row_gates(answer_gates, i)}
        row_out.append(item)
    if kind == FORGET:
        pq_nll = nll[pq_start:pq_start + n]
        pq_gates = {a: {layer: v[pq_start:pq_start + n] for layer, v in layers.items()} for a, layers in gates.items()}
        pq_rouge = [metrics.rouge_l_recall(texts[n + i], rows[i]["answer"]) for i in range(n)]
        result["paraphrased_question"] = {
            "probability": metrics.answer_probability(pq_nll),
            "rouge_l": float(np.mean(pq_rouge)),
            "gate": _mean_gates(pq_gates),
        }
        for i, item in enumerate(row_out):
            item["paraphrased_question"] = {"question": rows[i]["paraphrased_question"], "generation": texts[n + i],
                                            "rouge_l": pq_rouge[i], "nll": float(pq_nll[i]),
                                            "gate": _row_gates(pq_gates, i)}
    result["rows"] = row_out
    return result


def evaluate(model: Any, tokenizer: Any, splits: Mapping[str, Sequence[Mapping[str, Any]]],
             adapter_name: str | Sequence[str] | None = None,
             retain_truth_ratios: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
             batch_size: int = 16, *, template: str = "plain", max_new_tokens: int = 128, max_length: int = 512,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` (adapters applied as installed) on TOFU-style splits.

    splits: ``{name: rows}``; the name decides the kind (see ``splits``): ``forget*``, ``retain*`` or other.
    adapter_name: the adapter(s) whose gates are reported per layer (None: every adapter on the model; the
        model is always evaluated with every adapter it carries).
    retain_truth_ratios: the forget-split truth ratios ``t_i`` of a retain model (a list for the single forget
        split, or ``{split: list}``); gives ``forget_quality``.
    Returns ``{"splits": {name: metrics}, "forget_quality": {split: p} , "model_utility": float | None,
    "settings": {...}}``; every number is a plain float, so the dict is JSON as it stands.
    """
    if not splits:
        raise GRUNError("no splits to evaluate")
    checked = {name: validate_split(name, rows) for name, rows in splits.items()}
    forget_names = [name for name in checked if split_kind(name) == FORGET]
    retain_ratios = _retain_ratios_by_split(retain_truth_ratios, forget_names)
    if batch_size < 1 or max_new_tokens < 1 or max_length < 2:
        raise GRUNError(f"batch_size and max_new_tokens must be >= 1 and max_length >= 2, got {batch_size}, "
                        f"{max_new_tokens}, {max_length}")
    modules = gate_modules(model, adapter_name)
    names = list(modules)

    was_training = model.training
    model.eval()
    try:
        results = {name: _evaluate_split(model, tokenizer, name, rows, modules, batch_size=batch_size,
                                         template=template, max_new_tokens=max_new_tokens, max_length=max_length,
                                         progress=progress)
                   for name, rows in checked.items()}
    finally:
        model.train(was_training)

    quality = {}
    for name, ratios in retain_ratios.items():
        quality[name] = metrics.forget_quality([r["truth_ratio"] for r in results[name]["rows"]], ratios)
    utility = metrics.model_utility(results) if all(s in results for s in metrics.UTILITY_SPLITS) else None
    return {
        "splits": results,
        "forget_quality": quality,
        "model_utility": utility,
        "settings": {"adapters": names, "template": template, "max_new_tokens": max_new_tokens,
                     "max_length": max_length, "batch_size": batch_size},
    }


def forget_truth_ratios(evaluation: Mapping[str, Any] | str | os.PathLike, split: str,
                        questions: Sequence[str] | None = None) -> list[float]:
    """The per-question truth ratios of ``split`` in a saved evaluation (an ``eval.json`` path, or the dict).

    With ``questions``, the ratios of exactly those questions, in that order (a retain model evaluated on the
    whole split serves a run on a subsample); a question it lacks is an error.
    """
    if not isinstance(evaluation, Mapping):
        path = os.fspath(evaluation)
        if not os.path.isfile(path):
            raise GRUNError(f"retain evaluation file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                evaluation = json.load(f)
        except json.JSONDecodeError as e:
            raise GRUNError(f"{path}: not a JSON evaluation file ({e})") from None
    result = evaluation.get("metrics", evaluation)  # an eval.json, or evaluate()'s dict
    split_rows = result.get("splits", {}).get(split, {}).get("rows") if isinstance(result, Mapping) else None
    if not split_rows:
        have = sorted(result.get("splits", {})) if isinstance(result, Mapping) else []
        raise GRUNError(f"the retain evaluation has no per-row results for split {split!r} "
                        f"(it has: {', '.join(have) or 'nothing'})")
    if questions is None:
        return [float(r["truth_ratio"]) for r in split_rows]
    by_question = {r["question"]: float(r["truth_ratio"]) for r in split_rows}
    missing = [q for q in questions if q not in by_question]
    if missing:
        raise GRUNError(f"the retain evaluation lacks {len(missing)} of the {len(questions)} {split} questions "
                        f"(first: {missing[0]!r:.80}); evaluate the retain model on the same split")
    return [by_question[q] for q in questions]
