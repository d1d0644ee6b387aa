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

from grun_fast.data.prompts import check_encoding
from grun_fast.errors import GRUNError
from grun_fast.evaluation import metrics, privacy
from grun_fast.evaluation.generation import generate
from grun_fast.evaluation.scoring import answer_nll, gate_modules
from grun_fast.evaluation.splits import FORGET, KNOWLEDGE, RETAIN, split_kind, validate_split

# open-unlearning's generation length (their configs/generation/default.yaml); see ``eos_token_ids``.
MAX_NEW_TOKENS = 200


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


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a generation: the model's generation config's ``eos_token_id`` (an id or a list, as
    ``model.generate`` and open-unlearning stop at) plus the tokenizer's EOS. Chat models often list an
    end-of-turn id besides EOS; stopping at the tokenizer's alone lets them run on past their answer."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return ids


def _generate(model: Any, tokenizer: Any, questions: list[dict], eos_ids: list[int], **kwargs: Any) -> list[str]:
    """``generation.generate``, stopping at every id of ``eos_ids``."""
    return generate(model, tokenizer, questions, eos_token_ids=eos_ids or None, **kwargs)


def _generation_settings(eos_ids: list[int]) -> dict[str, Any]:
    return {"eos_token_ids": eos_ids}


def _memorisation(model: Any, tokenizer: Any, rows: list[dict], *, template: str, batch_size: int,
                  max_length: int, k: float, desc: str | None, encoding: str) -> list[dict[str, float]]:
    stats = privacy.answer_token_stats(model, tokenizer, rows, template=template, batch_size=batch_size,
                                       max_length=max_length, desc=desc, encoding=encoding)
    return [privacy.row_scores(s, k) for s in stats]


def _nanmean(values: list[float]) -> float | None:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def _mean_gates(gates: Mapping[str, Mapping[int, np.ndarray]]) -> dict[str, dict[str, float]]:
    return {name: {str(layer): float(np.mean(v)) for layer, v in layers.items()} for name, layers in gates.items()}


def _row_gates(gates: Mapping[str, Mapping[int, np.ndarray]], i: int) -> dict[str, dict[str, float]]:
    return {name: {str(layer): float(v[i]) for layer, v in layers.items()} for name, layers in gates.items()}


def _evaluate_split(model: Any, tokenizer: Any, name: str, rows: list[dict], modules: dict, *, batch_size: int,
                    template: str, max_new_tokens: int, max_length: int, progress: bool, eos_ids: list[int],
                    mia_k: float, encoding: str) -> dict[str, Any]:
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
                            max_length=max_length, gates=modules, desc=f"{name}: scoring" if progress else None,
                            encoding=encoding)
    answer = nll[:n]
    para = nll[para_start:para_start + n] if para_key != "answer" else answer
    bounds = np.cumsum([pert_start] + counts)
    perturbed = [nll[bounds[i]:bounds[i + 1]].tolist() for i in range(n)]
    answer_gates = {a: {layer: v[:n] for layer, v in layers.items()} for a, layers in gates.items()}

    questions = [{"question": r["question"]} for r in rows]
    if kind == FORGET:
        questions += [{"question": r["paraphrased_question"]} for r in rows]
    texts = _generate(model, tokenizer, questions, eos_ids, template=template, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, desc=f"{name}: generating" if progress else None,
                      encoding=encoding)
    rouge = [metrics.rouge_l_recall(texts[i], rows[i]["answer"]) for i in range(n)]
    memo = None
    if kind in (FORGET, RETAIN):
        memo = _memorisation(model, tokenizer, rows, template=template, batch_size=batch_size,
                             max_length=max_length, k=mia_k, desc=f"{name}: memorisation" if progress else None,
                             encoding=encoding)

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
        "truth_ratio_prob_mean": metrics.truth_ratio_prob_mean(ratios),
        "gate": _mean_gates(answer_gates),
    }
    if memo is not None:
        result["extraction_strength"] = _nanmean([m["extraction_strength"] for m in memo])
        result["exact_memorization"] = _nanmean([m["exact_memorization"] for m in memo])
    if kind == FORGET:
        result["leaks"] = metrics.leak_summary(rouge)
    row_out = []
    for i, r in enumerate(rows):
        item = {"question": r["question"], "answer": r["answer"], "generation": texts[i], "rouge_l": rouge[i],
                "nll": float(answer[i]), "paraphrased_nll": float(para[i]), "perturbed_nll": perturbed[i],
                "truth_ratio": float(ratios[i]), "gate": _row_gates(answer_gates, i)}
        if memo is not None:
            item.update(memo[i])
        if kind == FORGET:
            item["leak"] = rouge[i] >= metrics.LEAK_THRESHOLD
        row_out.append(item)
    if kind == FORGET:
        pq_nll = nll[pq_start:pq_start + n]
        pq_gates = {a: {layer: v[pq_start:pq_start + n] for layer, v in layers.items()} for a, layers in gates.items()}
        pq_rouge = [metrics.rouge_l_recall(texts[n + i], rows[i]["answer"]) for i in range(n)]
        result["paraphrased_question"] = {
            "probability": metrics.answer_probability(pq_nll),
            "rouge_l": float(np.mean(pq_rouge)),
            "leaks": metrics.leak_summary(pq_rouge),
            "gate": _mean_gates(pq_gates),
        }
        for i, item in enumerate(row_out):
            item["paraphrased_question"] = {"question": rows[i]["paraphrased_question"], "generation": texts[n + i],
                                            "rouge_l": pq_rouge[i], "leak": pq_rouge[i] >= metrics.LEAK_THRESHOLD,
                                            "nll": float(pq_nll[i]),
                                            "gate": _row_gates(pq_gates, i)}
    result["rows"] = row_out
    return result


def evaluate(model: Any, tokenizer: Any, splits: Mapping[str, Sequence[Mapping[str, Any]]],
             adapter_name: str | Sequence[str] | None = None,
             retain_truth_ratios: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
             batch_size: int = 16, *, template: str = "auto", max_new_tokens: int = MAX_NEW_TOKENS,
             max_length: int = 512, progress: bool = True, holdout: Sequence[Mapping[str, Any]] | None = None,
             retain_mia_auc: float | Mapping[str, Any] | None = None, mia_k: float = privacy.MIA_K,
             encoding: str = "grun") -> dict[str, Any]:
    """Evaluate ``model`` (adapters applied as installed) on TOFU-style splits.

    splits: ``{name: rows}``; the name decides the kind (see ``splits``): ``forget*``, ``retain*`` or other.
    adapter_name: the adapter(s) whose gates are reported per layer (None: every adapter on the model; the
        model is always evaluated with every adapter it carries).
    retain_truth_ratios: the forget-split truth ratios ``t_i`` of a retain model (a list for the single forget
        split, or ``{split: list}``); gives ``forget_quality``.
    holdout: rows (``question``, ``answer``) the model never trained on (TOFU's holdout01/05/10): with them
        each forget split gets a membership-inference ``mia`` entry (Min-K% and Min-K%++ AUC, forget vs
        holdout) and ``privleak`` against ``retain_mia_auc`` (see ``privacy``).
    retain_mia_auc: the retain model's AUC on the same rows: a number (Min-K%++) or ``{"min_k_plus_plus": auc,
        "min_k": auc}`` for the single forget split, or ``{split: either}`` (``forget_mia_auc`` reads
        it from a saved evaluation). Without it privleak uses open-unlearning's default reference AUC 0.5.
    Forget and retain splits also get extraction strength and exact memorisation (open-unlearning's); every
    split the ``prob_mean`` truth ratio; forget splits (and their reworded questions) the leak count.
    encoding: how prompt + answer become ids (``grun_fast.data.prompts.ENCODINGS``): the project's exact
        boundary, or ``"open-unlearning"`` for numbers comparable with its evaluator on the same model.
    Returns ``{"splits": {name: metrics}, "forget_quality": {split: p} , "model_utility": float | None,
    "privleak": {split: {...}}, "settings": {...}}``; every number is a plain float, so the dict is JSON as it
    stands.
    """
    if not splits:
        raise GRUNError("no splits to evaluate")
    checked = {name: validate_split(name, rows) for name, rows in splits.items()}
    forget_names = [name for name in checked if split_kind(name) == FORGET]
    retain_ratios = _retain_ratios_by_split(retain_truth_ratios, forget_names)
    if batch_size < 1 or max_new_tokens < 1 or max_length < 2:
        raise GRUNError(f"batch_size and max_new_tokens must be >= 1 and max_length >= 2, got {batch_size}, "
                        f"{max_new_tokens}, {max_length}")
    holdout_rows = _check_holdout(holdout) if holdout is not None else None
    retain_auc = _retain_auc_by_split(retain_mia_auc, forget_names)
    if retain_auc and holdout_rows is None:
        raise GRUNError("retain_mia_auc needs holdout rows to compare the forget split with")
    if not 0.0 < mia_k <= 1.0:
        raise GRUNError(f"mia_k must be in (0, 1], got {mia_k}")
    check_encoding(encoding)
    modules = gate_modules(model, adapter_name)
    names = list(modules)
    eos_ids = eos_token_ids(model, tokenizer)

    was_training = model.training
    model.eval()
    try:
        results = {name: _evaluate_split(model, tokenizer, name, rows, modules, batch_size=batch_size,
                                         template=template, max_new_tokens=max_new_tokens, max_length=max_length,
                                         progress=progress, eos_ids=eos_ids, mia_k=mia_k, encoding=encoding)
                   for name, rows in checked.items()}
        leak_risk = {}
        if holdout_rows is not None:
            held = _memorisation(model, tokenizer, holdout_rows, template=template, batch_size=batch_size,
                                 max_length=max_length, k=mia_k, desc="holdout: scoring" if progress else None,
                                 encoding=encoding)
            for name in forget_names:
                results[name]["mia"] = _mia(results[name]["rows"], held, mia_k)
                leak_risk[name] = _privleak(results[name]["mia"], retain_auc.get(name))
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
        "privleak": leak_risk,
        "settings": {"adapters": names, "template": template, "encoding": encoding, "max_new_tokens": max_new_tokens,
                     "max_length": max_length, "batch_size": batch_size, "mia_k": mia_k,
                     "holdout_n": len(holdout_rows) if holdout_rows is not None else None,
                     **_generation_settings(eos_ids)},
    }


ATTACKS = ("min_k_plus_plus", "min_k")


def _check_holdout(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    rows = list(rows)
    if not rows:
        raise GRUNError("holdout is empty: the membership-inference AUC needs rows the model never saw")
    for i, row in enumerate(rows):
        for key in ("question", "answer"):
            if not isinstance(row, Mapping) or not isinstance(row.get(key), str) or not row[key].strip():
                raise GRUNError(f"holdout row {i}: needs a non-empty string {key!r}, got {row!r:.120}")
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def _retain_auc_by_split(value: Any, forget_names: list[str]) -> dict[str, dict[str, float]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or (value and set(value) <= set(ATTACKS)):    # one split's AUC(s)
        if len(forget_names) != 1:
            raise GRUNError(f"retain_mia_auc for one split needs exactly one forget split, got {forget_names or 'none'}")
        value = {forget_names[0]: value}
    out = {}
    for name, aucs in value.items():
        if name not in forget_names:
            raise GRUNError(f"retain_mia_auc names split {name!r}, not a forget split being evaluated")
        aucs = aucs if isinstance(aucs, Mapping) else {"min_k_plus_plus": aucs}
        for attack, auc in aucs.items():
            if attack not in ATTACKS:
                raise GRUNError(f"retain_mia_auc[{name!r}]: unknown attack {attack!r} (known: {', '.join(ATTACKS)})")
            if isinstance(auc, bool) or not isinstance(auc, (int, float)) or not 0.0 <= float(auc) <= 1.0:
                raise GRUNError(f"retain_mia_auc[{name!r}][{attack!r}] must be a number in [0, 1], got {auc!r}")
        out[name] = {a: float(v) for a, v in aucs.items()}
    return out


def _mia(forget_rows: list[dict], holdout: list[dict[str, float]], k: float) -> dict[str, Any]:
    out: dict[str, Any] = {"k": k, "holdout_n": len(holdout)}
    for attack in ATTACKS:
        out[f"auc_{attack}"] = privacy.mia_auc([r[attack] for r in forget_rows], [h[attack] for h in holdout])
    return out


def _privleak(mia: Mapping[str, Any], retain: Mapping[str, float] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attack in ATTACKS:
        ref = (retain or {}).get(attack)
        out[attack] = privacy.privleak(mia[f"auc_{attack}"], privacy.DEFAULT_REFERENCE_AUC if ref is None else ref)
        out[f"reference_auc_{attack}"] = ref if ref is not None else privacy.DEFAULT_REFERENCE_AUC
        out[f"reference_{attack}"] = "retain model" if ref is not None else "default 0.5 (no retain model AUC)"
    return out


def forget_mia_auc(evaluation: Mapping[str, Any] | str | os.PathLike, split: str) -> dict[str, float]:
    """The Min-K%/Min-K%++ AUCs of ``split`` in a saved evaluation (a retain model's, for privleak)."""
    result = _load_evaluation(evaluation)
    mia = result.get("splits", {}).get(split, {}).get("mia") if isinstance(result, Mapping) else None
    if not mia:
        raise GRUNError(f"the retain evaluation has no membership-inference AUC for split {split!r}; evaluate the "
                        "retain model with the same holdout rows")
    return {attack: float(mia[f"auc_{attack}"]) for attack in ATTACKS if f"auc_{attack}" in mia}


def _load_evaluation(evaluation: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    if not isinstance(evaluation, Mapping):
        path = os.fspath(evaluation)
        if not os.path.isfile(path):
            raise GRUNError(f"retain evaluation file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                evaluation = json.load(f)
        except json.JSONDecodeError as e:
            raise GRUNError(f"{path}: not a JSON evaluation file ({e})") from None
    return evaluation.get("metrics", evaluation)  # an eval.json, or evaluate()'s dict


def forget_truth_ratios(evaluation: Mapping[str, Any] | str | os.PathLike, split: str,
                        questions: Sequence[str] | None = None) -> list[float]:
    """The per-question truth ratios of ``split`` in a saved evaluation (an ``eval.json`` path, or the dict).

    With ``questions``, the ratios of exactly those questions, in that order (a retain model evaluated on the
    whole split serves a run on a subsample); a question it lacks is an error.
    """
    result = _load_evaluation(evaluation)
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
