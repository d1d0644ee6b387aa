"""Memorisation and membership-inference numbers comparable with open-unlearning: per-token teacher-forced
statistics of each answer, Min-K% / Min-K%++ scores, the attack AUC and privleak.

What is scored follows open-unlearning: the answer tokens of question+answer (EOS appended as in training)
minus the last one (their loader drops the final labelled token, the EOS), with the edit at the last prompt
token as GRUN applies it. Conventions (theirs):

- Min-K% (Shi et al. 2024): score = -mean of the lowest ``k`` share (at least one) of the answer's token
  log-probabilities. Higher = looks LESS like training data.
- Min-K%++ (Zhang et al. 2024): each token's log-probability standardised by the model's own next-token
  distribution, ``z = (log p(x_t) - mu_t) / sigma_t`` with ``mu_t = sum_v p_v log p_v`` and
  ``sigma_t^2 = sum_v p_v (log p_v)^2 - mu_t^2`` (clamped at 1e-6); score = -mean of the lowest ``k`` share.
- AUC: the forget rows labelled 0, the holdout rows (never trained on) 1, ranked by score:
  ``P(score_holdout > score_forget)`` (ties count half). 1: forget rows are recognised as members; 0.5:
  indistinguishable from unseen data.
- privleak (MUSE, as open-unlearning computes it): ``((1 - AUC) - (1 - AUC_ref)) / (1 - AUC_ref) * 100`` with
  AUC_ref the retain model's AUC on the same rows (open-unlearning falls back to AUC_ref = 0.5 without one).
  0: like the retain model; strongly negative: the forget rows are still recognised (under-unlearning);
  positive: they look less familiar than unseen data (over-unlearning).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from grun_fast.data.encoding import encode_rows, pad_examples, pad_token_id_of
from grun_fast.evaluation.scoring import batches, edit_at_positions, keeps_logits, model_device
from grun_fast.errors import GRUNError

MIA_K = 0.4          # open-unlearning's TOFU setting for both Min-K attacks
DEFAULT_REFERENCE_AUC = 0.5
TOKEN_CHUNK = 512    # scored tokens lifted to fp32 [chunk, vocab] at a time


def _lowest_share(values: np.ndarray, k: float) -> float:
    if not 0.0 < k <= 1.0:
        raise GRUNError(f"k must be in (0, 1], got {k}")
    if values.size == 0:
        return 0.0                                  # as open-unlearning: an empty answer scores 0
    count = max(1, int(values.size * k))
    return float(-np.mean(np.sort(values)[:count]))


def min_k_score(token_logprobs: Sequence[float], k: float = MIA_K) -> float:
    """Min-K% score of one answer: -mean of its lowest ``k`` share of token log-probabilities."""
    return _lowest_share(np.asarray(token_logprobs, dtype=np.float64), k)


def min_k_plus_plus_score(token_logprobs: Sequence[float], mu: Sequence[float], sigma2: Sequence[float],
                          k: float = MIA_K) -> float:
    """Min-K%++ score of one answer from each token's log-probability and the mean ``mu`` and variance
    ``sigma2`` of log p under the model's next-token distribution at that position."""
    lp, m, s2 = (np.asarray(x, dtype=np.float64) for x in (token_logprobs, mu, sigma2))
    if not lp.shape == m.shape == s2.shape:
        raise GRUNError(f"token_logprobs, mu and sigma2 differ in shape: {lp.shape}, {m.shape}, {s2.shape}")
    return _lowest_share((lp - m) / np.sqrt(np.maximum(s2, 1e-6)), k)


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """``P(holdout score > forget score)`` over all pairs, ties half (the ROC AUC with forget = 0,
    holdout = 1; the Mann-Whitney statistic over the number of pairs)."""
    f = np.asarray(forget_scores, dtype=np.float64)
    h = np.asarray(holdout_scores, dtype=np.float64)
    if f.ndim != 1 or h.ndim != 1 or f.size == 0 or h.size == 0:
        raise GRUNError("the attack AUC needs at least one forget and one holdout score")
    if not (np.all(np.isfinite(f)) and np.all(np.isfinite(h))):
        raise GRUNError("attack scores contain NaN or infinite values")
    greater = (h[:, None] > f[None, :]).sum()
    ties = (h[:, None] == f[None, :]).sum()
    return float((greater + 0.5 * ties) / (f.size * h.size))


def privleak(auc: float, reference_auc: float = DEFAULT_REFERENCE_AUC) -> float:
    """MUSE's privleak in percent: ``((1 - auc) - (1 - ref)) / (1 - ref) * 100`` (open-unlearning's form,
    with its 1e-10 guard in the denominator)."""
    for name, v in (("auc", auc), ("reference_auc", reference_auc)):
        if not (isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0):
            raise GRUNError(f"{name} must be a number in [0, 1], got {v!r}")
    score, ref = 1.0 - float(auc), 1.0 - float(reference_auc)
    return (score - ref) / (ref + 1e-10) * 100.0


def row_scores(stats: Mapping[str, np.ndarray], k: float = MIA_K) -> dict[str, float]:
    """The per-answer numbers from ``answer_token_stats``: extraction strength, exact memorisation (NaN for
    an answer with no scored token, left out of means as open-unlearning does), Min-K and Min-K++ scores."""
    from grun_fast.evaluation import metrics

    correct = stats["correct"]
    return {"extraction_strength": metrics.extraction_strength(correct),
            "exact_memorization": metrics.exact_memorization(correct) if correct.size else float("nan"),
            "min_k": min_k_score(stats["logprob"], k),
            "min_k_plus_plus": min_k_plus_plus_score(stats["logprob"], stats["mu"], stats["sigma2"], k)}


def _token_stats(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per scored token (rows of ``logits`` [N, V]): argmax == target, log p(target), mu and sigma^2 of log p."""
    out: dict[str, list[torch.Tensor]] = {"correct": [], "logprob": [], "mu": [], "sigma2": []}
    for lo in range(0, logits.shape[0], TOKEN_CHUNK):
        z = logits[lo:lo + TOKEN_CHUNK]
        z = z.to(torch.promote_types(z.dtype, torch.float32))      # at least fp32
        t = targets[lo:lo + TOKEN_CHUNK]
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        mu = (p * logp).sum(-1)
        out["correct"].append(z.argmax(-1) == t)
        out["logprob"].append(logp.gather(1, t[:, None]).squeeze(1))
        out["mu"].append(mu)
        out["sigma2"].append((p * logp.square()).sum(-1) - mu.square())
    return {key: torch.cat(v) for key, v in out.items()}


@torch.no_grad()
def answer_token_stats(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *,
                       template: str = "auto", batch_size: int = 16, max_length: int = 512,
                       desc: str | None = None, encoding: str = "grun") -> list[dict[str, np.ndarray]]:
    """Teacher-forced statistics of each row's answer tokens (EOS appended, last token dropped, see above),
    the edit at the last prompt token: per token ``correct`` (argmax == token), ``logprob``, ``mu``,
    ``sigma2``. One forward per batch; logits are kept from the earliest prompt end on."""
    examples = encode_rows(tokenizer, rows, template, max_length, encoding=encoding)
    pad_id = pad_token_id_of(tokenizer)
    device = model_device(model)
    trims = keeps_logits(model)
    out: list[dict[str, np.ndarray]] = [{} for _ in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    for idx in tqdm(batches(order, batch_size), desc=desc, disable=desc is None, leave=False):
        batch = pad_examples([examples[i] for i in idx], pad_id, "right")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        width = ids.shape[1]
        first = int(batch["edit_pos"].min())
        keep = {"logits_to_keep": width - first} if trims else {}
        with edit_at_positions(model, batch["edit_pos"].to(device)):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **keep).logits
        offset = width - logits.shape[1]
        rows_i, cols, spans = [], [], []
        for j, i in enumerate(idx):
            start, end = examples[i]["prompt_len"], len(examples[i]["input_ids"]) - 1   # drop the last token
            scored = list(range(start, max(start, end)))
            spans.append(len(scored))
            rows_i += [j] * len(scored)
            cols += scored
        r = torch.tensor(rows_i, dtype=torch.long, device=device)
        c = torch.tensor(cols, dtype=torch.long, device=device)
        stats = _token_stats(logits[r, c - 1 - offset], ids[r, c])
        stats = {k: v.cpu().numpy() for k, v in stats.items()}
        pos = 0
        for i, n in zip(idx, spans):
            out[i] = {k: v[pos:pos + n] for k, v in stats.items()}
            pos += n
    return out
