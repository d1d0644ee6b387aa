"""The LM head applied only where an answer token is predicted, with its cross entropy fused in.

Training and scoring need the NLL of answer tokens only; with a large vocabulary the full [B, T, V] logits
(and their fp32 copy for the cross entropy) dominate a small model's work and memory. ``head_nll`` runs the
head on the answer positions' hidden states, in vocabulary chunks, for the model types whose logits are
plain ``[softcap](head(hidden))``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grun_fast.data.encoding import IGNORE_INDEX

# Models whose logits are head(final hidden), optionally soft-capped: the answer head reproduces them.
_PLAIN_HEAD_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2",
                     "gpt2", "gpt_neox"}


def supports_answer_head(model: nn.Module) -> bool:
    """True when logits = [softcap](output_embeddings(backbone(x))) for this model type."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return False
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "logits_scaling")):
        return False
    try:
        return model.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


VOCAB_CHUNK = 4096


class HeadNLL(torch.autograd.Function):
    """Per-token NLL of ``target`` under logits = [softcap](hidden @ weight^T + bias), for a frozen head.

    Works through the vocabulary in chunks (cache-sized temporaries): each chunk's fp32 logits are kept
    for the backward, which turns them in place into ``(softmax - onehot) * grad`` and accumulates
    ``grad_hidden += chunk @ weight_chunk``. Same math as head + F.cross_entropy, fewer passes over the
    [N, V] logits (a large share of a small model's step with a 32k vocabulary)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, cap, keep=True):
        # keep=False (no backward will run: scoring): each chunk is dropped once read, so the fp32 logits
        # never exist whole ([N, V] for all answer tokens of a batch: GBs with a 128k vocabulary)
        n = hidden.shape[0]
        chunks, lses = [], []
        picked = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for lo in range(0, weight.shape[0], VOCAB_CHUNK):
            hi = min(lo + VOCAB_CHUNK, weight.shape[0])
            z = F.linear(hidden, weight[lo:hi], None if bias is None else bias[lo:hi]).float()
            if cap:
                z = torch.tanh(z.div_(cap)).mul_(cap)
            inside = (target >= lo) & (target < hi)
            rows = inside.nonzero().squeeze(-1)
            picked[rows] = z[rows, target[rows] - lo]
            lses.append(torch.logsumexp(z, dim=-1))
            if keep:
                chunks.append(z)
        lse = torch.logsumexp(torch.stack(lses, -1), dim=-1)
        ctx.chunks, ctx.cap, ctx.hidden_dtype, ctx.kept = chunks, cap, hidden.dtype, keep
        ctx.save_for_backward(weight, lse, target)
        return lse - picked

    @staticmethod
    def backward(ctx, grad):
        if not ctx.kept:
            raise RuntimeError("HeadNLL ran with keep=False (no backward expected); its logits are gone")
        weight, lse, target = ctx.saved_tensors
        chunks, cap = ctx.chunks, ctx.cap
        ctx.chunks = None
        grad_hidden = torch.zeros(lse.shape[0], weight.shape[1], dtype=torch.float32, device=lse.device)
        lo = 0
        for z in chunks:
            hi = lo + z.shape[1]
            factor = 1.0 - (z / cap).square_() if cap else None     # d softcap / d raw logit
            p = z.sub_(lse[:, None]).exp_()
            inside = (target >= lo) & (target < hi)
            rows = inside.nonzero().squeeze(-1)
            p[rows, target[rows] - lo] -= 1.0
            p.mul_(grad[:, None])
            if factor is not None:
                p.mul_(factor)
            grad_hidden.addmm_(p, weight[lo:hi].float())
            lo = hi
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None, None


def head_nll(model: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] summed NLL of ``target`` (-100: unscored) predicted from ``hidden`` [B, T, d] (same T)."""
    answer = target != IGNORE_INDEX
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    bias = getattr(head, "bias", None)
    x = hidden[answer]
    frozen = not head.weight.requires_grad and (bias is None or not bias.requires_grad)
    if isinstance(head, nn.Linear) and (frozen or not torch.is_grad_enabled()):
        nll = HeadNLL.apply(x, head.weight, bias, target[answer], float(cap) if cap else None,
                            torch.is_grad_enabled() and x.requires_grad)
    else:                                       # a trainable or unusual head: plain autograd
        logits = head(x).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        nll = F.cross_entropy(logits, target[answer], reduction="none")
    rows = torch.zeros(target.shape, dtype=nll.dtype, device=nll.device).masked_scatter(answer, nll)
    return rows.sum(-1)


def head_log_probs(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[N, V] fp32 log-softmax of the logits the model's head gives ``hidden`` [N, d] (soft-capped where the
    model caps). The whole distribution, for a KL between two models; only for ``supports_answer_head``
    models."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.log_softmax(logits, dim=-1)


def logits_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] summed NLL in fp32 of ``target`` [B, T] (-100: unscored) under ``logits`` [B, L, V], ``L <= T``,
    which belong to the last L positions (``logits_to_keep``); ``target[:, t]`` is the token predicted at t.

    The path for full logits (models outside the answer-head table, or with the answer head off): only the
    scored positions are lifted to fp32, not the whole [B, L, V] tensor.
    """
    target = target[:, target.shape[1] - logits.shape[1]:]
    rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    nll = F.cross_entropy(logits[rows, cols].float(), target[rows, cols], reduction="none")
    return torch.zeros(target.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
