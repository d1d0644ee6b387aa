"""The GRUN training objective, term by term (GRUN.md section 4).

    L = forget_scale * L_forget + lambda_r * L_retain + lambda_g * BCE(gates; forget -> 1, retain -> 0)
        [+ retain_kl * KL(frozen || edited) at the retain answer tokens]

L_retain is the retain answers' NLL in excess of the frozen model's (not GRUN.md's plain NLL; see
``retain_loss_from_nll``).

Every function here is plain tensor math on logits, labels, hidden states and gate values, so each can be
checked against a value computed by hand. Token means accept a ``num_tokens`` override: the trainer passes
the token count of the whole global batch so that a run split over several processes optimises exactly
the loss of the single-process run.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from grun_fast.answer_head import logits_nll
from grun_fast.data.encoding import IGNORE_INDEX

METHODS = ("gd", "npo", "simnpo", "idk", "rmu")
# lambda_r per method (GRUN.md section 4; simnpo as npo); lambda_g is 10 for all.
# simnpo 4: with beta 1 on the forget study's forget05 point, retain weight 3 kept retain ROUGE-L but lost
# model utility on general questions (0.771-0.797, seeds 0-2); 4 with 160 general retain rows met every target.
# npo 4 (1 before 0.2.1): at the 0.2.x edit (rank 64, every token, answer suffixes, 60 epochs) with 160 general retain
# rows, weight 1 lost retain ROUGE-L (forget01 seeds 0-2: 0.797-0.827 against the base's 0.914; forget05 seed 0: 0.841
# against 0.893, model utility 0.800); 4 kept it (forget01 0.870-0.905; forget05 seeds 0-2: 0.872-0.889).
DEFAULT_LAMBDA_R = {"gd": 2.0, "npo": 4.0, "simnpo": 4.0, "idk": 1.0, "rmu": 1.0}
# NPO: x10, not the reference code's x100. On GRUN.md section 8's tiny TOFU setting (20 forget01 + 80 retain
# rows, 120 steps, seeds 0-2, medians) x10 gives forget ROUGE-L 0.992 -> 0.184 with retain unchanged (0.997)
# and gates 0.989 / 0.020; x100 forgets no more (0.182) and costs retain 0.064 (0.933; gate retain 0.060).
DEFAULT_FORGET_SCALE = {"gd": 1.0, "npo": 10.0, "simnpo": 10.0, "idk": 1.0, "rmu": 1.0}
# beta per method: NPO's acts on a summed answer NLL (tens of nats), SimNPO's on the per-token mean (a few nats).
# SimNPO: by the forget set's size (``simnpo_beta``); 1.0 is its value for large sets.
DEFAULT_BETA = {"npo": 0.1, "simnpo": 1.0}
# SimNPO's beta sets how far the forget answers are pushed (its loss saturates once their mean token NLL passes a few
# 1/beta). The forget study (bench/results/forget_study.md, tiny TOFU, defaults + 160 general rows, seeds 0-2):
# - 200 forget rows (forget05): beta 1 centres the forget truth ratios near the retain model's (log median 0.11-0.14
#   vs 0.05; forget quality median 0.27); beta 2.5 stops early, the model still prefers the true answers (0.36-0.41,
#   ~1e-10).
# - 40 forget rows (forget01): beta 1 pushes past them (forget answers' NLL 12.4 nats per token at the end, the
#   retain model's 10.9; log median -0.40 to -0.59, forget quality median 0.0067); beta 2 stops at 6.6 nats, forget
#   quality median 0.054 (0.165 without the general rows).
# Between the two sizes beta follows log(rows) linearly (not measured in between); outside it is held.
SIMNPO_BETA_BY_ROWS = ((40, 2.0), (200, 1.0))


def simnpo_beta(n_forget: int) -> float:
    """The default SimNPO beta for ``n_forget`` forget rows (before answer suffixes): SIMNPO_BETA_BY_ROWS's values at
    its two sizes, log-linear between them, held beyond."""
    (n0, b0), (n1, b1) = SIMNPO_BETA_BY_ROWS
    if n_forget <= n0:
        return b0
    if n_forget >= n1:
        return b1
    return b0 + (b1 - b0) * math.log(n_forget / n0) / math.log(n1 / n0)


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL of the labelled tokens and their count: ([B], [B]).

    ``labels`` are aligned with the input ids (-100 where not scored); token t is predicted by logits at
    t - 1. Computed in fp32 whatever the model's dtype.
    """
    shift_labels = labels[:, 1:]
    return logits_nll(logits[:, :-1], shift_labels), (shift_labels != IGNORE_INDEX).sum(-1)


def mean_nll(nll_sum: torch.Tensor, num_tokens: torch.Tensor | float) -> torch.Tensor:
    """Per-row summed NLLs ``[B]`` added up and divided by ``num_tokens`` (clamped to >= 1)."""
    denom = torch.as_tensor(num_tokens, dtype=torch.float32, device=nll_sum.device)
    return nll_sum.float().sum() / torch.clamp(denom, min=1)


def gd_forget_loss_from_nll(nll_sum: torch.Tensor, num_tokens: torch.Tensor | float) -> torch.Tensor:
    """Gradient ascent from per-row summed NLLs: minus their mean over ``num_tokens``."""
    return -mean_nll(nll_sum, num_tokens)


def idk_forget_loss_from_nll(nll_sum: torch.Tensor, num_tokens: torch.Tensor | float) -> torch.Tensor:
    """IDK from per-row summed NLLs of the refusals: their mean over ``num_tokens``."""
    return mean_nll(nll_sum, num_tokens)


def retain_loss_from_nll(nll_sum: torch.Tensor, reference_sum: torch.Tensor,
                         num_tokens: torch.Tensor | float) -> torch.Tensor:
    """Retain term from per-row summed NLLs of the retain answers: what each row's NLL exceeds the frozen
    model's (``reference_sum``) by, summed and divided by ``num_tokens``.

    Only damage is penalised. A plain NLL also rewards the edit for answering retain rows *better* than the
    base, and where the base answers badly (a prompt format it does not know, from format augmentation) the
    edit learns to do so: its gate opens on those retain rows (tiny TOFU forget05, NPO at every token: retain
    NLL 3.5 nats through training, retain gate 0.52 under a format variant, retain ROUGE-L 0.89 -> 0.72)."""
    excess = torch.clamp(nll_sum.float() - reference_sum.to(nll_sum.device).float(), min=0)
    return mean_nll(excess, num_tokens)


def retain_kl_loss(log_probs: torch.Tensor, reference_log_probs: torch.Tensor,
                   num_tokens: torch.Tensor | float) -> torch.Tensor:
    """KL(frozen || edited) of the next-token distributions at the retain answer tokens ([N, V] log-probs
    each), summed over tokens and divided by ``num_tokens``.

    The retain NLL term holds only the answer token's probability; the rest of the distribution (the words a
    reworded or wrong answer would take) can drift."""
    reference = reference_log_probs.detach().float()
    kl = (reference.exp() * (reference - log_probs.float())).sum()
    denom = torch.as_tensor(num_tokens, dtype=torch.float32, device=kl.device)
    return kl / torch.clamp(denom, min=1)


def token_mean_nll(logits: torch.Tensor, labels: torch.Tensor,
                   num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """NLL averaged over all labelled tokens of the batch (or divided by ``num_tokens`` when given)."""
    total, count = answer_nll(logits, labels)
    return mean_nll(total, count.sum() if num_tokens is None else num_tokens)


def gd_forget_loss(logits: torch.Tensor, labels: torch.Tensor,
                   num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Gradient ascent on the forget answers: minus their token-mean NLL."""
    total, count = answer_nll(logits, labels)
    return gd_forget_loss_from_nll(total, count.sum() if num_tokens is None else num_tokens)


def idk_forget_loss(logits: torch.Tensor, refusal_labels: torch.Tensor,
                    num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """NLL of a refusal in place of the forget answer (the batch carries the refusal as the answer)."""
    total, count = answer_nll(logits, refusal_labels)
    return idk_forget_loss_from_nll(total, count.sum() if num_tokens is None else num_tokens)


def npo_loss(nll_sum: torch.Tensor, ref_nll_sum: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """NPO: -(2/beta) * mean log sigmoid(beta * (S - S_ref)), S = summed answer NLL with the edit, S_ref the
    same under the frozen reference model. Falls to 0 as S grows past S_ref; its gradient vanishes there
    (unlike gradient ascent, which never stops)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_sum.float() - ref_nll_sum.float())).mean()


def simnpo_loss(nll_sum: torch.Tensor, num_tokens: torch.Tensor, beta: float = 2.5,
                gamma: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): NPO without the reference model, on the length-normalised NLL:
    -(2/beta) * mean log sigmoid(beta * S/|y| - gamma). Saturates once the mean token NLL passes gamma/beta by a
    few 1/beta, so long answers are not pushed harder than short ones."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    mean = nll_sum.float() / torch.clamp(num_tokens.float(), min=1)
    return -(2.0 / beta) * F.logsigmoid(beta * mean - gamma).mean()


def masked_mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked tokens of the mean squared difference over the hidden dimension.

    h [B, T, d]; target [B, T, d] or [d] (broadcast); mask bool [B, T].
    """
    diff = (h.float() - target.float()).pow(2).mean(-1)
    m = mask.to(diff.dtype)
    return (diff * m).sum() / torch.clamp(m.sum(), min=1)


def rmu_control_vector(hidden_size: int, coefficient: float = 300.0, seed: int = 0) -> torch.Tensor:
    """c * u with u a fixed random unit vector (uniform on [0, 1)^d, normalised, as in RMU)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=g, dtype=torch.float64)
    return (coefficient * u / u.norm()).float()


def rmu_forget_loss(h: torch.Tensor, control: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU forget term: push hidden states of forget tokens towards the control vector c*u."""
    return masked_mse(h, control, mask)


def rmu_retain_loss(h: torch.Tensor, h_base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU retain term: keep hidden states of retain tokens where the frozen model puts them."""
    return masked_mse(h, h_base.detach(), mask)


def gate_bce(forget_gates: Sequence[torch.Tensor], retain_gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """BCE of every layer's gate values at the edited token(s): forget -> 1, retain -> 0, one mean over all
    values (each layer and each row weigh the same)."""
    if not forget_gates and not retain_gates:
        raise ValueError("gate_bce needs gate values")
    values, targets = [], []
    for gates, target in ((forget_gates, 1.0), (retain_gates, 0.0)):
        for g in gates:
            g = g.reshape(-1).float()
            values.append(g)
            targets.append(torch.full_like(g, target))
    return F.binary_cross_entropy(torch.cat(values), torch.cat(targets))


def total_loss(forget: torch.Tensor, retain: torch.Tensor, gate: torch.Tensor, lambda_r: float,
               lambda_g: float, forget_scale: float = 1.0, kl: torch.Tensor | float = 0.0,
               retain_kl: float = 0.0) -> torch.Tensor:
    """The combined objective."""
    return forget_scale * forget + lambda_r * retain + lambda_g * gate + retain_kl * kl
