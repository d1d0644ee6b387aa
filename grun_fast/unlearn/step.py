"""The forward of one training step: per-row summed answer NLL of a batch, with the adapter editing each
row's last prompt token (``edit_pos``). Shared by the trainer's ``compute_loss`` and the training benchmark.

Three ways to get the same numbers, fastest last (each falls back to the one before where it cannot apply):
- full logits: ``model(...)``, LM head at every token (``answer_nll``);
- answer head: the backbone, then the LM head only where an answer token is predicted (a position whose
  next label is not -100): with a 32k vocabulary the head and its cross entropy dominate a small model's
  step otherwise. Final logit soft-capping (gemma2) is applied; models with other logit post-processing
  use full logits;
- cached prefix (``PrefixCache``): the tokens before ``edit_pos`` never depend on the adapter (causal
  attention; the edit sits at ``edit_pos``), so their keys/values are computed once per example and each
  step runs only the suffix ``[edit_pos, end)`` against them; with layers below the lowest edited one
  bypassed too: up to and including the lowest edited layer, whose unedited output at the suffix is
  constant as well (its adapters' hooks then edit the cached output).
"""
from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple, Sequence

import torch
from torch import nn

from grun_fast.answer_head import head_log_probs, head_nll, logits_nll, supports_answer_head
from grun_fast.architectures import cache_kwarg, locate, output_cache
from grun_fast.data.encoding import IGNORE_INDEX
from grun_fast.patching import edit_at
from grun_fast.unlearn.cache import LowerLayerCache, bypass_lower_layers
from grun_fast.unlearn.losses import answer_nll

log = logging.getLogger(__name__)


class AnswerScores(NamedTuple):
    nll: torch.Tensor                      # [B] summed answer NLL, fp32
    count: torch.Tensor                    # [B] answer tokens per row
    log_probs: torch.Tensor | None         # [N, V] fp32 next-token log-probs at the answer tokens of the
                                           # rows asked for (row-major), or None


def batch_answer_nll(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                     edit_pos: torch.Tensor, *, keys: Sequence | None = None,
                     lower_cache: LowerLayerCache | None = None, prefix_cache: "PrefixCache | None" = None,
                     answer_head: bool = True, call: nn.Module | None = None,
                     log_probs_from: int | None = None) -> AnswerScores:
    """Summed answer NLL and answer-token count per row of one right-padded batch, edited at ``edit_pos``;
    adapters' ``last_gate`` hold the gates afterwards.

    ``keys``: one hashable per row naming its example (for the caches). ``call``: the module to call for the
    full-logits path (a DDP wrapper, say); ``model`` is the unwrapped, patched model. ``log_probs_from``: also
    return the whole next-token distributions at the answer tokens of rows ``log_probs_from:`` (the prefix
    cache, which scores the answer token only, is then not used).
    """
    count = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    if prefix_cache is not None and keys is not None and prefix_cache.enabled and log_probs_from is None:
        nll = prefix_cache.answer_nll(ids, mask, labels, edit_pos, keys, answer_head=answer_head)
        if nll is not None:
            return AnswerScores(nll, count, None)
    skipping = contextlib.nullcontext()
    if lower_cache is not None and keys is not None and lower_cache.enabled:
        hidden = lower_cache.fetch(keys, ids, mask)
        if lower_cache.enabled:
            skipping = lower_cache.skipping(hidden)
    target = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)   # position t predicts t + 1
    picked = None if log_probs_from is None else target[log_probs_from:] != IGNORE_INDEX
    with skipping, edit_at(model, positions=edit_pos):
        if answer_head and supports_answer_head(model):
            backbone = locate(model)[0]
            hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            log_probs = None if picked is None else head_log_probs(model, hidden[log_probs_from:][picked])
            return AnswerScores(head_nll(model, hidden, target), count, log_probs)
        logits = (call or model)(input_ids=ids, attention_mask=mask, use_cache=False).logits
    log_probs = (None if picked is None
                 else torch.log_softmax(logits[log_probs_from:][picked].float(), dim=-1))
    return AnswerScores(answer_nll(logits, labels)[0].float(), count, log_probs)


class PrefixCache:
    """Per example: the frozen model's keys/values of the prompt prefix ``[0, edit_pos)`` at every layer that
    runs, and the unedited output of layer ``skip`` at the suffix tokens, within ``max_bytes``.

    ``skip`` is the lowest layer edited by any adapter: layers ``0 .. skip`` are bypassed at the suffix
    (layer ``skip`` hands on the cached output, which its adapter hooks edit as usual). Only
    valid while no adapter that trains edits every token (``positions="all"``): the caller checks that.
    The first batch is run both ways and compared; on any mismatch or unsupported cache the cache turns
    itself off (one log line) and the caller's plain path is used.
    """

    def __init__(self, model: nn.Module, skip: int, max_bytes: int):
        self.model = model
        self.backbone, self.layers = locate(model)
        self.skip = skip
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.store: dict = {}
        self.hits = 0
        self.misses = 0
        self.enabled = True
        self.bypass = True
        self.checked = False
        self.kwarg = cache_kwarg(self.backbone)

    def disable(self, why: str) -> None:
        if self.enabled:
            log.warning("grun_fast: cached-prefix training step off (%s); using the plain step", why)
        self.enabled = False

    # ----------------------------------------------------------------- filling
    @torch.no_grad()
    def _compute(self, ids: torch.Tensor, mask: torch.Tensor, edit_pos: torch.Tensor) -> list[dict] | None:
        """One full no-grad forward of these rows (edited as in training); per row its cache entry."""
        captured = {}

        def grab(module, args, output):   # runs before the adapters' hooks (which edit in place under no_grad)
            captured["h"] = output.clone() if isinstance(output, torch.Tensor) else output[0].clone()
            captured["tuple"] = not isinstance(output, torch.Tensor)
        handle = self.layers[self.skip].register_forward_hook(grab, prepend=True)
        try:
            with edit_at(self.model, positions=edit_pos):
                out = self.backbone(input_ids=ids, attention_mask=mask, use_cache=True)
        finally:
            if handle is not None:
                handle.remove()
        cache = output_cache(out)
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(self.layers) or any(
                type(layer).__name__ != "DynamicLayer" or getattr(layer, "keys", None) is None for layer in layers):
            self.disable("the model's KV cache is not a plain per-layer DynamicCache")
            return None
        lower = captured.get("h")
        if captured.get("tuple"):
            self.bypass = False          # layers return tuples: run every layer at the suffix
        lengths = mask.sum(-1).tolist()
        entries = []
        for i, (e, n) in enumerate(zip(edit_pos.tolist(), lengths)):
            kv = [None if self.bypass and li <= self.skip else (layer.keys[i, :, :e].clone(), layer.values[i, :, :e].clone())
                  for li, layer in enumerate(layers)]
            entry = {"kv": kv, "lower": lower[i, e:n].clone() if lower is not None else None}
            entries.append(entry)
        return entries

    def _entries(self, keys: Sequence, ids, mask, edit_pos) -> list[dict] | None:
        missing: dict = {}
        for i, k in enumerate(keys):
            if k not in self.store and k not in missing:
                missing[k] = i
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        fresh = {}
        if missing:
            rows = torch.tensor(list(missing.values()), device=ids.device)
            width = int(mask[rows].sum(-1).max())
            computed = self._compute(ids[rows, :width], mask[rows, :width], edit_pos[rows])
            if computed is None:
                return None
            for k, entry in zip(missing, computed):
                fresh[k] = entry
                tensors = [t for kv in entry["kv"] if kv is not None for t in kv] + ([entry["lower"]] if entry["lower"] is not None else [])
                size = sum(t.numel() * t.element_size() for t in tensors)
                if self.max_bytes > 0 and self.used_bytes + size <= self.max_bytes:
                    self.store[k] = entry
                    self.used_bytes += size
        return [fresh[k] if k in fresh else self.store[k] for k in keys]

    # ----------------------------------------------------------------- the step
    def answer_nll(self, ids, mask, labels, edit_pos, keys, *, answer_head: bool = True) -> torch.Tensor | None:
        """[B] summed answer NLL via the cached prefix; None when this batch cannot use it."""
        batch, width = ids.shape
        device = ids.device
        lengths = mask.sum(-1)
        steps = torch.arange(width, device=device)
        right_padded = bool((mask.bool() == (steps[None] < lengths[:, None])).all())
        if not right_padded or bool((edit_pos < 0).any()) or bool((edit_pos >= lengths).any()):
            return None
        if bool(((labels != IGNORE_INDEX) & (steps[None] <= edit_pos[:, None])).any()):
            return None                              # a labelled token inside the prefix
        entries = self._entries(keys, ids, mask, edit_pos)
        if entries is None:
            return None
        if not self.checked:       # once, before the real forward (which must set the gates last): same numbers?
            self.checked = True
            with torch.no_grad():
                plain = batch_answer_nll(self.model, ids, mask, labels, edit_pos, answer_head=answer_head).nll
                mine = self._suffix_nll(entries, ids, lengths, labels, edit_pos, answer_head)
                ok = torch.allclose(mine, plain, rtol=1e-4, atol=1e-4 * max(1.0, float(plain.abs().max())))
            if not ok:
                self.disable(f"it disagrees with the plain forward on this model (max diff "
                             f"{float((mine - plain).abs().max()):.3g})")
                return None
        return self._suffix_nll(entries, ids, lengths, labels, edit_pos, answer_head)

    def _suffix_nll(self, entries, ids, lengths, labels, edit_pos, answer_head: bool) -> torch.Tensor:
        batch, width = ids.shape
        device = ids.device
        e = edit_pos
        s = lengths - e
        P, S = int(e.max()), int(s.max())
        j = torch.arange(S, device=device)
        src = (e[:, None] + j[None]).clamp(max=width - 1)
        valid = j[None] < s[:, None]                                   # [B, S] real suffix tokens
        suffix_ids = torch.where(valid, ids.gather(1, src), ids[:, :1])
        tgt_idx = e[:, None] + j[None] + 1
        target = labels.gather(1, tgt_idx.clamp(max=width - 1))
        target = torch.where(valid & (tgt_idx < width), target, torch.full_like(target, IGNORE_INDEX))
        k = torch.arange(P, device=device)
        prefix_mask = k[None] >= (P - e)[:, None]                       # left-padded prefixes
        attn = torch.cat([prefix_mask, valid], dim=1).long()
        position_ids = e[:, None] + j[None]

        cache = None
        if P > 0:
            from transformers import DynamicCache

            cache = DynamicCache()
            for li in range(len(self.layers)):
                if entries[0]["kv"][li] is None:                # bypassed: never read, only its length matters
                    keys_t = torch.zeros(batch, 1, P, 1, dtype=entries[0]["lower"].dtype, device=device)
                    vals_t = keys_t
                else:
                    k0, v0 = entries[0]["kv"][li]
                    shape_k = (batch, k0.shape[0], P, k0.shape[-1])
                    shape_v = (batch, v0.shape[0], P, v0.shape[-1])
                    keys_t = torch.zeros(shape_k, dtype=k0.dtype, device=device)
                    vals_t = torch.zeros(shape_v, dtype=v0.dtype, device=device)
                    for i, entry in enumerate(entries):
                        kk, vv = entry["kv"][li]
                        n = kk.shape[1]
                        if n:
                            keys_t[i, :, P - n:] = kk
                            vals_t[i, :, P - n:] = vv
                cache.update(keys_t, vals_t, li)
        skipping = contextlib.nullcontext()
        if self.bypass:
            d = entries[0]["lower"].shape[-1]
            lower = torch.zeros(batch, S, d, dtype=entries[0]["lower"].dtype, device=device)
            for i, entry in enumerate(entries):
                lower[i, : entry["lower"].shape[0]] = entry["lower"]
            skipping = bypass_lower_layers(self.layers, self.skip + 1, lower)
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        with skipping, edit_at(self.model, positions=zeros, cached_prefix=True):
            kwargs = {self.kwarg: cache} if cache is not None else {}
            if answer_head and supports_answer_head(self.model):
                hidden = self.backbone(input_ids=suffix_ids, attention_mask=attn, position_ids=position_ids,
                                       use_cache=cache is not None, **kwargs).last_hidden_state
                return head_nll(self.model, hidden, target)
            logits = self.model(input_ids=suffix_ids, attention_mask=attn, position_ids=position_ids,
                                use_cache=cache is not None, **kwargs).logits
        return logits_nll(logits, target)

