"""Reuse the frozen lower layers: nothing below the lowest edited layer depends on trainable parameters.

The output of decoder layer ``skip - 1`` is computed once per training example (forget row or retain row,
trimmed to its real length) and kept, within a memory budget; later forwards of the same rows run only the
layers from ``skip`` up. The embedding and the layers below are bypassed by giving those layers, for the
duration of one forward, an instance-level ``forward`` that passes the cached states through.

``skip`` is the lowest layer edited by ANY adapter on the model (a frozen earlier adapter edits too), so
no edit is ever skipped or applied twice.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from grun_fast.architectures import locate
from grun_fast.patching import adapter_names, disable_adapters


class _Stop(Exception):
    def __init__(self, output):
        self.output = output


class LowerLayerCache:
    """Per-example outputs of decoder layer ``skip - 1`` (``skip`` >= 1), stored on the model's device."""

    def __init__(self, model: nn.Module, skip: int, max_bytes: int):
        if skip < 1:
            raise ValueError("LowerLayerCache needs at least one layer below the lowest edited layer")
        self.model = model
        self.layers = locate(model)[1]
        self.skip = skip
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.store: dict[tuple[str, int], torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self.enabled = True  # turned off if the layers return tuples (only plain-tensor layers are bypassed)

    @torch.no_grad()
    def _compute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states leaving layer ``skip - 1`` (the forward stops there)."""
        def stop(module, args, output):
            if not isinstance(output, torch.Tensor):
                self.enabled = False
                output = output[0]
            raise _Stop(output)

        handle = self.layers[self.skip - 1].register_forward_hook(stop)
        # no adapter edits below `skip`; switched off, none asks for this sub-batch's edit positions
        adapters_off = disable_adapters(self.model) if adapter_names(self.model) else contextlib.nullcontext()
        try:
            with adapters_off:
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop as s:
            return s.output
        finally:
            handle.remove()
        raise RuntimeError("the forward did not reach the cached layer")

    def fetch(self, keys: Sequence[tuple[str, int]], input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, d] lower-layer outputs for the batch rows (zeros on padding), from the store where possible."""
        lengths = attention_mask.sum(-1).tolist()
        missing: dict[tuple[str, int], int] = {}   # key -> first batch row holding it
        for i, k in enumerate(keys):
            if k not in self.store and k not in missing:
                missing[k] = i
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        fresh: dict[tuple[str, int], torch.Tensor] = {}
        # One forward per missing example, at its own length: a value must not depend on which other rows
        # shared its batch (padding width and batch size change the kernels' rounding), or a resumed run, which
        # refills the store in other batches, drifts from the uninterrupted one (1e-4 after 120 steps).
        for k, i in missing.items():
            value = self._compute(input_ids[i: i + 1, : lengths[i]], attention_mask[i: i + 1, : lengths[i]])[0]
            value = value.detach()
            fresh[k] = value
            size = value.numel() * value.element_size()
            if self.used_bytes + size <= self.max_bytes:
                self.store[k] = value
                self.used_bytes += size
        values = [fresh[k] if k in fresh else self.store[k] for k in keys]
        out = torch.zeros(input_ids.shape[0], input_ids.shape[1], values[0].shape[-1], dtype=values[0].dtype,
                          device=values[0].device)
        for i, value in enumerate(values):
            out[i, : value.shape[0]] = value
        return out

    def skipping(self, hidden: torch.Tensor):
        """Within the block, layers below ``skip`` hand ``hidden`` on instead of computing."""
        return bypass_lower_layers(self.layers, self.skip, hidden)


@contextlib.contextmanager
def bypass_lower_layers(layers: nn.ModuleList, skip: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, ``layers[:skip]`` do no work and layer ``skip - 1`` outputs ``hidden`` (plain-tensor
    layers only), by giving them an instance-level ``forward`` for the duration."""
    def passthrough(hidden_states, *args, **kwargs):
        return hidden_states

    def cached(hidden_states, *args, **kwargs):
        if hidden_states.shape[:2] != hidden.shape[:2]:
            raise RuntimeError("cached lower-layer states do not match this forward's batch")
        return hidden

    patched = []
    try:
        for j in range(skip):
            layer = layers[j]
            layer.forward = cached if j == skip - 1 else passthrough
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward
