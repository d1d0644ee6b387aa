"""Greedy generation for evaluation, with continuous batching.

A batch that runs until its longest row ends spends many of its steps on rows that have already stopped
(TOFU answers vary from a few tokens to the limit). Here a finished row leaves the batch at once and, when
a quarter of the slots are free, the next prompts are prefilled and join it: the decode steps stay full.
Rows are left-padded; positions are counted from each row's first real token, so batching does not change
the tokens (beyond low-precision rounding of near-ties). Each prefill edits the last prompt token, named
explicitly (so ``mask``-mode adapters apply as in scoring), as ``model.generate`` does for ``last_prompt``
adapters. Decoding is plain greedy argmax: the model's own generation config (repetition penalties and the
like) is not applied: ROUGE-L is defined on the greedy generation (GRUN.md section 5).

Models whose KV cache is not a plain per-layer ``DynamicCache`` (sliding-window layers, say) go through
``model.generate`` in fixed batches instead.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from grun_fast.architectures import cache_kwarg, output_cache
from grun_fast.data.encoding import pad_examples, pad_token_id_of
from grun_fast.data.prompts import prompt_ids_batch
from grun_fast.evaluation.scoring import batches, edit_at_positions, keeps_logits, model_device
from grun_fast.errors import GRUNError


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *,
             question_key: str = "question", template: str = "auto", batch_size: int = 16,
             max_new_tokens: int = 128, desc: str | None = None,
             eos_token_ids: Sequence[int] | None = None, encoding: str = "grun") -> list[str]:
    """Greedy continuations of each row's prompt, up to the first of ``eos_token_ids`` (default: the
    tokenizer's EOS; not returned) or ``max_new_tokens``."""
    if max_new_tokens < 1:
        raise GRUNError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise GRUNError(f"batch_size must be >= 1, got {batch_size}")
    prompts = prompt_ids_batch(tokenizer, rows, template, question_key, encoding)
    eos = set(eos_token_ids) if eos_token_ids else {tokenizer.eos_token_id} - {None}
    decoder = _Decoder(model, pad_token_id_of(tokenizer), eos, max_new_tokens)
    with tqdm(total=len(prompts), desc=desc, disable=desc is None, leave=False) as bar:
        tokens = decoder.run(prompts, batch_size, bar)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


# Queued prompts join once this share of the slots is free: fuller decode steps against fewer, larger prefills
# (0.125-0.5 were within 5 % of each other on the tiny CPU benchmark).
REFILL_FRACTION = 0.25


@dataclass
class _Running:
    """The rows being decoded: which prompt each is, their KV cache and attention mask (left-padded, columns
    shared), and the token each produced last, to be fed next."""

    rows: list[int]
    cache: Any
    mask: torch.Tensor
    pending: torch.Tensor


class _Decoder:
    """Greedy decoding of many prompts through at most ``batch_size`` slots; ``out[i]`` collects prompt i's
    tokens (EOS stripped when it ends the row)."""

    def __init__(self, model: torch.nn.Module, pad_id: int, eos_ids: set[int], max_new_tokens: int):
        self.model, self.pad_id, self.eos_ids, self.max_new = model, pad_id, set(eos_ids), max_new_tokens
        self.device = model_device(model)
        self.keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
        self.cache_kwarg = cache_kwarg(model)

    def run(self, prompts: list[list[int]], batch_size: int, bar) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        if not prompts:
            return out
        queue = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))   # long prompts first
        first = self._prefill(prompts, queue[:batch_size], out)
        if first is None:                      # not a plain DynamicCache: fixed batches via model.generate
            self._fixed_batches(prompts, queue, batch_size, out, bar)
            return out
        running = self._merge(None, first)
        queue = queue[batch_size:]
        refill_at = batch_size - max(1, int(batch_size * REFILL_FRACTION))
        while True:
            running = self._drop_finished(running, out, bar)
            if queue and (running is None or len(running.rows) <= refill_at):
                free = batch_size - (len(running.rows) if running else 0)
                joining = self._prefill(prompts, queue[:free], out)
                if joining is None:             # cannot happen after a plain first prefill; be safe
                    raise RuntimeError("the model's KV cache changed kind between prefills")
                queue = queue[free:]
                running = self._merge(running, joining)
                continue
            if running is None:
                return out
            self._step(running, out)

    # ------------------------------------------------------------------ model calls
    def _forward(self, ids, mask, position_ids, cache):
        result = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                            **{self.cache_kwarg: cache}, **self.keep)
        return result.logits[:, -1].argmax(-1), output_cache(result)

    def _prefill(self, prompts, take: list[int], out) -> _Running | None:
        """Left-padded prefill of ``take`` (None for a model whose cache is not a plain DynamicCache); its
        cache is the model's own, to be joined to the running batch by ``_merge``."""
        batch = pad_examples([{"input_ids": prompts[i], "prompt_len": len(prompts[i])} for i in take],
                             self.pad_id, "left")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        last = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=self.device)
        with edit_at_positions(self.model, last):  # left-padded: every row's prompt ends in the last column
            token, cache = self._forward(ids, mask, position_ids, None)
        kv = _plain_kv(cache)
        if kv is None:
            return None
        for row, t in zip(take, token.tolist()):
            out[row].append(t)
        return _Running(list(take), cache, mask, token)     # the model's own cache: _merge copies it once

    def _step(self, running: _Running, out) -> None:
        """One decode step of every running row (the cache grows in place)."""
        mask = torch.cat([running.mask, running.mask.new_ones(running.mask.shape[0], 1)], dim=1)
        position_ids = mask.sum(-1, keepdim=True) - 1
        token, _ = self._forward(running.pending[:, None], mask, position_ids, running.cache)
        for row, t in zip(running.rows, token.tolist()):
            out[row].append(t)
        running.mask, running.pending = mask, token

    # ------------------------------------------------------------------ batch bookkeeping
    def _done(self, tokens: list[int]) -> bool:
        return len(tokens) >= self.max_new or tokens[-1] in self.eos_ids

    def _drop_finished(self, running: _Running | None, out, bar) -> _Running | None:
        if running is None:
            return None
        keep = [j for j, row in enumerate(running.rows) if not self._done(out[row])]
        if len(keep) == len(running.rows):
            return running
        for j, row in enumerate(running.rows):
            if j not in keep:
                _strip_eos(out[row], self.eos_ids)
        bar.update(len(running.rows) - len(keep))
        if not keep:
            return None
        index = torch.tensor(keep, device=running.mask.device)
        mask = running.mask.index_select(0, index)
        start = int(mask.any(0).long().argmax())          # columns that are padding for every remaining row
        kv = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
              for k, v in _plain_kv(running.cache)]
        return _Running([running.rows[j] for j in keep], self._cache(kv), mask[:, start:],
                        running.pending.index_select(0, index))

    def _cache(self, kv):
        from transformers import DynamicCache

        cache = DynamicCache()
        layer = _spare_layer_class()
        cache.layers = [layer(k, v, spare=self.max_new + 1) for k, v in kv]
        return cache

    def _merge(self, old: _Running | None, new: _Running) -> _Running:
        """One batch of both (``new`` fresh from ``_prefill``), in a cache with spare room: the shorter side's
        cache and mask left-padded to the longer's width."""
        if old is None:
            return _Running(new.rows, self._cache(_plain_kv(new.cache)), new.mask, new.pending)
        width = max(old.mask.shape[1], new.mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        kv = [(torch.cat([left_pad(ka, 2), left_pad(kb, 2)]), torch.cat([left_pad(va, 2), left_pad(vb, 2)]))
              for (ka, va), (kb, vb) in zip(_plain_kv(old.cache), _plain_kv(new.cache))]
        mask = torch.cat([left_pad(old.mask, 1), left_pad(new.mask, 1)])
        return _Running(old.rows + new.rows, self._cache(kv), mask, torch.cat([old.pending, new.pending]))

    def _fixed_batches(self, prompts, order, batch_size, out, bar):
        for idx in batches(order, batch_size):
            batch = pad_examples([{"input_ids": prompts[i], "prompt_len": len(prompts[i])} for i in idx],
                                 self.pad_id, "left")
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            last = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=self.device)
            with edit_at_positions(self.model, last):
                generated = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                                max_new_tokens=self.max_new, min_new_tokens=0, pad_token_id=self.pad_id,
                                                eos_token_id=sorted(self.eos_ids) or None, temperature=None, top_p=None, top_k=None)
            for row, i in enumerate(idx):
                out[i] = generated[row, ids.shape[1]:].tolist()
                _strip_eos(out[i], self.eos_ids)
            bar.update(len(idx))


def _strip_eos(tokens: list[int], eos_ids: set[int]) -> None:
    """Cut at the first end-of-generation id."""
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    if end is not None:
        del tokens[end:]


def _plain_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer (keys, values) [B, heads, T, head_dim] of a plain DynamicCache; None for any other cache."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ not in ("DynamicLayer", "_SpareLayer")
                         or getattr(layer, "keys", None) is None for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


@functools.lru_cache(maxsize=None)
def _spare_layer_class():
    """Built on first use: ``DynamicLayer`` exists from transformers 4.5x on (older caches take the fallback)."""
    from transformers.cache_utils import DynamicLayer

    class _SpareLayer(DynamicLayer):
        """A DynamicLayer that writes each step's keys/values into spare room at the end of one buffer instead
        of concatenating the whole cache anew (a copy of every cached token per layer per step); ``keys`` and
        ``values`` stay views of the filled part, so the model reads them as usual."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int):
            super().__init__()
            self.device, self.is_initialized = keys.device, True
            self.length = keys.shape[-2]
            self._k = self._room(keys, spare)
            self._v = self._room(values, spare)
            self._views()

        @staticmethod
        def _room(t: torch.Tensor, spare: int) -> torch.Tensor:
            buf = t.new_empty(*t.shape[:-2], t.shape[-2] + spare, t.shape[-1])
            buf[..., :t.shape[-2], :] = t
            return buf

        def _views(self) -> None:
            self.keys, self.values = self._k[..., :self.length, :], self._v[..., :self.length, :]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            add = key_states.shape[-2]
            if self.length + add > self._k.shape[-2]:
                self._k = self._room(self.keys, max(add, self.length))
                self._v = self._room(self.values, max(add, self.length))
            self._k[..., self.length:self.length + add, :] = key_states
            self._v[..., self.length:self.length + add, :] = value_states
            self.length += add
            self._views()
            return self.keys, self.values

    return _SpareLayer

